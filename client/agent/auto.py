"""`CROUPIER_AGENT=auto`: the node's local rank 0 starts the agent when none is running.

For jobs whose launcher cannot start a per-node process beside torchrun. Every rank of the
node derives the same runtime directory from the server address and job name (under
`$CROUPIER_RUNTIME_DIR`, default `/tmp/croupier-<uid>`); local rank 0 starts
`croupier agent` there (detached, logging to `agent.log`, cache in `$CROUPIER_AGENT_CACHE`
or `<runtime dir>/cache`, exiting after a minute without consumers) unless the directory's
lock shows one running; every rank then waits for the socket and talks only to that agent,
exactly as with an explicit `CROUPIER_AGENT=DIR`. The process that started the agent reaps
it when it exits (a thread waits on it), so an agent that stops while the rank goes on
leaves no zombie behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from croupier.client.agent.protocol import LOCK_NAME, socket_path
from croupier.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
RUNTIME_ENV = "CROUPIER_RUNTIME_DIR"
CACHE_ENV = "CROUPIER_AGENT_CACHE"
IDLE_EXIT_S = 60.0
"""An automatically started agent exits after this long without consumers."""
START_TIMEOUT_S = 120.0

_started: set[subprocess.Popen] = set()
"""Agents this process started and has not reaped yet (each has a thread waiting on it)."""


def auto_runtime_dir(address: str, job: str) -> Path:
    """The runtime directory every rank of a node derives for (server, job)."""
    root = Path(os.environ.get(RUNTIME_ENV) or f"/tmp/croupier-{os.getuid()}")
    tag = hashlib.sha256(f"{address}\0{job}".encode()).hexdigest()[:10]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in job)[:24] or "job"
    return root / f"{safe}-{tag}"


def agent_running(runtime: Path) -> bool:
    """Whether an agent holds the runtime directory's lock."""
    try:
        fd = os.open(runtime / LOCK_NAME, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise ConfigError(f"cannot open the node agent's lock {str(runtime / LOCK_NAME)!r}: {exc.strerror or exc}"
                          ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def ensure_agent(address: str, job: str, tls_root_cert: str | os.PathLike[str] | None = None,
                 tls_server_name: str | None = None) -> str:
    """The runtime directory of this node's agent for (address, job), started by local rank 0
    when none runs (with the rank's TLS flags); waits until its socket is up."""
    runtime = auto_runtime_dir(address, job)
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and not agent_running(runtime):
        try:
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"CROUPIER_AGENT=auto: cannot create the agent's runtime directory {str(runtime)!r} "
                              f"(under ${RUNTIME_ENV} or /tmp): {exc.strerror or exc}") from None
        cache = os.environ.get(CACHE_ENV) or str(runtime / "cache")
        cmd = [sys.executable, "-m", "croupier", "agent", "--server", address, "--runtime-dir", str(runtime),
               "--cache-dir", cache, "--job", job, "--exit-when-idle", str(IDLE_EXIT_S)]
        if tls_root_cert:
            cmd += ["--tls-ca", str(tls_root_cert)]
            if tls_server_name:
                cmd += ["--tls-server-name", tls_server_name]
        with open(runtime / "agent.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, close_fds=True)
        _started.add(proc)
        threading.Thread(target=_reap, args=(proc,), name="croupier-agent-reaper", daemon=True).start()
        log.info("started the node agent for %s (job %s) in %s", address, job, runtime)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (socket_path(runtime).exists() and agent_running(runtime)):
        if time.monotonic() > deadline:
            raise ConfigError(f"CROUPIER_AGENT=auto: no agent came up in {runtime} within {START_TIMEOUT_S:.0f} s "
                              f"(local rank 0 starts it; see {runtime / 'agent.log'})")
        time.sleep(0.1)
    return str(runtime)


def _reap(proc: subprocess.Popen) -> None:
    """Waits for an agent this process started to exit, and forgets it."""
    proc.wait()
    _started.discard(proc)
