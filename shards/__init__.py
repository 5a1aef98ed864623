"""croupier.shards: offline dataset preparation.

- `build/`: ingest, embed, cluster and write MDS shards with the cluster sidecar (local and Ray);
- `scoring/`: Density, Ask-LLM and perplexity scores, and selections;
- `cli/`: `croupier shards build/inspect/plot/score/select/tokens`;
- `diagnostics.py`, `tail_check.py`: what a built dataset's clusters do for its long tail.

The sidecar format itself is core (`croupier.format.sidecar`): the server and the client read it.
"""

from __future__ import annotations

from croupier.lazy import exports

__all__ = ["BuildConfig", "Sidecar", "build"]

__getattr__, __dir__ = exports(__name__, {
    "BuildConfig": "croupier.shards.build.config",
    "build": "croupier.shards.build.builder",
    "Sidecar": "croupier.format.sidecar",
})
