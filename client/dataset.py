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

Checkpointing: `state_dict(next_step)` returns {"version", "sampler_fingerprint",
"next_step", "token"}; `load_state_dict()` makes the next iteration start exactly there.
Without workers the dataset tracks the position itself; with workers pass the next step to
train (one past the `_croupier_step` of the last batch trained on).

The sequence has no epochs: a trainer iterates once. Without workers a second iteration
continues where the first stopped; with workers (whose progress the main process cannot
see) every iteration starts from the dataset's start (the loaded state, `start_step`, or
the rank's position on the server when the first worker joined).
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any, Iterator, Mapping

from torch.utils.data import IterableDataset, get_worker_info

from croupier.client.rank_client import STATE_VERSION, RankClient, validate_state
from croupier.errors import ConfigError, EndOfData, FingerprintMismatch
from croupier.server.topology import Topology

STEP_KEY = "_croupier_step"
ID_KEY = "_croupier_id"


class CroupierIterableDataset(IterableDataset):
    """Decoded samples of this rank's slices, in the server's order.

    address, job, topology, token, tls_root_cert, lookahead: as for `RankClient`.
    cache_dir: local shard cache root (shared safely by ranks and workers on a node).
    cache_limit: bytes of shards to keep locally (None: no limit).
    steps: steps to yield per iteration (None: until the end of the sequence).
    start_step: first step (None: the loaded state's, else where the server says the rank resumes).
    remote: where shards are read from (None: the job's dataset_remote).
    """

    def __init__(
        self,
        address: str,
        job: str,
        *,
        cache_dir: str | os.PathLike,
        cache_limit: int | None = None,
        steps: int | None = None,
        start_step: int | None = None,
        topology: Topology | None = None,
        token: str | None = None,
        tls_root_cert: str | os.PathLike | bytes | None = None,
        lookahead: int = 64,
        remote: str | None = None,
        prefetch_threads: int = 4,
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
        self.cache_dir = os.fspath(cache_dir)
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
        self._position: int | None = None  # next step to train, tracked in-process
        # Start step agreed by all DataLoader workers of one iteration (-1: not resolved yet).
        # Shared memory made before the fork, so workers that join at different moments (and
        # may see the server's position move under acks) still start from one base.
        self._shared_base = multiprocessing.get_context().Value("q", -1 if start_step is None else start_step)
        self._control: RankClient | None = None
        self._control_pid: int | None = None

    def _client(self, **kwargs: Any) -> RankClient:
        return RankClient(
            self.address,
            job=self.job,
            topology=self.topology,
            token=self.token,
            tls_root_cert=self.tls_root_cert,
            lookahead=self.lookahead,
            **kwargs,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        client = self._client(resume_token=self._resume_token or None,
                              expected_fingerprint=self._expected_fingerprint)
        store = None
        try:
            job = client.join()
            self._fingerprint = job.sampler_fingerprint
            if info is None:
                self._resume_token = ""  # the job is resumed; later iterations just continue
            base = self._resolve_base(client, workers)
            store = self._open_store(job)
            client.plan(base, None if self.steps is None else base + self.steps, step_stride=workers,
                        step_offset=base + worker, on_slice=lambda step, ids: store.prefetch(ids))
            yield from self._samples(client, store, in_process=info is None)
        finally:
            client.close()
            if store is not None:
                store.close()

    def _resolve_base(self, client: RankClient, workers: int) -> int:
        """First step of this iteration, the same for every worker."""
        if self._position is not None:
            return self._position
        if self._start_step is not None:
            return self._start_step
        if workers == 1:
            return client.next_step
        with self._shared_base.get_lock():
            if self._shared_base.value < 0:
                self._shared_base.value = client.next_step
            return int(self._shared_base.value)

    def _open_store(self, job: Any):
        from croupier.client.shard_store import ShardStore

        remote = self.remote or job.dataset_remote
        if not remote:
            raise ConfigError(f"job {self.job!r} names no dataset remote; pass remote= to the dataset")
        return ShardStore(
            remote,
            self.cache_dir,
            fingerprint=job.dataset_fingerprint or None,
            cache_limit=self.cache_limit,
            prefetch_threads=self.prefetch_threads,
        )

    def _samples(self, client: RankClient, store: Any, in_process: bool) -> Iterator[dict[str, Any]]:
        while True:
            try:
                step, ids = client.next_slice()
            except EndOfData:
                return
            samples = store.get(ids)
            last = len(samples) - 1
            for i, (sample_id, sample) in enumerate(zip(ids.tolist(), samples)):
                sample[STEP_KEY] = step
                sample[ID_KEY] = sample_id
                if i == last and in_process:
                    self._position = step + 1
                yield sample
            store.release(ids)

    # -- checkpoint state ---------------------------------------------------------------------

    def _control_client(self) -> RankClient:
        if self._control is None or self._control_pid != os.getpid():
            self._control = self._client()
            self._control_pid = os.getpid()
        return self._control

    def state_dict(self, next_step: int | None = None, checkpoint: bool = True) -> dict[str, Any]:
        """The position to store in the trainer's checkpoint.

        next_step: the next step to train; None uses the position this process tracked
        (exact without DataLoader workers). With `checkpoint`, the token comes from the
        server's Checkpoint at that step (the call is made from this process: with
        non-persistent DataLoader workers under fork, prefer multiprocessing_context="forkserver").
        """
        if next_step is None:
            next_step = self._position if self._position is not None else self._start_step
        if next_step is None:
            raise ConfigError("the dataset has not yielded a step yet: pass next_step to state_dict()")
        control = self._control_client()
        fingerprint = self._fingerprint or control.status().job.sampler_fingerprint
        token = control.checkpoint(step=int(next_step)) if checkpoint else ""
        return {
            "version": STATE_VERSION,
            "sampler_fingerprint": fingerprint,
            "next_step": int(next_step),
            "token": token,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next iteration starts at the state's next step; its fingerprint is checked on join."""
        validate_state(state)
        expected = str(state["sampler_fingerprint"])
        if self._fingerprint is not None and self._fingerprint != expected:
            raise FingerprintMismatch("sampler", expected, self._fingerprint)
        self._expected_fingerprint = expected
        self._start_step = int(state["next_step"])
        self._position = None
        self._resume_token = str(state["token"])
        with self._shared_base.get_lock():
            self._shared_base.value = self._start_step

    def close(self) -> None:
        """Closes the control channel used by state_dict() (iteration clients close themselves)."""
        if self._control is not None and self._control_pid == os.getpid():
            self._control.close()
        self._control = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_control"] = None  # never ship a channel to another process
        state["_control_pid"] = None
        if not _spawning():
            # Outside process start-up the shared value cannot travel: ship its value.
            state["_shared_base"] = int(self._shared_base.value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_shared_base"], int):
            state["_shared_base"] = multiprocessing.get_context().Value("q", state["_shared_base"])
        self.__dict__.update(state)


def _spawning() -> bool:
    """Whether we are pickling for a starting child process (shared memory may travel)."""
    from multiprocessing import context

    return context.get_spawning_popen() is not None
