"""One `Session` call (the node agents' protocol) driven from a test: `send` messages, `read`
responses with a timeout; the tests of lanes use it instead of a real agent when they need to
see each message."""

from __future__ import annotations

import queue
import threading

import grpc

from croupier.proto import pb2, pb2_grpc


class Session:
    """A Session of job `job`: `send(**SessionRequest fields)`, `read(timeout)` (None when
    nothing came), `close()`."""

    def __init__(self, stub: pb2_grpc.SamplerStub, job: str = "demo") -> None:
        self.job = job
        self._out: queue.Queue = queue.Queue()
        self._in: queue.Queue = queue.Queue()
        self._call = stub.Session(iter(self._out.get, None))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for resp in self._call:
                self._in.put(resp)
        except grpc.RpcError as exc:
            self._in.put(exc)

    def send(self, **fields) -> None:
        self._out.put(pb2.SessionRequest(job=self.job, **fields))

    def read(self, timeout: float = 10.0) -> pb2.SessionResponse | None:
        try:
            got = self._in.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(got, Exception):
            raise got
        return got

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
