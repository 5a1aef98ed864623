"""The names of the build's work files, in `OUT/croupier/work/`: one home for every stage.

The work folder holds everything an unfinished build has made so far: the build state, the
ingested text parts, the per-document arrays (embeddings, assignments, the cluster order),
the shards before they move into the dataset folder. A finished build deletes it.
"""

from __future__ import annotations

STATE = "state.json"
"""The build state: the resume key, what each stage finished, and the stages' own progress."""
PARTS = "parts"
"""Folder of the ingested text parts (`croupier.shards.build.textstore`)."""
EMBEDDINGS = "embeddings.npy"
"""float16 (N, dim) embedding of every document, in input order."""
CENTROIDS_RAW = "centroids_raw.npy"
"""float32 (K, dim) centroids as trained, before empty clusters are dropped."""
ASSIGN = "assign.npy"
"""int32 (N,) raw cluster of every document, in input order."""
REMAP = "remap.npy"
"""int64 (K,) raw cluster -> final cluster (-1 for a cluster that came out empty)."""
OFFSETS = "offsets.npy"
"""int64 (K'+1,) start of every final cluster in the cluster order."""
CENTROIDS = "centroids.npy"
"""float32 (K', dim) centroids of the final (non-empty) clusters."""
ORDER = "order.npy"
"""int64 (N,) the cluster order: input positions sorted by final cluster."""
MDS = "mds"
"""Folder the shards are written into before they move into the dataset folder."""
TOKEN_COUNTS = "token_counts.npy"
"""With --tokenizer: int32 (N,) token count of every sample id."""
GROUP_CODES = "group_codes.npy"
"""With --group-by: int32 (N,) group code of every document, in input order."""
GROUP_NAMES = "group_names.json"
"""With --group-by: the sorted group names the codes index."""
CLUSTER_GROUPS_RAW = "cluster_groups_raw.npy"
"""With --group-by: int32 (K,) group of every raw cluster."""
