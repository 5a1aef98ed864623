"""A croupier dataset on an object store (`s3://`, `gs://`, ... any remote Streaming speaks).

Reading and writing go through mosaicml-streaming's own storage layer (`CloudDownloader`,
`CloudUploader`), so credentials, retries and timeouts are Streaming's: the standard AWS
environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`,
`AWS_PROFILE`) and `S3_ENDPOINT_URL` for an S3-compatible store (MinIO, Ceph, R2, ...).

- `fetch_sidecar(url, cache_root)` copies a remote dataset's `index.json` and the sidecar
  arrays the sampler needs (everything but the embeddings) into a local folder keyed by
  the URL, always fetching afresh, and returns that folder for `Sidecar.open`.
- `publish(local_dir, url)` uploads a finished local dataset: shard files first, then the
  sidecar arrays, then `index.json`, and the sidecar manifest last, so a reader never sees
  a manifest whose files are not all there.

Streaming is imported on first use only: this package imports no heavy dependency.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from croupier.errors import DatasetError
from croupier.format import sidecar_layout as names
from croupier.format.mds_index import INDEX_BASENAME

DOWNLOAD_TIMEOUT = 120.0
SIDECAR_CACHE_DIR = "remote-sidecars"


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is a URL (scheme://...) rather than a local path."""
    return "://" in str(location)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT) -> None:
    """Fetch one remote file into `dest` (atomically); FileNotFoundError when it is not there."""
    from croupier.format.streaming_lib import CloudDownloader

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        CloudDownloader.direct_download(url, str(tmp), timeout)
        os.replace(tmp, dest)
    except Exception as exc:
        if _missing(exc):
            raise FileNotFoundError(f"{url} does not exist") from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _missing(exc: BaseException) -> bool:
    """Whether a download failed because the object is not there (S3's 404 / NoSuchKey)."""
    if isinstance(exc, FileNotFoundError):
        return True
    code = str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def exists(url: str, scratch: Path, timeout: float = DOWNLOAD_TIMEOUT) -> bool:
    """Whether the remote file `url` exists (by fetching it into `scratch`, then dropping it)."""
    probe = scratch / f".probe-{uuid.uuid4().hex}"
    try:
        download(url, probe, timeout)
    except FileNotFoundError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def fetch_sidecar(url: str, cache_root: str | os.PathLike[str], *, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """A local folder holding the remote dataset's index.json and sidecar (no embeddings).

    Raises DatasetError naming the URL when index.json, the manifest or a listed array file
    is missing or cannot be fetched.
    """
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    root = Path(cache_root) / key
    shutil.rmtree(root, ignore_errors=True)  # always fresh: the remote may have been rewritten
    side = root / names.SIDECAR_DIR

    def get(rel: str, dest: Path, what: str) -> None:
        src = join(url, rel)
        try:
            download(src, dest, timeout)
        except FileNotFoundError as exc:
            raise DatasetError(f"{what} {src} does not exist: {exc}") from exc
        except Exception as exc:
            raise DatasetError(f"cannot fetch {what} {src}: {exc}") from exc

    get(INDEX_BASENAME, root / INDEX_BASENAME, "MDS index")
    get(f"{names.SIDECAR_DIR}/{names.MANIFEST}", side / names.MANIFEST, "sidecar manifest")
    try:
        manifest = json.loads((side / names.MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"sidecar manifest at {url} is unreadable: {exc}") from exc
    for rel in _sidecar_files(manifest, with_embeddings=False):
        get(f"{names.SIDECAR_DIR}/{rel}", side / rel, "sidecar file")
    return root


def _sidecar_files(manifest: Any, *, with_embeddings: bool) -> list[str]:
    """Relative names of the array files a manifest lists (arrays, scores, selections)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise DatasetError("sidecar manifest has no 'files' map")
    out = [names.checked_relative(rel) for role, rel in manifest["files"].items()
           if with_embeddings or role != names.EMBEDDINGS]
    for section in ("scores", "selections"):
        for entry in (manifest.get(section) or {}).values():
            if isinstance(entry, dict) and "file" in entry:
                out.append(names.checked_relative(entry["file"]))
    return out


def publish(local_dir: str | os.PathLike[str], url: str) -> int:
    """Upload the finished dataset in `local_dir` to `url`; returns the number of files.

    Order: shards, sidecar arrays, index.json, sidecar manifest (last).
    """
    from croupier.format.mds_index import MDSIndex
    from croupier.format.streaming_lib import CloudUploader

    local = Path(local_dir)
    index = MDSIndex.read(local)
    side = local / names.SIDECAR_DIR
    manifest = json.loads((side / names.MANIFEST).read_text())
    files = [info.basename for e in index.shards for info in ((e.zip,) if e.zip else (e.raw,))]
    files += [f"{names.SIDECAR_DIR}/{rel}" for rel in _sidecar_files(manifest, with_embeddings=True)]
    files += [INDEX_BASENAME, f"{names.SIDECAR_DIR}/{names.MANIFEST}"]
    uploader = CloudUploader.get((str(local), url), keep_local=True, exist_ok=True)
    for rel in files:
        if not (local / rel).is_file():
            raise DatasetError(f"cannot publish {local} to {url}: {rel} is missing")
        uploader.upload_file(rel)
    return len(files)
