"""croupier's on-disk formats, in one place: what the writer (`croupier.shards`) produces and
the reader (`croupier.client`) consumes.

- `mds_index`: the MDS `index.json` (`MDSIndex`, `ShardEntry`, `ShardFile`, hash choice)
- `id_table`: global sample id -> (shard, offset) (`ShardTable`)
- `mds_shard`: a shard file's integrity against the index and its sample header
- `fingerprint`: the dataset fingerprint every sidecar, state and cache is bound to
- `sidecar_layout`: the cluster sidecar's folder, manifest and file names
- `atomic`: crash-safe writes (temporary file, fsync, rename, fsync of the folder)

Nothing here imports grpc, torch or faiss; streaming is imported only where a hash is taken.
"""

from __future__ import annotations

from croupier.format.atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_npy_atomic
from croupier.format.fingerprint import cache_dir_name, index_fingerprint
from croupier.format.id_table import SampleIdError, ShardTable
from croupier.format.mds_index import INDEX_BASENAME, MDSIndex, ShardEntry, ShardFile

__all__ = [
    "INDEX_BASENAME", "MDSIndex", "SampleIdError", "ShardEntry", "ShardFile", "ShardTable", "atomic_path",
    "cache_dir_name", "index_fingerprint", "write_bytes_atomic", "write_json_atomic", "write_npy_atomic",
]
