"""The unit tier: in-process only.

A test here that starts a process (a `croupier serve`, a CLI run as a subprocess, torchrun)
fails at once, naming the command, instead of slowing plain `pytest` down: such a test
belongs in `integration/` (or `e2e/`). Threads, in-process gRPC servers and forked
DataLoader workers are fine.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_LIBRARY_PROBES = ("ctypes/util.py", "platform.py")
"""Library code that runs a helper while importing (ctypes' `ldconfig -p`): not the test's process."""


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    launch = subprocess.Popen.__init__

    def refuse(self: subprocess.Popen, args: object, *rest: object, **kw: object) -> None:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename.endswith(_LIBRARY_PROBES):
                launch(self, args, *rest, **kw)  # type: ignore[arg-type]
                return
            frame = frame.f_back
        raise AssertionError(f"{request.node.nodeid} starts a process ({str(args)[:120]}): a unit test runs "
                             "in-process; move it to tests/integration/")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
