"""`ClusterBatchSampler`: croupier's sequence as a batch sampler for map-style datasets.

    from croupier.client import ClusterBatchSampler
    sampler = ClusterBatchSampler(ds["cluster"], policy="clusterclip", clip=4, global_batch=512)
    loader = StatefulDataLoader(ds, batch_sampler=sampler, num_workers=4)

For a `torch.utils.data.Dataset` read by index (a Hugging Face `datasets.Dataset`, a list,
an array), with no server: every rank computes the same global batches with the sampling
core `croupier serve` deals from (`Sampler`; policy options read by
`PolicyConfig.from_options`, the conversion `serve` and `simulate` share), and yields its
own contiguous slice of each step as a list of dataset indices. `croupier simulate
--cluster-ids FILE.npy --world W --rank R --format jsonl` prints the same lists.

The state (`state_dict()`) is a position in the global sequence: the sampler's O(clusters)
state (`SamplerState.to_bytes()`), the step, and where the current pass over the sampler
stops. Loading it costs O(clusters), never a replay; a state of another dataset, policy,
global batch or seed is refused by fingerprint. The position is the same on every rank, so a
state also resumes on another rank or world that splits the same global batch.
`StatefulDataLoader` (torchdata) saves and restores it with the loader's own state, with or
without workers: it reads the batch sampler's state in the main process right after each
step's indices are taken, so prefetching stays exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from croupier.cluster_ids import layout_from_cluster_ids
from croupier.errors import ConfigError, EndOfData, FingerprintMismatch, StateError
from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import SamplerState
from croupier.topology import Topology

__all__ = ["BATCH_SAMPLER_STATE_VERSION", "ClusterBatchSampler"]

BATCH_SAMPLER_STATE_VERSION = 1
_STATE_KEYS = ("version", "fingerprint", "next_step", "stop_step", "sampler_state")


def _layout(clusters: Any, selection: str | None) -> ClusterLayout:
    """A croupier dataset's sidecar layout (a path), or the layout of per-index cluster ids."""
    if isinstance(clusters, (str, os.PathLike)):
        from croupier.datasets import open_dataset

        return open_dataset(os.fspath(clusters)).layout(selection)
    if selection is not None:
        raise ConfigError(f"selection {selection!r} needs a croupier dataset path as clusters; "
                          "per-index cluster ids have no selections (set excluded indices to -1)")
    return layout_from_cluster_ids(clusters)


def _topology(rank: int | None, world: int | None, topology: Topology | None) -> Topology:
    if topology is not None:
        if rank is not None or world is not None:
            raise ConfigError(f"give topology or rank/world, not both (topology {topology}, rank {rank}, "
                              f"world {world})")
        if not isinstance(topology, Topology):
            raise ConfigError(f"topology must be a croupier.topology.Topology, got {type(topology).__name__}")
        return topology
    if rank is None and world is None:
        return Topology.detect()  # torchrun's RANK and WORLD_SIZE; one rank without them
    if rank is None or world is None:
        raise ConfigError(f"give both rank and world, or neither (read from RANK/WORLD_SIZE); got rank {rank}, "
                          f"world {world}")
    return Topology(rank=rank, world=world)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return value


class ClusterBatchSampler:
    """Yields this rank's indices of each step of croupier's global sequence (a `batch_sampler`).

    clusters: a croupier dataset path (its cluster sidecar; `selection` names a selection
        of it), or one cluster id per dataset index (array, list, tensor, or a Hugging Face
        column such as `ds["cluster"]`): dense ids 0..K-1, -1 leaves an index out.
    policy, clip, budget_steps, weights, on_exhausted, min_active_share, switch_step,
        switch_fraction: what `serve`/`simulate`'s flags of the same names mean; `clip` is an
        integer >= 1 or "auto" (needs budget_steps); `weights` one per cluster.
    global_batch, seed: the sequence's batch over all ranks and its seed.
    rank, world / topology: the rank's place (default: torchrun's RANK and WORLD_SIZE); pass a
        `Topology` (`Topology.data_parallel(tensor=...)`) when tensor or pipeline peers share a slice.
    steps: steps one pass over the sampler yields (its `len`); None: until the end of data.
    start_step: the first step when no state is loaded (reached by running the sampling core
        from step 0 without reading data; a loaded state resumes in O(clusters)).

    Each `iter()` continues the one sequence where the last stopped (a new "epoch" draws new
    batches, it does not repeat); the sequence ends at end of data (`end_of_data_step`) when the
    clip exhausts the clusters under on_exhausted="stop".
    """

    def __init__(self, clusters: Any, *, policy: str | None, clip: int | str | None = None, global_batch: int,
                 seed: int = 0, rank: int | None = None, world: int | None = None, budget_steps: int | None = None,
                 weights: Any = None, on_exhausted: str = "stop", min_active_share: float = 0.5,
                 switch_step: int | None = None, switch_fraction: float | None = None, steps: int | None = None,
                 start_step: int = 0, topology: Topology | None = None, selection: str | None = None) -> None:
        config = PolicyConfig.from_options(policy=policy, clip=clip, weights=weights, switch_step=switch_step,
                                           switch_fraction=switch_fraction, budget_steps=budget_steps,
                                           on_exhausted=on_exhausted, min_active_share=min_active_share)
        self.steps = None if steps is None else _count("steps", steps)
        start_step = _count("start_step", start_step)
        self.topology = _topology(rank, world, topology)
        layout = _layout(clusters, selection)
        self._sampler = Sampler(layout, config, global_batch, seed)
        self.topology.slice_bounds(self._sampler.global_batch)  # refuses a batch that does not split evenly
        self.end_of_data_step: int | None = None
        self._stop: int | None = None  # the step where the live pass stops (None: at end of data)
        self._resume_stop: int | None = None  # a loaded state's unfinished pass
        self._live: object | None = None  # the iterator allowed to advance the sequence
        for _ in range(start_step):
            try:
                self._sampler.next_batch()
            except EndOfData as exc:
                raise ConfigError(f"start_step {start_step} is past the end of data at step {exc.step}") from None

    # -- what it is ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The sequence's identity (dataset layout, policy, global batch, seed); states carry it."""
        return self._sampler.fingerprint

    @property
    def step(self) -> int:
        """The global step whose indices come next."""
        return self._sampler.step

    @property
    def num_samples(self) -> int:
        """Indices lie in [0, num_samples): the length the dataset must have."""
        return self._sampler.layout.num_samples

    @property
    def config(self) -> PolicyConfig:
        return self._sampler.config

    @property
    def global_batch(self) -> int:
        return self._sampler.global_batch

    @property
    def seed(self) -> int:
        return self._sampler.seed

    def __len__(self) -> int:
        """Steps one pass yields: `steps` (fewer if the data ends first)."""
        if self.steps is None:
            raise TypeError("ClusterBatchSampler has no length without steps=: it runs until the end of data")
        return self.steps

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        return self._iterate()

    def _iterate(self) -> Iterator[list[int]]:
        token = object()
        self._live = token  # a newer iterator retires this one's predecessors
        if self._resume_stop is not None:
            self._stop, self._resume_stop = self._resume_stop, None
        else:
            self._stop = None if self.steps is None else self._sampler.step + self.steps
        while self._live is token and (self._stop is None or self._sampler.step < self._stop):
            try:
                batch = self._sampler.next_batch()
            except EndOfData as exc:
                self.end_of_data_step = exc.step
                return
            yield self.topology.slice(batch).tolist()

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position in the sequence: small (O(clusters)), versioned, bound to the fingerprint."""
        step = self._sampler.step
        stop = self._stop if self._resume_stop is None else self._resume_stop
        return {
            "version": BATCH_SAMPLER_STATE_VERSION,
            "fingerprint": self.fingerprint,
            "next_step": step,
            "stop_step": stop if stop is not None and step < stop else None,
            "sampler_state": self._sampler.state().to_bytes(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`; refuses another configuration's, another version's or a corrupt state.

        The next `iter()` finishes the pass the state was saved in, then passes run `steps` again.
        """
        if not isinstance(state, Mapping):
            raise StateError(f"a ClusterBatchSampler state is a mapping, got {type(state).__name__}")
        if set(state) != set(_STATE_KEYS):
            raise StateError(f"ClusterBatchSampler state keys {sorted(state)} are not the expected "
                             f"{sorted(_STATE_KEYS)}")
        if state["version"] != BATCH_SAMPLER_STATE_VERSION:
            raise StateError(f"ClusterBatchSampler state version {state['version']!r} is not supported "
                             f"(expected {BATCH_SAMPLER_STATE_VERSION})")
        if state["fingerprint"] != self.fingerprint:
            raise FingerprintMismatch("ClusterBatchSampler state (another dataset, policy, global batch or seed)",
                                      expected=self.fingerprint, got=str(state["fingerprint"]))
        raw = state["sampler_state"]
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise StateError(f"ClusterBatchSampler state: sampler_state must be bytes, got {type(raw).__name__}")
        saved = SamplerState.from_bytes(bytes(raw))
        step, stop = state["next_step"], state["stop_step"]
        if isinstance(step, bool) or not isinstance(step, int) or step != saved.step:
            raise StateError(f"ClusterBatchSampler state: next_step {step!r} differs from its sampler state's "
                             f"step {saved.step}")
        if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop <= step):
            raise StateError(f"ClusterBatchSampler state: stop_step {stop!r} must be None or an integer > "
                             f"next_step {step}")
        self._sampler.load_state(saved)  # checks the fingerprint and the cluster count before changing anything
        self._resume_stop = stop
        self._stop = None
        self._live = None
        self.end_of_data_step = None

    def __repr__(self) -> str:
        return (f"ClusterBatchSampler(policy={self.config.policy!r}, global_batch={self.global_batch}, "
                f"seed={self.seed}, rank={self.topology.rank}, world={self.topology.world}, step={self.step}, "
                f"steps={self.steps})")
