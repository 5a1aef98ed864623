"""Lightning: `CroupierDataModule`, a `LightningDataModule` whose every rank resumes exactly.

Lightning (>= 2.2) saves a `StatefulDataLoader`'s state into its checkpoint, but only rank
0's: `dump_checkpoint` runs on every rank, `strategy.save_checkpoint` writes rank 0's dict,
and on resume `FitLoop` loads that one "combined_loader" state into every rank's loader
(`CombinedLoader._load_state_dicts`). Its `_PrefetchDataFetcher` also pulls one batch ahead
of the step being trained (an iterable has no length), so even rank 0's loader state is a
batch past the checkpoint. Restoring a croupier loader's per-rank state that way would give
rank 1 rank 0's lane and skip a batch.

So this module saves a rank-independent state: the global next step, one past the
`_croupier_step` of the last batch the trainer took (`on_before_batch_transfer`, called when
the loop takes a batch, not when the fetcher prefetches it), with the dataset's
`state_dict(next_step)` at that step. Every rank trains the same step at the same time, so
rank 0's value is every rank's; each rank's slice of that step is its own, cut by the
dataset. The same state goes into the module's own checkpoint entry and the loader's
"combined_loader" entry, so either restores exactly, with any number of DataLoader workers.

`PackedSequences` carries tokens across steps per rank, which no global step holds: under
this module it must be built with `max_carry=0` (each step packs only its own documents;
tokens beyond rows x seq_len are dropped and counted), and is refused otherwise.

`CroupierLogCallback` logs, through `LightningModule.log`, the seconds each step waited for
its batch (the time `next()` on the loader blocked) and the loader's counters: steps and
samples taken, and with a packer its token counters (tokens padded, dropped, ...).

Lightning is imported when this module is imported (never by `import croupier`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import IterableDataset

from croupier.errors import ConfigError, MissingDependency, StateError

try:
    import lightning.pytorch as pl
except ImportError as exc:  # the trainer is the user's, never a dependency of croupier
    raise MissingDependency("lightning", "croupier.integrations.lightning", "pip install 'lightning>=2.2'") from exc

from croupier.integrations.loader import CroupierLoader, pack_counters, wait_logs
from croupier.topology import Topology

STEP_KEY = "_croupier_step"
STATE_VERSION = 1


def batch_step(batch: Any) -> int:
    """The croupier step a batch was dealt under; refuses a batch that mixes steps."""
    if not isinstance(batch, Mapping) or STEP_KEY not in batch:
        raise ConfigError(f"a croupier batch is a mapping with {STEP_KEY!r}; got {type(batch).__name__} "
                          f"(keep the key through collate_fn)")
    value = batch[STEP_KEY]
    steps = value.tolist() if hasattr(value, "tolist") else value
    steps = steps if isinstance(steps, list) else [steps]
    if not steps or any(s != steps[0] for s in steps):
        raise ConfigError(f"a batch mixes steps {sorted(set(steps))}: batch_size must be the per-rank batch "
                          f"(global batch / world), so one batch is one step's slice")
    return int(steps[0])


def _inner(dataset: Any) -> Any:
    """The `CroupierIterableDataset` under a dataset (itself, or a packer's)."""
    from croupier.client.dataset import CroupierIterableDataset
    from croupier.client.packing import PackedSequences

    if isinstance(dataset, PackedSequences):
        if dataset.max_carry != 0:
            raise ConfigError(f"PackedSequences max_carry={dataset.max_carry}: Lightning saves rank 0's loader "
                              f"state only, and a carry belongs to one rank; build the packer with max_carry=0")
        return dataset.dataset
    if isinstance(dataset, CroupierIterableDataset):
        return dataset
    raise ConfigError(f"CroupierDataModule takes a CroupierIterableDataset or PackedSequences, got "
                      f"{type(dataset).__name__}")


class CroupierDataModule(pl.LightningDataModule):
    """The rank's croupier slices as Lightning's train dataloader, resumed exactly on every rank.

    dataset: a `CroupierIterableDataset` (served or `embedded(...)`) or a `PackedSequences`
        over one (with `max_carry=0`), built for this rank (its topology is checked against
        the trainer's in `setup`); or a function Topology -> such a dataset, called in
        `setup` with the trainer's rank and world (for Lightning's own launcher, which sets
        the ranks only once `fit` starts).
    batch_size: the per-rank batch (global batch / data-parallel world) for a plain dataset;
        None for a packer, whose item is already the rank's batch.
    num_workers, collate_fn, loader_kwargs: as for `StatefulDataLoader`. A `collate_fn` must
        keep `_croupier_step` in the batch.
    """

    def __init__(self, dataset: Any, *, batch_size: int | None, num_workers: int = 0, collate_fn: Any = None,
                 **loader_kwargs: Any) -> None:
        super().__init__()
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.loader_kwargs = loader_kwargs
        self.dataset: Any = None
        self.inner: Any = None
        self._factory: Callable[[Topology], Any] | None = None
        if callable(dataset) and not isinstance(dataset, IterableDataset):
            self._factory = dataset  # built in setup(), for the trainer's rank
        else:
            self._use(dataset)
        self.next_step: int | None = None  # one past the last step the trainer took
        self._pending: Mapping[str, Any] | None = None  # a state loaded before the dataset was built
        self.loader: CroupierDataLoader | None = None
        self._taken = {"steps": 0, "samples": 0}

    def _use(self, dataset: Any) -> None:
        inner = _inner(dataset)
        packed = inner is not dataset
        if packed and self.batch_size is not None:
            raise ConfigError(f"batch_size={self.batch_size} with PackedSequences: its item is already the rank's "
                              f"batch; pass batch_size=None")
        if not packed and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                           or self.batch_size < 1):
            raise ConfigError(f"batch_size must be the per-rank batch (an int >= 1), got {self.batch_size!r}")
        self.dataset, self.inner = dataset, inner

    # -- Lightning hooks -----------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        if self.dataset is None:
            assert self._factory is not None
            self._use(self._factory(Topology(trainer.global_rank, trainer.world_size, trainer.local_rank)))
            if self._pending is not None:
                self.load_state_dict(self._pending)
        topo = self.inner.topology
        if (topo.rank, topo.world) != (trainer.global_rank, trainer.world_size):
            raise ConfigError(f"the dataset reads rank {topo.rank} of world {topo.world}, the trainer runs rank "
                              f"{trainer.global_rank} of {trainer.world_size}: build the dataset in each rank's "
                              f"process (Topology.detect() reads RANK / WORLD_SIZE)")

    def train_dataloader(self) -> CroupierDataLoader:
        if self.dataset is None:
            raise ConfigError("the dataset factory is called in setup(): let the Trainer set up this module first")
        if self.next_step is not None:
            self.inner.load_state_dict(self.inner.state_dict(next_step=self.next_step))
        self.loader = CroupierDataLoader(self, self.dataset, batch_size=self.batch_size,
                                         num_workers=self.num_workers, collate_fn=self.collate_fn,
                                         **self.loader_kwargs)
        return self.loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and not self.trainer.training:
            return batch
        step = batch_step(batch)
        if self.next_step is not None and step != self.next_step:
            raise StateError(f"the trainer took step {step} after step {self.next_step - 1}: a batch was skipped "
                             f"or repeated")
        self.next_step = step + 1
        self._taken["steps"] += 1
        self._taken["samples"] += _batch_len(batch)
        return batch

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The global next step and the dataset's state at it: the same on every rank."""
        dataset = None if self.next_step is None else self.inner.state_dict(next_step=self.next_step)
        return {"version": STATE_VERSION, "next_step": self.next_step, "dataset": dataset}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the global next step; the next `train_dataloader()` (or the loader, if one
        exists) continues from it."""
        next_step, dataset = _parse(state)
        if next_step is None:
            return
        if self.inner is None:
            self._pending = state
            return
        self.inner.load_state_dict(dataset)
        self.next_step = next_step

    def counters(self) -> dict[str, float]:
        """Steps and samples the trainer took from this rank's loader, and a packer's counters."""
        out: dict[str, float] = dict(self._taken)
        if self.inner is not self.dataset:
            if self.num_workers == 0:
                out.update(self.dataset.stats())
            elif self.loader is not None:
                out.update(pack_counters(super(CroupierDataLoader, self.loader).state_dict()))
        return out


def _batch_len(batch: Mapping[str, Any]) -> int:
    value = batch[STEP_KEY]
    return len(value) if hasattr(value, "__len__") else int(getattr(batch.get("input_ids"), "shape", [1])[0])


def _parse(state: Any) -> tuple[int | None, Any]:
    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        raise StateError(f"croupier Lightning state version {getattr(state, 'get', lambda k: None)('version')!r} "
                         f"is not supported (expected {STATE_VERSION})")
    next_step = state.get("next_step")
    if next_step is not None and (isinstance(next_step, bool) or not isinstance(next_step, int) or next_step < 0):
        raise StateError(f"croupier Lightning state next_step must be None or an int >= 0, got {next_step!r}")
    if next_step is not None and not isinstance(state.get("dataset"), Mapping):
        raise StateError("croupier Lightning state has a next_step but no dataset state")
    return next_step, state.get("dataset")


class CroupierDataLoader(CroupierLoader):
    """The module's `StatefulDataLoader`: its state (the one Lightning saves from rank 0 and
    loads into every rank) is the module's rank-independent state, not the per-lane one."""

    def __init__(self, module: CroupierDataModule, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module = module

    def state_dict(self) -> dict[str, Any]:
        return self._module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._module.load_state_dict(state_dict)


class CroupierLogCallback(pl.Callback):
    """Logs each step's data wait and the loader's counters through `LightningModule.log`.

    prefix: the metric names' prefix; counters_every: log the counters every N steps (they
    read the packer's state; the wait is logged every step)."""

    def __init__(self, prefix: str = "croupier/", counters_every: int = 1) -> None:
        if counters_every < 1:
            raise ConfigError(f"counters_every must be >= 1, got {counters_every}")
        self.prefix = prefix
        self.counters_every = counters_every

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        module = getattr(trainer, "datamodule", None)
        if not isinstance(module, CroupierDataModule) or module.loader is None:
            return
        metrics: dict[str, float] = {}
        metrics.update(wait_logs(module.loader.take_waits(), self.prefix))
        if module.next_step is not None:
            metrics[f"{self.prefix}step"] = float(module.next_step - 1)
        if trainer.global_step % self.counters_every == 0:
            metrics.update({f"{self.prefix}{k}": float(v) for k, v in module.counters().items()})
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
