"""The build engines by name (`--engine`): `local`, one process, or `ray`, a Ray cluster.

`build_with(cfg, engine, ...)` runs a build on the named engine and refuses an unknown name
(with the valid ones) and Ray settings given to the local engine.
"""

from __future__ import annotations

from croupier.errors import ConfigError
from croupier.shards.build.config import BuildConfig, BuildResult, Hook

ENGINES = ("local", "ray")


def build_with(cfg: BuildConfig, engine: str = "local", *, ray_address: str | None = None,
               ray_workers: int | None = None, hook: Hook | None = None) -> BuildResult:
    """Run or resume a build on `engine` (`ray_address`, `ray_workers`: the Ray engine's cluster)."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    if engine == "ray":
        from croupier.shards.build.ray_builder import build_ray

        return build_ray(cfg, address=ray_address, workers=ray_workers, hook=hook)
    if ray_address is not None or ray_workers is not None:
        raise ConfigError("--ray-address and --ray-workers apply to --engine ray only")
    from croupier.shards.build.builder import build

    return build(cfg, hook)
