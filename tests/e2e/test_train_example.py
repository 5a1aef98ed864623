"""The trainer example as a user runs it: `croupier serve` on a built dataset, then
`torchrun -m croupier.apps.train_example` on 2 ranks with 2 DataLoader workers each, packed
sequences through StatefulDataLoader; a run that crashes mid-way and resumes from its
checkpoint trains on exactly the uninterrupted run's tokens, with the same losses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from croupier.apps.demo import RUN_TAG_ENV, kill_tagged
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.synthetic import generate_corpus, write_jsonl
from workers.harness import free_port, terminate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _torchrun(tmp_path: Path, address: str, tokenizer: Path, run: str, *extra: str) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "croupier.apps.train_example", "--server", address, "--job", "example", "--tokenizer", str(tokenizer),
           "--cache", str(tmp_path / "cache"), "--run-dir", str(tmp_path / run), "--steps", "6",
           "--seq-len", "32", "--rows", "2", "--ckpt-every", "2", *extra]
    with open(tmp_path / f"{run}.log", "a") as log:
        # torchrun starts each rank in a session of its own: tag the environment, which the ranks
        # and their DataLoader workers inherit, so that nothing outlives the test
        tag = f"train-example-{uuid.uuid4().hex}"
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1", **{RUN_TAG_ENV: tag}))
        try:
            return proc.wait(300)
        finally:
            kill_tagged(tag)


def _records(tmp_path: Path, run: str) -> dict[tuple[int, int], dict]:
    out: dict[tuple[int, int], dict] = {}
    for rank in (0, 1):
        for line in (tmp_path / run / f"log.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out[(rec["step"], rank)] = rec  # a step trained again after a crash: the resumed one counts
    return out


def test_crashed_training_resumes_on_exactly_the_same_tokens(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "in.jsonl", generate_corpus(300, 4, seed=2))
    data = tmp_path / "data"
    build(BuildConfig(out=str(data), inputs=(str(tmp_path / "in.jsonl"),), embedder="hashing", clusters=4,
                      layout="cluster-major", shard_size=1 << 15, progress=False))
    log = open(tmp_path / "server.log", "w")
    try:
        server = subprocess.Popen([sys.executable, "-m", "croupier", "serve", str(data), "--policy", "clusterclip",
                                   "--clip", "4", "--global-batch", "8", "--state-dir", str(tmp_path / "state"),
                                   "--port", "0", "--job", "example"],
                                  stdout=subprocess.PIPE, stderr=log, text=True)
    except BaseException:
        log.close()
        raise
    try:
        address = json.loads(server.stdout.readline())["address"]
        assert _torchrun(tmp_path, address, tiny_tokenizer, "whole") == 0, (tmp_path / "whole.log").read_text()[-4000:]
        assert _torchrun(tmp_path, address, tiny_tokenizer, "crash", "--stop-after", "4") != 0
        assert json.loads((tmp_path / "crash" / "ckpt" / "latest.json").read_text()) == {"step": 4}
        assert _torchrun(tmp_path, address, tiny_tokenizer, "crash", "--resume") == 0, \
            (tmp_path / "crash.log").read_text()[-4000:]
    finally:
        terminate(server, 30)  # and its pipes closed
        log.close()
    whole, crashed = _records(tmp_path, "whole"), _records(tmp_path, "crash")
    assert sorted(whole) == sorted(crashed) == [(s, r) for s in range(6) for r in (0, 1)]
    for key in whole:
        assert whole[key]["tokens"] == crashed[key]["tokens"], key
        assert math.isclose(whole[key]["loss"], crashed[key]["loss"], rel_tol=1e-5), key
    assert whole[(0, 0)]["tokens"] != whole[(0, 1)]["tokens"]  # the two ranks read different slices
