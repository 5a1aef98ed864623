"""`croupier client dump` checks its arguments before connecting, gives up on an unreachable
server within --connect-timeout with one line, and says on stderr what it waits for."""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import pytest

from croupier.cli import main
from croupier.client.cli import dump_cli
from croupier.errors import EndOfData
from workers.harness import free_port

REFUSED = [
    (["--steps", "-1"], "--steps must be in [1, 9223372036854775807] (steps to print), got -1"),
    (["--steps", "0"], "--steps must be in [1, 9223372036854775807] (steps to print), got 0"),
    (["--start-step", str(2**63)], f"--start-step must be in [0, {2**63 - 1 - 4}]"),
    (["--start-step", "-3"], "--start-step must be in [0, "),
    (["--start-step", str(2**63 - 10), "--steps", "20"], "(the last step printed, start + --steps 20, must fit"),
    (["--world", "0"], "--world must be in [1, 2147483647] (ranks in the world), got 0"),
    (["--world", str(2**31)], f"--world must be in [1, 2147483647] (ranks in the world), got {2**31}"),
    (["--rank", "2", "--world", "2"], "--rank must be in [0, 1] (a rank of world 2), got 2"),
    (["--rank", "-1"], "--rank must be in [0, 0] (a rank of world 1), got -1"),
    (["--max-ids", "-2"], "--max-ids must be in [0, "),
    (["--connect-timeout", "0"], "--connect-timeout must be a finite number of seconds > 0"),
    (["--connect-timeout", "nan"], "--connect-timeout must be a finite number of seconds > 0"),
    (["--connect-timeout", "-5"], "got -5.0"),
]


@pytest.mark.parametrize(("extra", "words"), REFUSED)
def test_bad_arguments_are_one_line_before_anything_connects(extra, words, capsys) -> None:
    # The address is nobody's: a command that tried to connect would wait, not refuse at once.
    assert main(["client", "dump", "--server", f"127.0.0.1:{free_port()}", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("croupier client: error: ") and words in err, err


@pytest.mark.parametrize(("server", "words"), [
    ("nonsense", "--server must be HOST:PORT (or [IPv6]:PORT), got 'nonsense'"),
    ("127.0.0.1:99999", "--server '127.0.0.1:99999': the port must be in [1, 65535] (a TCP port), got 99999"),
    ("127.0.0.1:0", "the port must be in [1, 65535] (a TCP port), got 0"),
    ("host:", "--server must be HOST:PORT (or [IPv6]:PORT), got 'host:'"),
    ("::1:80", "--server must be HOST:PORT (or [IPv6]:PORT), got '::1:80'"),
])
def test_a_malformed_address_is_refused_in_one_line(server, words, capsys) -> None:
    assert main(["client", "dump", "--server", server]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_an_unreachable_server_fails_within_the_connect_timeout_in_one_line(capsys, monkeypatch) -> None:
    monkeypatch.setattr(dump_cli, "NOTE_AFTER_S", 3600.0)  # the wait note is tested below
    croupier_log = logging.getLogger("croupier")  # as a fresh process has it, whatever ran before
    monkeypatch.setattr(croupier_log, "handlers", [])
    monkeypatch.setattr(croupier_log, "propagate", True)
    port = free_port()
    assert main(["client", "dump", "--server", f"127.0.0.1:{port}", "--connect-timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # the client's per-retry warnings stay off the terminal
    assert err.startswith(f"croupier client: error: GetStatus failed: server 127.0.0.1:{port} unreachable for 1 s")


class Stderr(io.StringIO):
    """A stderr that tells when a note about step 3 was written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = threading.Event()

    def write(self, text: str) -> int:
        n = super().write(text)
        if "waiting for step 3 " in text:
            self.written.set()
        return n


class HeldClient:
    """A client whose step 3 comes only once the command has said it waits for it."""

    def __init__(self, told: threading.Event) -> None:
        self.next_step = 2
        self.told = told

    def next_slice(self):
        if self.next_step == 4:
            raise EndOfData(4)
        if self.next_step == 3:
            assert self.told.wait(30), "the wait was never told"
        step = self.next_step
        self.next_step += 1
        return step, np.arange(2)


def test_a_wait_for_a_step_is_told_on_stderr(monkeypatch) -> None:
    err = Stderr()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(dump_cli, "NOTE_AFTER_S", 0.01)
    got = [step for step, _ in dump_cli._steps(HeldClient(err.written), "h:1")]
    assert got == [2, 3]
    lines = [x for x in err.getvalue().splitlines() if "step 3 " in x]
    assert lines and lines[0].startswith("croupier client dump: waiting for step 3 from h:1: the server has not "
                                         "sent it yet")
