"""The Hugging Face Trainer integration as a user runs it: `croupier serve --adapt` on a built dataset,
then `croupier.integrations.hf_train` (a tiny GPT-2 from a config, `CroupierTrainer` on packed
sequences, one DataLoader worker per rank) on 2 ranks, gloo on CPU.

An uninterrupted run of 20 steps under `accelerate launch`; a torchrun run ended by
`os._exit` right after the Trainer's checkpoint of step 10 and resumed from that checkpoint.
Every rank trained, step by step and in order, on the slice ids `croupier simulate` deals it
and on the same tokens in both runs (so nothing re-sharded, skipped or repeated, across the
crash and across launchers), and the per-sample losses the second run reported arrived at
the server: its report counters count every step of every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from croupier.apps.demo import RUN_TAG_ENV, kill_tagged
from workers.harness import free_port, terminate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, CRASH, BATCH, CLIP, JOB = 20, 10, 8, 4, "hf"


def _launch(launcher: list[str], tmp: Path, address: str, tokenizer: Path, run: str, *extra: str) -> int:
    cmd = [*launcher, "-m", "croupier.integrations.hf_train", "--server", address, "--job", JOB,
           "--tokenizer", str(tokenizer), "--cache", str(tmp / "cache"), "--output-dir", str(tmp / run),
           "--max-steps", str(STEPS), "--save-steps", "5", "--start-step", "0", "--seq-len", "64", "--rows", "2",
           "--workers", "1", "--record", *extra]
    with open(tmp / f"{run}.log", "a") as log:
        # the launchers start ranks in sessions of their own: tag the environment the ranks and their
        # DataLoader workers inherit, so that nothing outlives the test
        tag = f"hf-trainer-{uuid.uuid4().hex}"
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **{RUN_TAG_ENV: tag}))
        try:
            return proc.wait(400)
        finally:
            kill_tagged(tag)


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


def _accelerate() -> list[str]:
    # --multi_gpu picks accelerate's torchrun launcher; the ranks run on the CPU (gloo), as the example
    # chooses when no GPU is there
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def _records(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"record.rank{rank}.jsonl").read_text().splitlines()]


def _simulated(data: Path, rank: int) -> list[list[int]]:
    out = subprocess.run([sys.executable, "-m", "croupier", "simulate", "--dataset", str(data), "--policy",
                          "clusterclip", "--clip", str(CLIP), "--global-batch", str(BATCH), "--steps", str(STEPS),
                          "--world", "2", "--rank", str(rank), "--format", "jsonl"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["step"] for r in rows] == list(range(STEPS))
    return [r["indices"] for r in rows]


def test_trainer_resumes_exactly_and_reports_losses(tmp_path, build_dataset, tiny_tokenizer):
    data = build_dataset(tmp_path)
    log = open(tmp_path / "server.log", "w")
    try:
        server = subprocess.Popen([sys.executable, "-m", "croupier", "serve", str(data), "--policy", "clusterclip",
                                   "--clip", str(CLIP), "--global-batch", str(BATCH), "--state-dir",
                                   str(tmp_path / "state"), "--port", "0", "--job", JOB, "--adapt", "loss-softmax",
                                   "--adapt-every", "1000", "--log-level", "WARNING"],
                                  stdout=subprocess.PIPE, stderr=log, text=True)
    except BaseException:
        log.close()
        raise
    try:
        address = json.loads(server.stdout.readline())["address"]
        assert _launch(_accelerate(), tmp_path, address, tiny_tokenizer, "whole") == 0, \
            (tmp_path / "whole.log").read_text()[-4000:]
        assert _launch(_torchrun(), tmp_path, address, tiny_tokenizer, "crash", "--report-losses",
                       "--crash-after", str(CRASH)) != 0
        crash = tmp_path / "crash"
        assert sorted(p.name for p in (crash / f"checkpoint-{CRASH}").glob("croupier_loader.*")) == \
            ["croupier_loader.rank0.pt", "croupier_loader.rank1.pt"]
        assert [len(_records(crash, r)) for r in (0, 1)] == [CRASH, CRASH]
        assert _launch(_torchrun(), tmp_path, address, tiny_tokenizer, "crash", "--report-losses", "--resume") == 0, \
            (tmp_path / "crash.log").read_text()[-4000:]
        status = json.loads(subprocess.run([sys.executable, "-m", "croupier", "status", "--server", address,
                                            "--json"], capture_output=True, text=True, check=True).stdout)
    finally:
        terminate(server, 30)
        log.close()
    reported = 0
    slices = []
    for rank in (0, 1):
        whole, crashed = _records(tmp_path / "whole", rank), _records(crash, rank)
        expected = _simulated(data, rank)
        assert [r["global_step"] for r in crashed] == [r["global_step"] for r in whole] == list(range(1, STEPS + 1))
        assert [r["step"] for r in crashed] == [r["step"] for r in whole] == list(range(STEPS))
        assert [r["ids"] for r in whole] == [r["ids"] for r in crashed] == expected
        assert [r["tokens"] for r in whole] == [r["tokens"] for r in crashed]
        assert all(r["reported"] is None for r in whole)
        reported += sum(r["reported"] for r in crashed)
        slices.append(expected)
    assert slices[0] != slices[1]  # the ranks read different slices
    adapt = status["adapt"]
    assert (adapt["reports_accepted"], adapt["reports_refused"]) == (2 * STEPS, 0)
    assert adapt["samples_reported"] == reported > 0
