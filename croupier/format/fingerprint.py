"""Dataset fingerprints: a short, stable name for the exact MDS index a dataset has.

The fingerprint is derived from the bytes of the dataset's `index.json` (which lists every
shard with its size and hashes), so a rewritten dataset gets a new fingerprint, and every
sidecar, sampler state, checkpoint and client cache is bound to it.
"""

from __future__ import annotations

import hashlib

PREFIX = "mds:"


def index_fingerprint(index_json: bytes) -> str:
    """Fingerprint of an MDS dataset from the raw bytes of its index.json."""
    return PREFIX + hashlib.sha256(b"croupier.index.v1\0" + index_json).hexdigest()[:24]


def cache_dir_name(fingerprint: str) -> str:
    """Directory name of a dataset's client cache (fingerprints hold a colon, paths should not)."""
    return fingerprint.replace(":", "-")
