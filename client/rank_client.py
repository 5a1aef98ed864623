"""One trainer rank's connection to the sampler server: its slices, step by step.

`RankClient` joins the job as its rank, then a background thread holds a `StreamSlices`
stream open and fills a bounded queue with the rank's slices ahead of time. When the server
goes away (killed, restarted, network), the thread reconnects with exponential backoff and
jitter and asks again from the next step it has not received: the server deals every
(step, rank, world) the same ids, so the sequence the trainer sees is unchanged. Consumed
steps are acknowledged in batches, which lets the server hold fast ranks near slow ones.

`state_dict()` / `load_state_dict()` carry the position a trainer checkpoints with its model:
the sampler fingerprint (checked on load and on join), the next step to train, and a server
checkpoint token so a whole job can be resumed, even with another world size.

Nothing touches the network before the first call that needs it, and a client used in a
process other than the one that opened its channel opens a new one: gRPC channels do not
survive fork().
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from croupier import __version__
from croupier.client.acknowledger import Acknowledger
from croupier.client.backoff import Backoff
from croupier.client.channel import ChannelConfig, auth_metadata
from croupier.client.errors import ClientError, Unavailable, from_status, is_transient_code
from croupier.client.rank_state import STATE_VERSION, check_same_job, validate_state
from croupier.client.transport import LANE, GrpcTransport, LaneCall, Transport
from croupier.errors import ConfigError, EndOfData, FingerprintMismatch, StateError
from croupier.proto import pb2, slice_ids, slice_spans
from croupier.topology import Topology

log = logging.getLogger(__name__)


class _End:
    """Queue marker: the stream reached its stop step."""


class RankClient:
    """A rank's slices of the global sequence, delivered in step order.

    address: "host:port" of the sampler server.
    job: the job name the server serves.
    topology: this rank; None reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK.
    token: bearer token (None: $CROUPIER_TOKEN). tls_root_cert: PEM path or bytes for TLS.
    tls_server_name: the name to check in the server's certificate when `address` is not it.
    lookahead: steps the server streams ahead of what this client has acknowledged.
    resume_token: a checkpoint token (CheckpointResponse) to resume the job from.
    sampler_state: a sampler state saved elsewhere (an embedded reader's `state_dict()`), sent
        with the first join when there is no resume token: the job re-forms at its step and,
        when it has not reached it, continues from it.
    start_step: first step to deliver (None: where the server says this rank resumes).
    stop_step: deliver steps < stop_step only (None: until end of data).
    step_stride, step_offset: deliver only steps t with t % step_stride == step_offset
        (DataLoader worker w of N); the offset is taken modulo the stride.
    on_slice: called from the stream thread with (step, ids) as each slice arrives, ahead of
        consumption (e.g. to prefetch shards); an exception it raises is re-raised to the
        consumer.
    ack_every: acknowledge after this many consumed steps (and at least every ack_interval_s).
    heartbeat_s: re-send the acknowledgement at least this often while nothing new was
        consumed (a trainer in a long evaluation stays live on the server).
    expected_fingerprint: refuse (FingerprintMismatch) a server whose sampler fingerprint differs.
    read_only: read slices without taking part in the training (`croupier client dump`): the
        stream is marked read-only and nothing is acknowledged, so no rank's position moves.
    agent: the runtime directory of this node's `croupier agent` (None: $CROUPIER_AGENT; "" or
        unset: connect to the server directly; "auto": local rank 0 starts the node's agent for
        `address` when none runs, see croupier.client.agent.auto). Through an agent the rank
        opens no connection of its own to the server; with an explicit directory `address` is
        only a label.
    """

    def __init__(
        self,
        address: str,
        *,
        job: str,
        topology: Topology | None = None,
        token: str | None = None,
        tls_root_cert: str | os.PathLike | bytes | None = None,
        tls_server_name: str | None = None,
        lookahead: int = 64,
        resume_token: str | None = None,
        start_step: int | None = None,
        stop_step: int | None = None,
        step_stride: int = 1,
        step_offset: int = 0,
        on_slice: Callable[[int, np.ndarray], None] | None = None,
        ack_every: int | None = None,
        ack_interval_s: float = 1.0,
        rpc_timeout_s: float = 30.0,
        backoff: Backoff | None = None,
        expected_fingerprint: str | None = None,
        heartbeat_s: float = 10.0,
        read_only: bool = False,
        agent: str | os.PathLike | None = None,
        sampler_state: bytes | None = None,
    ) -> None:
        if not job:
            raise ConfigError("job name must be non-empty")
        if lookahead < 1:
            raise ConfigError(f"lookahead must be >= 1, got {lookahead}")
        if step_stride < 1:
            raise ConfigError(f"step_stride must be >= 1, got {step_stride}")
        if start_step is not None and start_step < 0:
            raise ConfigError(f"start_step must be >= 0, got {start_step}")
        if stop_step is not None and stop_step < 0:
            raise ConfigError(f"stop_step must be >= 0, got {stop_step}")
        self.address = address
        self.job = job
        self.topology = topology if topology is not None else Topology.detect()
        self._metadata = auth_metadata(token)
        self._tls_root_cert = tls_root_cert
        self._tls_server_name = tls_server_name or None
        self.lookahead = int(lookahead)
        self._resume_token = resume_token or ""
        self._sampler_state = bytes(sampler_state or b"")
        self._start_step = start_step
        self.stop_step = stop_step
        self.step_stride = int(step_stride)
        self.step_offset = int(step_offset) % self.step_stride
        self._on_slice = on_slice
        self._rpc_timeout_s = float(rpc_timeout_s)
        self._backoff = backoff or Backoff()
        if not heartbeat_s > 0:
            raise ConfigError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        self.read_only = bool(read_only)
        self.agent = str(agent) if agent is not None else os.environ.get("CROUPIER_AGENT", "")

        self._pid: int | None = None
        self._transport: Transport | None = None
        self._join: Any = None  # JoinResponse
        self._expected_fingerprint = expected_fingerprint or None
        self._acks = Acknowledger(int(ack_every) if ack_every else max(1, self.lookahead // 4), ack_interval_s,
                                  heartbeat_s)
        self._token = ""
        self._token_step = -1
        self._token_state = b""
        self._queue: queue.Queue = queue.Queue(maxsize=self.lookahead + 2)
        self._thread: threading.Thread | None = None
        self._call: LaneCall | None = None
        self._closed = threading.Event()
        self._ack_thread: threading.Thread | None = None
        self._sender: Any = None  # LossSender of this process (report_losses)
        self._sender_pid: int | None = None
        self._finished = False
        self.last_spans: list[tuple[int, int, int]] | None = None  # steps in tokens: the last slice's spans

    # -- connection ---------------------------------------------------------------------------

    def transport(self) -> Transport:
        """This process's way to the sampler (its agent's, or a gRPC channel of its own), opened
        on first use; a process that inherited another's (fork) opens its own."""
        pid = os.getpid()
        if self._transport is not None and self._pid == pid:
            return self._transport
        if self._transport is not None:
            # Inherited across fork(): the parent's channel, sockets and threads are unusable
            # here. Drop them without closing (closing would touch the parent's state).
            self._transport = None
            self._thread = None
            self._ack_thread = None
            self._call = None
            self._queue = queue.Queue(maxsize=self.lookahead + 2)
        if self.agent == "auto":
            from croupier.client.agent.auto import ensure_agent

            cert = None if isinstance(self._tls_root_cert, bytes) else self._tls_root_cert
            self.agent = ensure_agent(self.address, self.job, cert, self._tls_server_name if cert else None)
        if self.agent:
            from croupier.client.agent.transport import AgentTransport

            self._transport = AgentTransport(self.agent)
        else:
            config = ChannelConfig(self.address, self._tls_root_cert, self._tls_server_name)
            self._transport = GrpcTransport(config, self._metadata)
        self._pid = pid
        return self._transport

    @property
    def _where(self) -> str:
        return f"agent {self.agent}" if self.agent else f"server {self.address}"

    def _unary(self, name: str, request: Any, *, retry: bool = True, timeout: float | None = None) -> Any:
        """Calls a unary RPC, retrying transient failures with backoff when `retry`."""
        transport = self.transport()
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return transport.unary(name, request, timeout or self._rpc_timeout_s)
            except ClientError as exc:
                if not (retry and is_transient_code(exc.code)) or self._closed.is_set():
                    raise
                if time.monotonic() - start > self._backoff.give_up_after_s:
                    raise Unavailable(
                        f"{name} failed: {self._where} unreachable for "
                        f"{self._backoff.give_up_after_s:.0f} s: {exc.details}",
                        code=exc.code,
                        details=exc.details,
                    ) from None
                if attempt == 0 or attempt % 10 == 0:
                    log.warning("rank %d: %s failed (%s); retrying", self.topology.rank, name, exc)
                time.sleep(self._backoff.delay(attempt))
                attempt += 1

    def join(self) -> Any:
        """Joins the job (once) and returns the server's `JobInfo`; checks the fingerprint."""
        if self._join is not None and self._pid == os.getpid():
            return self._join.job
        response = self._do_join(self._resume_token)
        self._sampler_state = b""  # a rejoin after a reconnect continues where the job is
        got = response.job.sampler_fingerprint
        if self._expected_fingerprint is not None and got != self._expected_fingerprint:
            raise FingerprintMismatch("sampler", self._expected_fingerprint, got)
        self._join = response
        if self._acks.next_step is None:
            self._acks.start_at(self._start_step if self._start_step is not None else int(response.next_step))
        return response.job

    def _do_join(self, resume_token: str) -> Any:
        request = pb2.JoinRequest(
            job=self.job,
            rank=self.topology.rank,
            world_size=self.topology.world,
            resume_token=resume_token,
            client_version=__version__,
            sampler_state=b"" if resume_token else self._sampler_state,
        )
        return self._unary("Join", request)

    @property
    def job_info(self) -> Any:
        """The job description the server sent on join (joins if needed)."""
        return self.join()

    @property
    def per_rank_batch(self) -> int:
        """Samples this rank receives per step."""
        self.join()
        return int(self._join.per_rank_batch)

    @property
    def next_step(self) -> int:
        """The next step the trainer will receive (joins if needed)."""
        self.join()
        step = self._acks.next_step
        assert step is not None
        return step

    # -- the stream ---------------------------------------------------------------------------

    def plan(self, start_step: int, stop_step: int | None = None, step_stride: int = 1, step_offset: int = 0,
             on_slice: Callable[[int, np.ndarray], None] | None = None) -> None:
        """Sets which steps the stream delivers; only before the first `next_slice()`.

        For callers that must join first to decide (a DataLoader worker learns the start step
        from the job, then reads every `step_stride`-th step from it).
        """
        if self._thread is not None:
            raise StateError("plan() must be called before the first next_slice()")
        if start_step < 0 or (stop_step is not None and stop_step < 0) or step_stride < 1:
            raise ConfigError(f"bad plan: start {start_step}, stop {stop_step}, stride {step_stride} "
                              "(need start >= 0, stop >= 0, stride >= 1)")
        self._start_step = int(start_step)
        self._acks.start_at(int(start_step))
        self.stop_step = stop_step
        self.step_stride = int(step_stride)
        self.step_offset = int(step_offset) % self.step_stride
        if on_slice is not None:
            self._on_slice = on_slice

    def _first_step(self, start: int) -> int:
        """Smallest step >= start that this client's stride/offset delivers."""
        return start + (self.step_offset - start) % self.step_stride

    def _start_stream(self) -> None:
        self.transport()
        if self._thread is not None:
            return
        self.join()
        first = self._first_step(self.next_step)
        self._thread = threading.Thread(
            target=self._stream_loop, args=(first,), name=f"croupier-rank{self.topology.rank}-stream", daemon=True
        )
        self._thread.start()
        if not self.read_only:
            self._ack_thread = threading.Thread(
                target=self._acks.run, args=(self._closed, self._send_ack), name=f"croupier-rank{self.topology.rank}-ack",
                daemon=True)
            self._ack_thread.start()

    def _put(self, item: Any) -> bool:
        """Blocking put that gives up when the client closes."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _stream_loop(self, first: int) -> None:
        want = first  # next step this stream owes the consumer
        stop = self.stop_step or 0
        attempt = 0
        failing_since: float | None = None
        rejoin = False
        while not self._closed.is_set():
            if stop and want >= stop:
                self._put(_End())
                return
            ended = False
            try:
                if rejoin:
                    check_same_job(self._join.job, self._do_join("").job)
                    rejoin = False
                lane = pb2.LaneOpen(
                    lane=LANE, rank=self.topology.rank, world_size=self.topology.world, start_step=want,
                    lookahead=self.lookahead, step_stride=self.step_stride, step_offset=self.step_offset,
                    stop_step=stop, read_only=self.read_only,
                )
                # Every (re)connect re-sends the consumed position with the lane's opening: a
                # restarted server learns where this rank is, and a lost acknowledgement is made good.
                call = self.transport().open_lane(self.job, lane, self._ack_position())
                self._call = call
                if self._closed.is_set():
                    call.cancel()
                    return
                for response in call:
                    attempt, failing_since = 0, None
                    for ev in response.events:
                        if ev.error_code:
                            raise from_status(ev.error_code, ev.error, "Session")
                        self._acks.confirm(int(ev.acked_step))
                    for lane_slices in response.lanes:
                        for sl in lane_slices.slices:
                            if sl.step < want:
                                continue  # already delivered before a reconnect
                            if sl.step != want:
                                raise ClientError(f"server skipped from step {want} to step {sl.step} "
                                                  f"on rank {self.topology.rank}")
                            if sl.kind == pb2.SLICE_KIND_END_OF_DATA:
                                self._put(EndOfData(sl.step))
                                return
                            ids = slice_ids(sl)
                            spans = slice_spans(sl, len(ids))
                            if spans is None and self._join is not None and len(ids) != self._join.per_rank_batch:
                                raise ClientError(
                                    f"step {sl.step}: rank {self.topology.rank} got {len(ids)} ids, "
                                    f"expected {self._join.per_rank_batch}"
                                )
                            if self._on_slice is not None:
                                self._on_slice(sl.step, ids)
                            if not self._put((sl.step, ids, spans)):
                                return
                            want = sl.step + self.step_stride
                    if stop and want >= stop and not ended:
                        # The lane stays open until close(): the consumer's last acknowledgement
                        # travels on it, and the server's confirmation comes back on it.
                        ended = True
                        if not self._put(_End()):
                            return
                if self._closed.is_set() or ended:
                    return
                # The server ended the stream early (shutting down): reconnect like a failure.
                raise _Reconnect()
            except (ClientError, _Reconnect) as exc:
                self._call = None
                if self._closed.is_set():
                    return
                if isinstance(exc, ClientError) and not is_transient_code(exc.code):
                    self._put(exc)
                    return
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self._backoff.give_up_after_s:
                    details = exc.details if isinstance(exc, ClientError) else "stream ended"
                    self._put(Unavailable(
                        f"Session failed: {self._where} unreachable for "
                        f"{self._backoff.give_up_after_s:.0f} s: {details}"
                    ))
                    return
                level = logging.WARNING if attempt == 0 or attempt % 10 == 0 else logging.DEBUG
                log.log(level, "rank %d: stream from %s lost at step %d (%s); reconnecting",
                        self.topology.rank, self._where, want, exc)
                self._closed.wait(self._backoff.delay(attempt))
                attempt += 1
                rejoin = True
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                self._put(exc)
                return

    def next_slice(self, timeout: float | None = None) -> tuple[int, np.ndarray]:
        """The next (step, ids) of this rank, in step order.

        Raises EndOfData at the end of the sequence (or at stop_step), a ClientError subclass
        when the server refuses, Unavailable when it stays unreachable.
        """
        if self._closed.is_set():
            raise StateError("RankClient is closed")
        if self._finished:
            raise EndOfData(self.next_step, f"no steps left for rank {self.topology.rank} from step {self.next_step}")
        self._start_stream()
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise Unavailable(f"no slice from {self.address} within {timeout} s (step {self.next_step})") from None
        if isinstance(item, _End):
            self._finished = True
            self._send_ack(force=True)
            raise EndOfData(self.next_step, f"stop step {self.stop_step} reached")
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        step, ids, spans = item
        self.last_spans = spans
        self._acks.consumed(step)
        return step, ids

    def __iter__(self):
        """Yields (step, ids) until the end of the sequence or stop_step."""
        while True:
            try:
                yield self.next_slice()
            except EndOfData:
                return

    def _ack_position(self) -> int | None:
        """The consumed position to (re-)send, or None (read-only, not joined, nothing consumed)."""
        if self.read_only or self._join is None:
            return None
        return self._acks.position()

    def _send_ack(self, force: bool = False) -> None:
        """One acknowledgement of the consumed position, in-band on the open lane (see
        `Acknowledger.send`); never for a read-only client or before the join."""
        if self.read_only or self._join is None:
            return
        self._acks.send(self._call, force)

    # -- unary helpers ------------------------------------------------------------------------

    def get_slice(self, step: int) -> np.ndarray:
        """This rank's ids of `step`, by a single idempotent call (no stream)."""
        self.join()
        response = self._unary(
            "GetSlice", pb2.GetSliceRequest(job=self.job, rank=self.topology.rank, world_size=self.topology.world,
                                            step=step, packed_ids=True)
        )
        if response.slice.kind == pb2.SLICE_KIND_END_OF_DATA:
            raise EndOfData(step)
        return slice_ids(response.slice)

    def status(self, include_clusters: bool = False) -> Any:
        """The server's GetStatusResponse (job, progress, counters); does not join."""
        return self._unary("GetStatus", pb2.GetStatusRequest(include_clusters=include_clusters))

    def checkpoint(self, step: int | None = None, include_state: bool = False) -> str:
        """Makes the server's sampler state at `step` (default: the next step) durable; returns the token.

        With an explicit `step` this does not join, so a process that only checkpoints (a
        trainer's main process whose DataLoader workers read the slices) stays out of the job.
        include_state: also fetch the sampler state itself (`checkpoint_state`), which an
        embedded reader resumes from.
        """
        if step is None:
            self.join()
            step = self.next_step
        step = int(step)
        if step == self._token_step and self._token and (self._token_state or not include_state):
            return self._token
        response = self._unary("Checkpoint", pb2.CheckpointRequest(job=self.job, step=step,
                                                                   include_sampler_state=include_state))
        self._token, self._token_step = response.token, int(response.step)
        self._token_state = bytes(response.sampler_state)
        return self._token

    def checkpoint_state(self, step: int) -> bytes | None:
        """The sampler state of the last `checkpoint(step, include_state=True)`, or None."""
        return self._token_state or None if step == self._token_step else None

    # -- loss feedback ------------------------------------------------------------------------

    def report_losses(self, step: int, losses: Any, present: Any = None) -> None:
        """Reports the per-sample training losses of `step`: one float per id of this rank's
        slice of that step, in slice order (a tensor, array or list); `present` optionally
        marks which entries carry a loss. Returns at once: reports are batched and sent in the
        background (`client.loss_sender`), and a lost one only reduces what the server's
        controller (serve --adapt) learns. Works from any process of the rank (the report
        names the step; the server knows its ids), through a node agent too."""
        from croupier.client.loss_sender import LossSender

        if self._closed.is_set():
            raise ConfigError("the client is closed")
        if self._sender is None or self._sender_pid != os.getpid():
            self._sender = LossSender(self._send_losses)
            self._sender_pid = os.getpid()
        self._sender.add(step, losses, present)

    def loss_report_stats(self) -> dict[str, int]:
        """Steps queued, sent, accepted, refused and dropped by this process's reports."""
        return {} if self._sender is None else dict(self._sender.counters)

    def flush_losses(self, timeout: float = 5.0) -> bool:
        """Waits until the reports made so far were sent; False on timeout."""
        return True if self._sender is None else self._sender.flush(timeout)

    def _send_losses(self, batch: list) -> Any:
        from croupier.client.loss_sender import loss_request

        return self._unary("ReportLoss", loss_request(self.job, self.topology, batch), retry=False)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self, checkpoint: bool = True) -> dict[str, Any]:
        """The position to store with the trainer's checkpoint.

        {"version", "sampler_fingerprint", "next_step", "token"}; with `checkpoint`, the token
        comes from a Checkpoint call at next_step (a whole job can resume from it, at any
        world size); without, it is the last token this client obtained, possibly "".
        """
        self.join()
        token = self.checkpoint() if checkpoint else (self._token if self._token_step == self.next_step else "")
        return {
            "version": STATE_VERSION,
            "sampler_fingerprint": self._join.job.sampler_fingerprint,
            "next_step": int(self.next_step),
            "token": token,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes at the state's next step; refuses a state of another sampler (fingerprint).

        Must be called before the first slice is read.
        """
        validate_state(state)
        if self._thread is not None:
            raise StateError("load_state_dict must be called before the first next_slice()")
        expected = str(state["sampler_fingerprint"])
        if self._join is not None and self._join.job.sampler_fingerprint != expected:
            raise FingerprintMismatch("sampler", expected, self._join.job.sampler_fingerprint)
        self._expected_fingerprint = expected
        self._start_step = int(state["next_step"])
        self._acks.start_at(int(state["next_step"]) if self._join is not None else None)
        if state["token"] and self._join is None:
            self._resume_token = str(state["token"])
        self._finished = False

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Acknowledges what was consumed, stops the stream thread and closes the channel."""
        if self._closed.is_set():
            return
        if self._sender is not None and self._sender_pid == os.getpid():
            self._sender.close(timeout=5.0)
        mine = self._transport is not None and self._pid == os.getpid()
        call = self._call
        if mine and call is not None:
            # The last acknowledgement and the lane's close travel before the stream ends.
            self._send_ack()
        self._closed.set()
        self._acks.wake()
        if mine and call is not None:
            call.finish()  # the server ends the stream once the lane's close arrived
            if self._thread is not None:
                self._thread.join(timeout=2.0)
        call, thread, transport = self._call, self._thread, self._transport
        if mine and call is not None:
            call.cancel()
        if mine and thread is not None:
            thread.join(timeout=5.0)
        if mine and self._ack_thread is not None:
            self._ack_thread.join(timeout=5.0)
        if mine and transport is not None:
            transport.close()
        self._transport = None

    def __enter__(self) -> RankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Reconnect(Exception):
    """The server closed the stream before the client's stop step."""


__all__ = ["Backoff", "RankClient", "STATE_VERSION", "validate_state"]
