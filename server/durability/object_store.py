"""A job's state location on an object store: `s3://bucket/prefix` (any S3-compatible store).

The few operations a state location needs, each one request: read an object with its ETag
and its age on the store's own clock, write one whole (optionally only if it is absent or
still has an ETag the caller read: S3's conditional writes), delete, list. Credentials come
from the standard AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...) and
`S3_ENDPOINT_URL` names an S3-compatible store (MinIO, Ceph, R2, a loopback server), as for
datasets (`croupier.format.remote`).

Errors: a failed condition is `Precondition`; a store that cannot be reached or refuses a
write is an `OSError` naming the URL, so the checkpoint writer's retry and health reporting
(`checkpoint_writer`) treat it as they treat a full or read-only disk. Timeouts are short
(the lease that guards the location has a TTL of seconds).
"""

from __future__ import annotations

import email.utils
import errno
import os
from dataclasses import dataclass
from typing import Any

from croupier.errors import ConfigError

__all__ = ["ObjectStoreLocation", "Precondition", "Stored", "is_state_url"]

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
ATTEMPTS = 3


class Precondition(Exception):  # noqa: N818 - the store's own name for it
    """A conditional write or delete found the object changed (or present, or gone)."""


@dataclass(frozen=True)
class Stored:
    """One object read back: its bytes, its ETag, and its age in seconds on the store's
    clock (the response's Date minus the object's Last-Modified; None when the store sends
    no Date)."""

    data: bytes
    etag: str
    age_s: float | None


def is_state_url(location: str) -> bool:
    """Whether a --state-dir names an object store location rather than a local path."""
    return "://" in location


class ObjectStoreLocation:
    """`s3://bucket/prefix`: the objects of one job's state under one prefix."""

    def __init__(self, url: str) -> None:
        scheme, _, rest = url.partition("://")
        bucket, _, prefix = rest.partition("/")
        if scheme != "s3" or not bucket:
            raise ConfigError(f"--state-dir on an object store must be s3://BUCKET[/PREFIX], got {url!r}")
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client: Any = None

    def __repr__(self) -> str:
        return self.url

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def name_of(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                         retries={"max_attempts": ATTEMPTS, "mode": "standard"})
            self._client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=cfg)
        return self._client

    # -- the operations ---------------------------------------------------------------------------
    def get(self, name: str) -> Stored | None:
        """The object `name`, or None when it is not there."""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
            data = r["Body"].read()
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._oserror("read", name, exc) from None
        age = None
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date and r.get("LastModified") is not None:
            age = (email.utils.parsedate_to_datetime(date) - r["LastModified"]).total_seconds()
        return Stored(data=data, etag=str(r["ETag"]).strip('"'), age_s=age)

    def put(self, name: str, data: bytes, *, if_match: str | None = None, if_absent: bool = False) -> str:
        """Writes `name` whole (one request: the store never shows part of it); its new ETag.
        `if_match`: only while the object still has that ETag; `if_absent`: only if it is
        not there. Precondition when the condition fails."""
        extra: dict[str, str] = {}
        if if_match is not None:
            extra["IfMatch"] = f'"{if_match}"'
        if if_absent:
            extra["IfNoneMatch"] = "*"
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, **extra)
        except Exception as exc:
            if extra and _code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404",
                                        "ConditionalRequestConflict", "409"):
                raise Precondition(f"{self.url}/{name}: {_code(exc)}") from None
            raise self._oserror("write", name, exc) from None
        return str(r["ETag"]).strip('"')

    def delete(self, name: str, *, if_match: str | None = None) -> None:
        """Deletes `name` (absent is fine); `if_match`: only while it has that ETag."""
        extra = {"IfMatch": f'"{if_match}"'} if if_match is not None else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name), **extra)
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return
            if extra and _code(exc) in ("PreconditionFailed", "412"):
                raise Precondition(f"{self.url}/{name}: {_code(exc)}") from None
            raise self._oserror("delete", name, exc) from None

    def list(self) -> dict[str, str]:
        """name -> ETag of every object under the prefix."""
        out: dict[str, str] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.key("") if self.prefix else "")
            for page in pages:
                for obj in page.get("Contents", []):
                    out[self.name_of(obj["Key"])] = str(obj["ETag"]).strip('"')
        except Exception as exc:
            raise self._oserror("list", "", exc) from None
        return out

    def _oserror(self, what: str, name: str, exc: BaseException) -> OSError:
        code = _code(exc) or type(exc).__name__
        target = f"{self.url}/{name}" if name else self.url
        return OSError(errno.EIO, f"cannot {what} {target}: {code}: {exc}")


def _code(exc: BaseException) -> str:
    """S3's error code of a botocore ClientError ('' for other errors)."""
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))
