"""Lightning proof: 2 ranks (gloo, CPU) train a tiny GPT-2 from a config on a croupier job of
2 ranks (embedded dealing), through `CroupierDataModule`
(croupier/integrations/examples/lightning_train.py). One run trains 20 steps uninterrupted
under torchrun; another is ended with `os._exit` on every rank after 12 steps and resumed
from Lightning's own step-10 checkpoint (`ckpt_path`) under Lightning's own launcher
(`devices=2`). Every rank's trained samples, in order, equal the uninterrupted run's and
`croupier simulate`'s slices for that rank; the two steps trained again after the resume were
dealt what they were dealt before the crash; the data wait and the loader counters reach
Lightning's logger.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from workers.harness import CROUPIER, REPO, VENV_BIN, env_for_subprocess, free_port, kill_tree, terminate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLE = REPO / "croupier" / "integrations" / "examples" / "lightning_train.py"
STEPS, CRASH, RESUME, B, SEED = 20, 12, 10, 8, 3
POLICY = ["--policy", "clusterclip", "--clip", "3", "--global-batch", str(B), "--seed", str(SEED)]


def launch(tmp: Path, ds: Path | None, tok: Path, name: str, *extra: str, lightning_launcher: bool = False) -> int:
    """The example on 2 processes: torchrun, or Lightning's own launcher (`--devices 2`)."""
    start = ([sys.executable, str(EXAMPLE), "--devices", "2"] if lightning_launcher else
             [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(EXAMPLE)])
    cmd = [*start, *(["--dataset", str(ds)] if ds is not None else []), "--cache", str(tmp / "cache"), "--tokenizer", str(tok),
           *POLICY, "--steps", str(STEPS), "--ckpt-dir", str(tmp / name / "ckpt"),
           "--records", str(tmp / name / "records"), *extra]
    (tmp / name).mkdir(exist_ok=True)
    log = tmp / name / f"torchrun{len(list((tmp / name).glob('torchrun*.log')))}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env_for_subprocess(), cwd=str(tmp))
        try:
            return proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise AssertionError(f"torchrun {name} hung:\n{log.read_text()[-4000:]}") from None


def records(tmp: Path, name: str, rank: int) -> list[dict]:
    path = tmp / name / f"records.rank{rank}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def simulated(ds: Path, rank: int) -> list[list[int]]:
    out = subprocess.run([CROUPIER, "simulate", "--dataset", str(ds), *POLICY, "--steps", str(STEPS), "--world", "2",
                          "--rank", str(rank), "--format", "jsonl"], capture_output=True, text=True, check=True,
                         env=env_for_subprocess())
    return [json.loads(line)["indices"] for line in out.stdout.splitlines()]


def test_every_rank_resumes_exactly_from_a_lightning_checkpoint(tmp_path, build_dataset, tiny_tokenizer):
    ds = build_dataset(tmp_path / "data")
    rc = launch(tmp_path, ds, tiny_tokenizer, "whole")
    assert rc == 0, (tmp_path / "whole" / "torchrun0.log").read_text()[-6000:]
    rc = launch(tmp_path, ds, tiny_tokenizer, "crash", "--crash-at-step", str(CRASH))
    assert rc != 0, "the run was to be ended after step 12"
    ckpt = tmp_path / "crash" / "ckpt" / f"step={RESUME}.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (tmp_path / "crash" / "ckpt").iterdir())
    rc = launch(tmp_path, ds, tiny_tokenizer, "crash", "--resume", str(ckpt), "--attempt", "1",
                lightning_launcher=True)
    assert rc == 0, (tmp_path / "crash" / "torchrun1.log").read_text()[-6000:]

    for rank in (0, 1):
        whole = records(tmp_path, "whole", rank)
        assert [r["step"] for r in whole] == list(range(STEPS))
        crashed = records(tmp_path, "crash", rank)
        first = [r for r in crashed if r["attempt"] == 0]
        second = [r for r in crashed if r["attempt"] == 1]
        assert [r["step"] for r in first] == list(range(CRASH))
        assert [r["step"] for r in second] == list(range(RESUME, STEPS))
        assert [r["global_step"] for r in second] == list(range(RESUME, STEPS))
        resumed = [r["ids"] for r in first[:RESUME]] + [r["ids"] for r in second]
        assert resumed == [r["ids"] for r in whole]
        assert resumed == simulated(ds, rank)
        # the steps trained before the crash and again after it were dealt the same samples
        assert [r["ids"] for r in first[RESUME:]] == [r["ids"] for r in second[:CRASH - RESUME]]

    with open(tmp_path / "whole" / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("croupier/step")]
    assert [int(float(r["croupier/step"])) for r in logged] == list(range(STEPS))
    assert all(float(r["croupier/data_wait_s"]) >= 0 for r in logged)
    assert [int(float(r["croupier/samples"])) for r in logged] == [B // 2 * (i + 1) for i in range(STEPS)]


def test_a_served_job_resumes_exactly_from_a_lightning_checkpoint(tmp_path, build_dataset, tiny_tokenizer):
    """The same crash and resume against `croupier serve` (the ranks rejoin the live job at the
    checkpoint's step); the whole-run comparison is the embedded test's, which deals what this job deals."""
    ds = build_dataset(tmp_path / "data")
    server = subprocess.Popen([CROUPIER, "serve", str(ds), *POLICY, "--state-dir", str(tmp_path / "state"),
                               "--port", "0", "--job", "lightning", "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env_for_subprocess())
    try:
        address = json.loads(server.stdout.readline())["address"]
        served = ["--server", address, "--job", "lightning"]
        rc = launch(tmp_path, None, tiny_tokenizer, "served", *served, "--crash-at-step", str(CRASH))
        assert rc != 0, "the run was to be ended after step 12"
        ckpt = tmp_path / "served" / "ckpt" / f"step={RESUME}.ckpt"
        rc = launch(tmp_path, None, tiny_tokenizer, "served", *served, "--resume", str(ckpt), "--attempt", "1",
                    lightning_launcher=True)
        assert rc == 0, (tmp_path / "served" / "torchrun1.log").read_text()[-6000:]
    finally:
        terminate(server, 60)
    for rank in (0, 1):
        rows = records(tmp_path, "served", rank)
        first = [r for r in rows if r["attempt"] == 0]
        second = [r for r in rows if r["attempt"] == 1]
        assert [r["step"] for r in first] == list(range(CRASH))
        assert [r["step"] for r in second] == list(range(RESUME, STEPS))
        assert [r["ids"] for r in first[:RESUME] + second] == simulated(ds, rank)
        assert [r["ids"] for r in first[RESUME:]] == [r["ids"] for r in second[:CRASH - RESUME]]
