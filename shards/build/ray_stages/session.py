"""The Ray engine's connection to a cluster: started for a build, shared by its stages.

A build joins the cluster at `address` (else `RAY_ADDRESS`, else the current or a new local
Ray instance) and shuts down only a Ray instance it started itself. `workers` (the parallel
tasks and actors a stage runs) defaults to the cluster's CPUs.
"""

from __future__ import annotations

from croupier.errors import ConfigError
from croupier.optional import require

TASK_RETRIES = 3
"""How often Ray reruns an assign or write task whose worker process died (a bad record is not
retried; Ray Data applies its own retry and actor-restart defaults to ingest and embed)."""


class RaySession:
    """The cluster a Ray build runs on: `open()` before the stages, `close()` after."""

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise ConfigError(f"--ray-workers must be >= 1, got {workers}")
        self.address = address
        self._workers = workers
        self._started = False

    def open(self, quiet: bool) -> None:
        """Join (or start) the cluster; `quiet`: no per-dataset execution lines from Ray Data."""
        if quiet:
            import logging

            logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray = require("ray", "the Ray build engine")
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=True)
            self._started = True
        if self._workers is None:
            self._workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the stages draw their own bars, with rates
        ctx.print_on_execution_start = False

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    @property
    def workers(self) -> int:
        """Parallel tasks and actors (`--ray-workers`, else the cluster's CPUs once open)."""
        return int(self._workers or 1)

    @staticmethod
    def gpus() -> int:
        import ray

        return int(ray.cluster_resources().get("GPU", 0))
