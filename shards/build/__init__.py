"""croupier.shards.build: the dataset build (ingest, embed, cluster, write, sidecar).

`build(BuildConfig(...))` runs it on the local engine, `build_ray(...)` on a Ray cluster;
both run the same stages (`pipeline.plan`), the engine-specific ones from `stages/`
(local) and `ray_stages/` (Ray), and give the same dataset.
"""

from __future__ import annotations

from croupier.lazy import exports

__all__ = ["BuildConfig", "BuildResult", "Builder", "build", "build_ray"]

__getattr__, __dir__ = exports(__name__, {
    "BuildConfig": "croupier.shards.build.config",
    "BuildResult": "croupier.shards.build.config",
    "Builder": "croupier.shards.build.builder",
    "build": "croupier.shards.build.builder",
    "build_ray": "croupier.shards.build.ray_builder",
})
