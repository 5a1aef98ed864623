"""`croupier serve` as a subprocess for integration tests: started, its "serving" line read, a
channel to it, killed or closed (idempotent) whatever happens to the test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from croupier.grpc_options import channel_options
from croupier.proto import pb2, pb2_grpc
from workers.harness import kill_tree


class ServeProcess:
    """A `croupier serve ARGS --state-dir DIR EXTRA` subprocess; `info` is its JSON "serving" line.

    `kill(sig)` sends a signal and returns the exit code; `close()` (idempotent) kills it if it
    still runs and closes its pipe, channel and log. A start that fails raises RuntimeError
    with the end of its log."""

    def __init__(self, args: list[str], state_dir: Path, log_path: Path, extra: list[str] | None = None) -> None:
        self.log_path = log_path
        self.channel: grpc.Channel | None = None
        self._log = open(log_path, "ab")
        cmd = [sys.executable, "-m", "croupier", "serve", *args, "--state-dir", str(state_dir), *(extra or [])]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True)
        except BaseException:
            self._log.close()
            raise
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(10)
                raise RuntimeError(f"server exited {self.proc.returncode}: {log_path.read_text()[-2000:]}")
            self.info = json.loads(line)
            self.channel = grpc.insecure_channel(self.info["address"], options=channel_options())
            self.stub = pb2_grpc.SamplerStub(self.channel)
        except BaseException:
            self.close()
            raise

    def status(self) -> pb2.GetStatusResponse:
        return self.stub.GetStatus(pb2.GetStatusRequest(), timeout=20)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Sends `sig`, waits for the exit and closes everything; the exit code."""
        if self.channel is not None:
            self.channel.close()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        finally:
            self.close()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        kill_tree(self.proc)  # a no-op once it has exited
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
