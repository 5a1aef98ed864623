"""Shared pieces of the client tests: a small real MDS dataset and a real server process.

Every sample carries its global id in the `id` column and a text derived from it, so a test
can check that what a rank decoded is what the shards hold for the id it was dealt.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
"""The scripts of the interpreter running the tests (croupier, torchrun), whichever environment it is."""
CROUPIER = str(VENV_BIN / "croupier")


def sample_text(i: int) -> str:
    """The text stored for sample `i` (varies in length so shards differ in size)."""
    return f"doc-{i:05d} " + "x" * (i % 17)


def write_mds(root: Path, num_samples: int, size_limit: int = 1 << 9, compression: str | None = None,
              hashes: list[str] | None = None) -> Path:
    """Writes samples 0..n-1 as MDS shards (columns id:int, text:str) under `root`; returns it."""
    from streaming import MDSWriter

    root.mkdir(parents=True, exist_ok=True)
    with MDSWriter(out=str(root), columns={"id": "int", "text": "str"}, size_limit=size_limit,
                   compression=compression, hashes=hashes) as writer:
        for i in range(num_samples):
            writer.write({"id": i, "text": sample_text(i)})
    return root


def cluster_sizes(num_samples: int, num_clusters: int) -> list[int]:
    """A long-tailed split of n samples into contiguous clusters (largest first)."""
    weights = 1.0 / np.arange(1, num_clusters + 1)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * num_samples)).astype(int)
    sizes[0] += num_samples - sizes.sum()
    return sizes.tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kills a process started with start_new_session=True and its whole group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def terminate(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[int, Any]:
    """SIGTERM, then the exit code and the rest of stdout within `timeout`.

    A process that does not stop in time is killed (its whole group when it leads one) before
    the TimeoutExpired reaches the test, so a failing test never leaves it running."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            leads_group = os.getpgid(proc.pid) == proc.pid
        except ProcessLookupError:
            leads_group = False
        if leads_group:
            kill_tree(proc, signal.SIGKILL)
        else:
            proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out


def read_records(out: Path) -> list[dict]:
    """Every JSON line the torchrun workers wrote, over all ranks."""
    records = []
    for path in sorted(out.glob("records.rank*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def env_for_subprocess() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CROUPIER_TOKEN", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def python() -> str:
    return sys.executable


def self_signed(tmp: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed TLS certificate and key for `name` and 127.0.0.1, written under `tmp`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "server.crt", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
