"""`CroupierIterableDataset`: the rank's slices as decoded samples, for `torch.utils.data`.

Each sample is a dict of the MDS columns plus `_croupier_step` and `_croupier_id` (the step
and global id it was dealt under), yielded in the server's order. Use it with
`DataLoader(ds, batch_size=<per-rank batch>)`: one DataLoader batch is then exactly one
step's slice.

With `num_workers=N`, worker w reads steps start+w, start+w+N, ... (the server streams each
worker only its steps), so the DataLoader's round-robin over workers reproduces the server's
order. Every worker opens its own channel and shard store after the fork; the dataset object
itself holds no channel, so it pickles and forks safely.

Shards come from the job's remote (or `remote=`) into `cache_dir`, keyed by the dataset
fingerprint; the shards of the slices in the lookahead window are prefetched as the slices
arrive, and with `cache_limit` the store evicts what no pending slice needs.

Checkpointing: `state_dict()` is local and cheap (no server call), so it can be called every
step and inside DataLoader workers, before the first item too: torchdata's
`StatefulDataLoader` calls it in every worker and restores each worker's own state, so a
restored loader continues with exactly the batches the saved one would have yielded next.
The state records the next step of this process's lane, how many samples of it were already
yielded, the lane stride (the number of workers) and the iteration's end. With a plain
`DataLoader` and workers the main process cannot see the workers' progress: pass the next
step to train (one past the `_croupier_step` of the last batch trained on) as
`state_dict(next_step)`; every worker count can resume from such a state.
`state_dict(..., checkpoint=True)` also asks the server for a checkpoint token at that step
(the trainer's own checkpoint: one call, not every step).

The sequence has no epochs: a trainer iterates once. Without workers a second iteration
continues where the first stopped; with workers every new iteration starts from the
dataset's start (the loaded state, `start_step`, or the rank's position on the server when
the first worker joined).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

from torch.utils.data import IterableDataset, get_worker_info

from croupier.client.agent.protocol import AGENT_ENV
from croupier.client.dataset_state import (
    DATASET_STATE_VERSION,
    encode_sampler_state,
    parse_sampler_state,
    parse_state,
)
from croupier.client.embedded import SERVER_ONLY, EmbeddedDealer, EmbeddedJob
from croupier.client.rank_client import RankClient
from croupier.errors import ConfigError, EndOfData, FingerprintMismatch, StateError
from croupier.server.sampling.state import SamplerState
from croupier.topology import Topology

log = logging.getLogger(__name__)

STEP_KEY = "_croupier_step"
ID_KEY = "_croupier_id"
TOKENS_KEY = "_croupier_tokens"
"""Under a job dealt in tokens: (start, end, length) of the document's stream tokens (its
tokens then EOS, `length` of them) that this rank's step covers."""


class CroupierIterableDataset(IterableDataset):
    """Decoded samples of this rank's slices, in the server's order.

    address, job, topology, token, tls_root_cert, lookahead: as for `RankClient`.
    cache_dir: local shard cache root (shared safely by ranks and workers on a node). Not
        needed under a node agent, whose node cache is used instead.
    cache_limit: bytes of shards to keep locally (None: no limit). Under a node agent the
        agent's --cache-limit applies to the whole node instead.
    agent: the node agent's runtime directory (None: $CROUPIER_AGENT; "": connect directly).
    steps: steps to yield per iteration (None: until the end of the sequence).
    start_step: first step (None: the loaded state's, else where the server says the rank resumes).
    remote: where shards are read from (None: the job's dataset_remote).
    """

    def __init__(
        self,
        address: str,
        job: str,
        *,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        steps: int | None = None,
        start_step: int | None = None,
        topology: Topology | None = None,
        token: str | None = None,
        tls_root_cert: str | os.PathLike | bytes | None = None,
        lookahead: int = 64,
        remote: str | None = None,
        prefetch_threads: int = 4,
        agent: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if steps is not None and steps < 0:
            raise ConfigError(f"steps must be >= 0, got {steps}")
        if start_step is not None and start_step < 0:
            raise ConfigError(f"start_step must be >= 0, got {start_step}")
        if cache_limit is not None and cache_limit <= 0:
            raise ConfigError(f"cache_limit must be > 0 bytes, got {cache_limit}")
        self.address = address
        self.job = job
        self.agent = os.fspath(agent) if agent is not None else os.environ.get(AGENT_ENV, "")
        if self.agent and (cache_dir is not None or cache_limit is not None):
            _warn_once(f"a node agent ({AGENT_ENV}={self.agent}) serves this rank: its node cache is used, and the "
                       "dataset's cache_dir / cache_limit are ignored")
        if cache_dir is None and not self.agent:
            raise ConfigError("cache_dir is required when no node agent is configured (agent= or $CROUPIER_AGENT)")
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else ""
        self.cache_limit = cache_limit
        self.steps = steps
        self.topology = topology if topology is not None else Topology.detect()
        self.token = token
        self.tls_root_cert = tls_root_cert
        self.lookahead = lookahead
        self.remote = remote
        self.prefetch_threads = prefetch_threads
        self._start_step = start_step
        self._resume_token = ""
        self._expected_fingerprint: str | None = None
        self._fingerprint: str | None = None
        # This process's lane: next step, samples of it already yielded, stride (workers; None for a
        # global step that any worker count can start from) and the iteration's end.
        self._position: int | None = None
        self._skip = 0
        self._stride: int | None = None
        self._stop: int | None = None
        # Start step agreed by all DataLoader workers of one iteration (-1: not resolved yet).
        # Shared memory made before the fork, so workers that join at different moments (and
        # may see the server's position move under acks) still start from one base.
        self._shared_base = multiprocessing.get_context().Value("q", -1 if start_step is None else start_step)
        # Set by DataLoader workers when they iterate, so the main process knows it cannot see the position.
        self._shared_workers = multiprocessing.get_context().Value("q", 0)
        self._control: RankClient | None = None
        self._control_pid: int | None = None
        self._embedded: EmbeddedJob | None = None  # set by embedded(): no server
        self._sampler_state: bytes | None = None  # a loaded state's sampler state, at or before its step
        self._dealer: EmbeddedDealer | None = None  # this process's embedded lane
        self._store: Any = None  # the shard store of this process's iteration, while it runs
        self._reader_stats: dict[str, float] = {}

    @classmethod
    def embedded(
        cls,
        dataset: str | os.PathLike | None = None,
        *,
        global_batch: int | None = None,
        cache_dir: str | os.PathLike,
        global_tokens: int | None = None,
        token_schedule: str | None = None,
        doc_chunk: int | None = None,
        policy: str | None = None,
        clip: int | str | None = None,
        budget_steps: int | None = None,
        weights: Sequence[float] | str | None = None,
        switch_step: int | None = None,
        switch_fraction: float | None = None,
        on_exhausted: str = "stop",
        min_active_share: float = 0.5,
        seed: int = 0,
        selection: str | None = None,
        mix: str | os.PathLike | None = None,
        topology: Topology | None = None,
        remote: str | None = None,
        cache_limit: int | None = None,
        steps: int | None = None,
        start_step: int | None = None,
        lookahead: int = 64,
        prefetch_threads: int = 4,
    ) -> CroupierIterableDataset:
        """The same dataset with no server: every rank (and DataLoader worker) computes the
        global batches with the sampler `croupier serve` runs, and reads its slice of each.

        It yields exactly what `croupier serve DATASET` (or `serve --mix FILE`) with the same
        flags deals this rank. The policy keywords mean what the flags mean (`clip` an integer
        or "auto"; `weights` a list, a comma list or "@FILE"). `state_dict()` carries the
        sampler state, so a resume costs O(clusters), and the state resumes on a served job of
        the same configuration too (and a served job's `state_dict(checkpoint=True)` here).
        Online changes, loss feedback and server checkpoints need `croupier serve`.
        """
        from croupier.server.sampling.policy import PolicyConfig
        from croupier.server.sampling.token_stream import TokenSchedule
        from croupier.values import parse_weights

        schedule = None
        if global_tokens is not None or token_schedule is not None:
            if global_batch is not None or (global_tokens is not None and token_schedule is not None):
                raise ConfigError("steps are in documents (global_batch) or in tokens (global_tokens or "
                                  "token_schedule): give one")
            schedule = (TokenSchedule.parse(token_schedule) if token_schedule is not None
                        else TokenSchedule.constant(global_tokens))  # type: ignore[arg-type]
            global_batch = 1  # documents per draw come from the schedule (doc_chunk)
        elif doc_chunk is not None:
            raise ConfigError("doc_chunk applies to steps in tokens (global_tokens)")
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
            raise ConfigError(f"global_batch must be an integer >= 1, got {global_batch!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        config = None
        if mix is None:
            if dataset is None:
                raise ConfigError("embedded() needs a dataset (a folder or s3:// URL with a sidecar) or mix=")
            config = PolicyConfig.from_options(
                policy=policy, clip=clip, weights=parse_weights(weights) if isinstance(weights, str) else weights,
                switch_step=switch_step, switch_fraction=switch_fraction, budget_steps=budget_steps,
                on_exhausted=on_exhausted, min_active_share=min_active_share)
        else:
            given = [k for k, v in (("policy", policy), ("clip", clip), ("budget_steps", budget_steps),
                                    ("weights", weights), ("switch_step", switch_step),
                                    ("switch_fraction", switch_fraction), ("selection", selection),
                                    ("dataset", dataset)) if v is not None]
            if on_exhausted != "stop":
                given.append("on_exhausted")
            if min_active_share != 0.5:
                given.append("min_active_share")
            if given:
                raise ConfigError(f"mix={os.fspath(mix)!r}: the mixture file fixes the sources and their policies; "
                                  f"remove {', '.join(given)} (set them per source, or at the file's top level)")
        job = EmbeddedJob(dataset=None if dataset is None else os.fspath(dataset),
                          mix=None if mix is None else os.fspath(mix), selection=selection, policy=config,
                          global_batch=global_batch, seed=seed, remote=remote,
                          sidecar_cache=os.path.join(os.fspath(cache_dir), "sidecars"), tokens=schedule,
                          doc_chunk=doc_chunk)
        ds = cls("", "embedded", cache_dir=cache_dir, cache_limit=cache_limit, steps=steps, start_step=start_step,
                 topology=topology, lookahead=max(1, lookahead), prefetch_threads=prefetch_threads, agent="")
        ds._embedded = job
        if schedule is None:
            ds.topology.slice_bounds(global_batch)  # refuses a batch that does not split evenly, at the door
        else:
            schedule.check_world(ds.topology.world)
        return ds

    @property
    def is_embedded(self) -> bool:
        """Whether this dataset deals itself (`embedded()`) rather than reading from a server."""
        return self._embedded is not None

    def _client(self, **kwargs: Any) -> RankClient:
        return RankClient(
            self.address,
            job=self.job,
            topology=self.topology,
            token=self.token,
            tls_root_cert=self.tls_root_cert,
            lookahead=self.lookahead,
            agent=self.agent,
            **kwargs,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for step, samples, offset in self._steps():
            last = len(samples) - 1
            for i, sample in enumerate(samples):
                # the position is what comes after the sample being handed out now
                if i == last:
                    self._position, self._skip = step + cast(int, self._stride), 0  # _steps set it
                else:
                    self._position, self._skip = step, offset + i + 1
                yield sample

    def iter_steps(self) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(step, the rank's decoded samples of that step), one whole step at a time.

        For transforms that work per step (packing); the position moves a whole step at once,
        so `state_dict()` between two items is always at a step boundary."""
        for step, samples, _ in self._steps():
            self._position, self._skip = step + cast(int, self._stride), 0  # _steps set it
            yield step, samples

    def _steps(self) -> Iterator[tuple[int, list[dict[str, Any]], int]]:
        """(step, samples, samples of the step skipped) of this process's lane, from its position."""
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if info is not None:
            with self._shared_workers.get_lock():
                self._shared_workers.value = workers
        client = self._reader()
        store = None
        try:
            job = client.join()
            if self._expected_fingerprint is not None and job.sampler_fingerprint != self._expected_fingerprint:
                raise FingerprintMismatch("sampler", self._expected_fingerprint, job.sampler_fingerprint)
            self._fingerprint = job.sampler_fingerprint
            if info is None and not self.is_embedded:
                self._resume_token = ""  # the job is resumed; later iterations just continue
                self._sampler_state = None
            first, stop, skip = self._lane(client, workers, worker)
            if first is None:  # a joined client knows the rank's position
                raise StateError(f"rank {client.topology.rank} has no start step after joining job {self.job!r}")
            self._position, self._skip, self._stride, self._stop = first, skip, workers, stop
            store = self._store = self._open_store(job, client)
            client.plan(first, stop, step_stride=workers, step_offset=first,
                        on_slice=lambda step, ids: store.prefetch(ids))
            while True:
                try:
                    step, ids = client.next_slice()
                except EndOfData:
                    break
                samples = store.get(ids[skip:])
                store.start_prefetch()  # after the first step: see `readers.job_store`
                spans = getattr(client, "last_spans", None)
                for i, (sample_id, sample) in enumerate(zip(ids[skip:].tolist(), samples)):
                    sample[STEP_KEY] = step
                    sample[ID_KEY] = sample_id
                    if spans is not None:
                        sample[TOKENS_KEY] = spans[skip + i]
                yield step, samples, skip
                skip = 0
                store.release(ids)
            if info is not None:
                self._position = None  # a new iteration of a worker starts from the dataset's start
        finally:
            client.close()
            if store is not None:
                self._reader_stats = _numbers(store.stats())  # the counters outlive the iteration
                self._store = None
                store.close()

    def _reader(self) -> RankClient | EmbeddedDealer:
        """This iteration's source of slices: a client of the server, or the embedded dealer."""
        if self._embedded is None:
            return self._client(resume_token=self._resume_token or None, sampler_state=self._sampler_state,
                                expected_fingerprint=self._expected_fingerprint)
        state = None if self._sampler_state is None else SamplerState.from_bytes(self._sampler_state)
        self._dealer = EmbeddedDealer(self._embedded, self.topology, lookahead=self.lookahead, state=state)
        return self._dealer

    def _lane(self, client: RankClient | EmbeddedDealer | None, workers: int,
              worker: int) -> tuple[int | None, int | None, int]:
        """(first step, stop step, samples of the first step to skip) of this process's lane.

        A lane state (saved by a process reading with the same stride) continues as it is; a
        global next step (a trainer's `state_dict(next_step)`, `start_step`, or the rank's
        position on the server) starts worker w at that step + w. Without a client (a state
        taken before the first item) an unresolved server position stays None.
        """
        if self._position is not None and self._stride is not None:
            if self._stride != workers:
                raise ConfigError(f"this state was saved by a reader of every {self._stride}th step (that many "
                                  f"DataLoader workers), but it is now read by {workers}: restore a loader "
                                  f"state into the same num_workers, or resume from state_dict(next_step)")
            if workers == 1 and self._stop is not None and self._position >= self._stop:
                # the last iteration ended: the next one continues from there
                return self._position, None if self.steps is None else self._position + self.steps, 0
            return self._position, self._stop, self._skip
        base = self._global_base(client, workers)
        if base is None:
            return None, None, 0
        return base + worker, None if self.steps is None else base + self.steps, 0

    def _global_base(self, client: RankClient | EmbeddedDealer | None, workers: int) -> int | None:
        """The first step of an iteration, the same for every worker (None: not known yet)."""
        if self._position is not None:
            return self._position
        if self._start_step is not None:
            return self._start_step
        if workers == 1:
            return None if client is None else client.next_step
        with self._shared_base.get_lock():
            if self._shared_base.value < 0 and client is not None:
                self._shared_base.value = client.next_step
            value = int(self._shared_base.value)
        return None if value < 0 else value

    def _open_store(self, job: Any, client: RankClient | EmbeddedDealer | None = None):
        from croupier.client.readers.job_store import open_job_store

        return open_job_store(job, client, job_name=self.job, remote=self.remote, cache_dir=self.cache_dir,
                              cache_limit=self.cache_limit, prefetch_threads=self.prefetch_threads)

    # -- checkpoint state ---------------------------------------------------------------------

    def _control_client(self) -> RankClient:
        if self._control is None or self._control_pid != os.getpid():
            self._control = self._client()
            self._control_pid = os.getpid()
        return self._control

    def state_dict(self, next_step: int | None = None, checkpoint: bool = False) -> dict[str, Any]:
        """The reading position, for the trainer's checkpoint. Local: no server call by default.

        Without `next_step`: this process's own lane (the main process without workers, or a
        DataLoader worker under StatefulDataLoader), at any moment, before the first item too.
        next_step: the next global step to train, given by a trainer whose plain DataLoader
        workers read the data (the main process cannot see their progress).
        checkpoint: also take the server's checkpoint token at that step (call it when the
        trainer checkpoints, not every step; with non-persistent DataLoader workers under fork,
        prefer multiprocessing_context="forkserver").
        """
        position: int | None
        stride: int | None
        if next_step is not None:
            if isinstance(next_step, bool) or not isinstance(next_step, int) or next_step < 0:
                raise ConfigError(f"next_step must be an int >= 0, got {next_step!r}")
            position, skip, stride, stop = int(next_step), 0, None, None
        else:
            info = get_worker_info()
            workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
            if info is None and self._position is None and self._shared_workers.value > 0:
                raise ConfigError("DataLoader workers read this dataset, so this process does not know the "
                                  "position: pass next_step (one past the last trained _croupier_step) to "
                                  "state_dict(), or use torchdata's StatefulDataLoader, which saves every "
                                  "worker's own state")
            position, stop, skip = self._lane(None, workers, worker)
            stride = workers if position is not None else None
        fingerprint = self._fingerprint or self._expected_fingerprint or ""
        token = ""
        sampler_state = None
        if checkpoint:
            if self._embedded is not None:
                raise ConfigError(f"state_dict(checkpoint=True): {SERVER_ONLY}; an embedded state carries its "
                                  "sampler state already")
            if position is None:
                raise ConfigError("no position to checkpoint yet: pass next_step to state_dict(checkpoint=True)")
            control = self._control_client()
            fingerprint = fingerprint or control.status().job.sampler_fingerprint
            token = control.checkpoint(step=position, include_state=True)
            sampler_state = control.checkpoint_state(position)
        elif position is not None:
            sampler_state = self._state_before(position)
        if self._embedded is not None and not fingerprint:
            fingerprint = self._embedded_fingerprint()
        return {
            "version": DATASET_STATE_VERSION,
            "sampler_fingerprint": fingerprint,
            "next_step": position,
            "skip": skip,
            "stride": stride,
            "stop_step": stop,
            "token": token,
            "sampler_state": None if sampler_state is None else encode_sampler_state(sampler_state),
            "reader": self.reader_stats(),  # counters for the trainer's logs; not read back on load
        }

    def _state_before(self, step: int) -> bytes | None:
        """The sampler state before `step` this process holds (its embedded lane's, or a loaded
        state's at or before it), as bytes; None when it holds none."""
        if self._dealer is not None:
            state = self._dealer.state_before(step)
            if state is not None:
                return state.to_bytes()
        if self._sampler_state is not None and SamplerState.from_bytes(self._sampler_state).step <= step:
            return self._sampler_state
        return None

    def _embedded_fingerprint(self) -> str:
        """The embedded job's sampler fingerprint (opens its sidecars once)."""
        assert self._embedded is not None
        if self._fingerprint is None:
            self._fingerprint = EmbeddedDealer(self._embedded, self.topology).join().sampler_fingerprint
        return self._fingerprint

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next iteration continues from the state; its fingerprint is checked on join.

        Takes this dataset's states and a `RankClient` state (a global next step). A state
        saved in embedded mode resumes on a served job of the same configuration and back: its
        sampler state travels with it (without one, an embedded reader computes the steps
        before its position; a served job re-forms at the token's step, or at the rank's)."""
        position, skip, stride, stop = parse_state(state)
        expected = str(state["sampler_fingerprint"]) or None
        if expected is not None and self._fingerprint is not None and self._fingerprint != expected:
            raise FingerprintMismatch("sampler", expected, self._fingerprint)
        self._expected_fingerprint = expected
        self._position, self._skip, self._stride, self._stop = position, skip, stride, stop
        self._resume_token = str(state["token"])
        self._sampler_state = parse_sampler_state(state, expected, position)
        self._dealer = None
        if position is not None and stride is None:
            self._start_step = position
            with self._shared_base.get_lock():
                self._shared_base.value = position

    def report_losses(self, step: int, losses: Any, present: Any = None) -> None:
        """Reports the per-sample training losses of `step` (one per sample of this rank's
        slice of the step, in the order the dataset yielded them); asynchronous, see
        `RankClient.report_losses`. Call it from the training process: DataLoader workers
        may hold the streams, the report names the step and the server knows its ids. For
        packed rows, fold per-token losses first (`croupier.client.loss_fold`)."""
        if self._embedded is not None:
            raise ConfigError(f"report_losses: {SERVER_ONLY}")
        self._control_client().report_losses(step, losses, present)

    def reader_stats(self) -> dict[str, float]:
        """This process's shard-store counters (bytes and shards downloaded, shards reused, samples
        read, seconds waited on shards, cache bytes, ...; see `ShardCache.stats`), of the
        iteration running or the last one; each DataLoader worker has its own (they travel in
        `state_dict()["reader"]`)."""
        store = self._store
        return _numbers(store.stats()) if store is not None else dict(self._reader_stats)

    def flush_losses(self, timeout: float = 5.0) -> bool:
        """Waits until the loss reports made so far were sent (True), or `timeout` passed."""
        if self._embedded is not None or self._control is None or self._control_pid != os.getpid():
            return True
        return self._control.flush_losses(timeout)

    def loss_report_stats(self) -> dict[str, int]:
        """Steps queued, sent, accepted, refused and dropped by this process's loss reports."""
        if self._embedded is not None or self._control is None or self._control_pid != os.getpid():
            return {}
        return self._control.loss_report_stats()

    def close(self) -> None:
        """Closes the control channel used by state_dict() (iteration clients close themselves)."""
        if self._control is not None and self._control_pid == os.getpid():
            self._control.close()
        self._control = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_control"] = None  # never ship a channel to another process
        state["_control_pid"] = None
        state["_dealer"] = None  # each process deals its own lane
        state["_store"] = None  # and reads through its own store
        if not _spawning():
            # Outside process start-up shared values cannot travel: ship their values.
            for key in _SHARED:
                state[key] = int(getattr(self, key).value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in _SHARED:
            if isinstance(state[key], int):
                state[key] = multiprocessing.get_context().Value("q", state[key])
        self.__dict__.update(state)


def _numbers(stats: Mapping[str, Any]) -> dict[str, float]:
    """The numeric counters of a store's stats (what a trainer's logger takes)."""
    return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


_SHARED = ("_shared_base", "_shared_workers")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _spawning() -> bool:
    """Whether we are pickling for a starting child process (shared memory may travel)."""
    from multiprocessing import context

    return context.get_spawning_popen() is not None
