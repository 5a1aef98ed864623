"""`serve --state-dir s3://bucket/prefix`: the start and stop of a job whose state lives on an object store.

The order is what makes it safe (`server.durability.remote_state`, `lease`):
1. `prepare` (before anything is read): the URL is checked and a local working copy chosen
   (`--state-cache DIR`, or a fresh temporary folder removed when the server exits); the rest
   of `serve` runs on that folder as on any local state directory.
2. `acquire` (before the job reads its state): the lease is taken (waiting out a dead
   holder's TTL, refusing a live one), then the bucket's state replaces the local copy.
3. `activate` (bound, about to serve): what the start wrote goes to the bucket, every later
   durable write goes there too, the lease names the address and is renewed; losing it
   stops the server.
4. `close`: writes stop reaching the bucket and the lease is released (a kill -9 skips this:
   the next server waits for the lease to expire).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from croupier.errors import ConfigError
from croupier.server.durability.lease import DEFAULT_TTL_S, MAX_TTL_S, MIN_TTL_S, Lease, describe
from croupier.server.durability.object_store import ObjectStoreLocation, is_state_url
from croupier.server.durability.remote_state import RemoteState, clear_cache

__all__ = ["RemoteStart", "add_state_location_arguments"]

log = logging.getLogger(__name__)


def add_state_location_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--state-cache", default=None, metavar="DIR",
                       help="with --state-dir s3://...: the local working copy (default: a temporary folder; the "
                            "object store is the authority, this folder is replaced from it at every start)")
    group.add_argument("--lease-ttl", type=float, default=DEFAULT_TTL_S,
                       help=f"with --state-dir s3://...: seconds the job's lease lasts without renewal (default "
                            f"{DEFAULT_TTL_S:g}; renewed every third of it; a server killed without a clean stop "
                            f"is taken over after it)")


def check_state_location_args(args: argparse.Namespace) -> None:
    """--state-cache / --lease-ttl belong to an object-store --state-dir; the TTL's range."""
    remote = is_state_url(args.state_dir)
    if not remote and args.state_cache:
        raise ConfigError(f"--state-cache is for a --state-dir on an object store (s3://...), got --state-dir "
                          f"{args.state_dir}")
    if not (isinstance(args.lease_ttl, float) and MIN_TTL_S <= args.lease_ttl <= MAX_TTL_S):
        raise ConfigError(f"--lease-ttl must be in [{MIN_TTL_S:g}, {MAX_TTL_S:g}] seconds, got {args.lease_ttl!r}")
    if remote:
        ObjectStoreLocation(args.state_dir)  # the URL's form, before anything is touched


class RemoteStart:
    """The object-store side of one `serve` run (see the module docstring)."""

    def __init__(self, location: ObjectStoreLocation, local: Path, temporary: bool, ttl_s: float) -> None:
        self.location = location
        self.local = local
        self.temporary = temporary
        self.lease = Lease(location, ttl_s)
        self.state = RemoteState(location, local, self.lease)
        self.held = False

    @classmethod
    def prepare(cls, args: argparse.Namespace) -> RemoteStart | None:
        """None for a local --state-dir; else points args.state_dir at the local working copy."""
        if not is_state_url(args.state_dir):
            return None
        location = ObjectStoreLocation(args.state_dir)
        if args.state_cache:
            local, temporary = Path(args.state_cache), False
        else:
            local, temporary = Path(tempfile.mkdtemp(prefix="croupier-state-")), True
        args.state_url, args.state_dir = location.url, str(local)
        return cls(location, local, temporary, args.lease_ttl)

    def acquire(self) -> None:
        """Takes the lease, then replaces the local copy with the bucket's state."""
        try:
            previous = self.lease.acquire()
            self.held = True
            n = self.state.pull()
        except OSError as exc:
            raise ConfigError(f"cannot use --state-dir {self.location.url}: {exc.strerror or exc}") from None
        log.info("job state location", extra={"event": "state_location", "state_dir": self.location.url,
                                               "local": str(self.local), "objects": n,
                                               "took_over_from": describe(previous) if previous else ""})

    def activate(self, address: str, on_lost: Callable[[str], None]) -> None:
        """Serving starts: the start's writes to the bucket, later writes with them, renewals."""
        try:
            self.state.activate()
        except OSError as exc:
            raise ConfigError(f"cannot write the job's state to {self.location.url}: {exc.strerror or exc}") from None
        self.lease.set_address(address)
        self.lease.start(on_lost)

    def close(self) -> None:
        """Writes stop reaching the bucket; the lease is released; a temporary copy goes (the
        bucket is the authority: the next start fetches it afresh)."""
        self.state.deactivate()
        if self.held:
            self.lease.release()
            self.held = False
        if self.temporary:
            clear_cache(self.local)
