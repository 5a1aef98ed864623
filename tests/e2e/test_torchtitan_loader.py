"""torchtitan proof: 2 torchrun data-parallel ranks (gloo, CPU) train a tiny GPT-2 from a config
on croupier's packed slices through torchtitan 0.3's dataloader interface
(`CroupierTitanDataLoader.Config(...).build(dp_world_size=, dp_rank=, tokenizer=, ...)`, with
torchtitan's `HuggingFaceTokenizer`), checkpointed with DCP as torchtitan's checkpointer does
(croupier/integrations/examples/torchtitan_train.py; torchtitan's own trainer needs a CUDA
device). One run trains 20 steps; another is ended with `os._exit` after 12 steps and resumed
from its step-10 DCP checkpoint, once on 2 DP ranks (each rank's own `dp_rank_{r}` entry: the
tokens every rank trained on, in order, equal the uninterrupted run's) and once on 1 DP rank
(where torchtitan's loader refuses the state: the global step continues the sequence). Every
rank's documents per step equal `croupier simulate`'s slice for that rank and world.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from workers.harness import CROUPIER, REPO, VENV_BIN, env_for_subprocess, free_port, kill_tree

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLE = REPO / "croupier" / "integrations" / "examples" / "torchtitan_train.py"
STEPS, CRASH, RESUME, B, SEED = 20, 12, 10, 8, 4
EOS = "102"  # the tiny WordPiece tokenizer's [SEP] (it has no EOS token)


def torchrun(tmp: Path, ds: Path, tok: Path, nproc: int, name: str, *extra: str) -> int:
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(EXAMPLE), "--dataset", str(ds), "--cache", str(tmp / "cache"), "--tokenizer", str(tok),
           "--eos-id", EOS, "--global-batch", str(B), "--seed", str(SEED), "--clip", "3", "--steps", str(STEPS),
           "--ckpt-dir", str(tmp / name / "ckpt"), "--records", str(tmp / name / "records"), *extra]
    (tmp / name).mkdir(exist_ok=True)
    log = tmp / name / f"torchrun{len(list((tmp / name).glob('torchrun*.log')))}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env_for_subprocess(), cwd=str(tmp))
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise AssertionError(f"torchrun {name} hung:\n{log.read_text()[-4000:]}") from None
    if rc != 0 and "--crash-at-step" not in extra:
        raise AssertionError(f"torchrun {name} ended with {rc}:\n{log.read_text()[-6000:]}")
    return rc


def records(tmp: Path, name: str, rank: int) -> list[dict]:
    path = tmp / name / f"records.rank{rank}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def simulated(ds: Path, world: int, rank: int) -> list[list[int]]:
    out = subprocess.run([CROUPIER, "simulate", "--dataset", str(ds), "--policy", "clusterclip", "--clip", "3",
                          "--global-batch", str(B), "--seed", str(SEED), "--steps", str(STEPS), "--world", str(world),
                          "--rank", str(rank), "--format", "jsonl"], capture_output=True, text=True, check=True,
                         env=env_for_subprocess())
    return [json.loads(line)["indices"] for line in out.stdout.splitlines()]


def test_dp_ranks_resume_exactly_and_a_new_dp_degree_continues_the_global_sequence(
        tmp_path, build_dataset, tiny_tokenizer):
    import torch.distributed.checkpoint as dcp

    ds = build_dataset(tmp_path / "data")
    torchrun(tmp_path, ds, tiny_tokenizer, 2, "whole")
    assert torchrun(tmp_path, ds, tiny_tokenizer, 2, "crash", "--crash-at-step", str(CRASH)) != 0
    ckpt = tmp_path / "crash" / "ckpt" / f"step-{RESUME}"
    keys = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert {"dataloader.dp_rank_0", "dataloader.dp_rank_1", "dataloader.world_size", "dataloader.croupier_global"} <= keys
    torchrun(tmp_path, ds, tiny_tokenizer, 2, "crash", "--resume", str(ckpt), "--attempt", "1")
    torchrun(tmp_path, ds, tiny_tokenizer, 1, "one", "--resume", str(ckpt), "--attempt", "1")

    whole = {r: records(tmp_path, "whole", r) for r in (0, 1)}
    for rank in (0, 1):
        assert [r["step"] for r in whole[rank]] == list(range(STEPS))
        assert [r["docs"] for r in whole[rank]] == simulated(ds, 2, rank)
        crashed = records(tmp_path, "crash", rank)
        first = [r for r in crashed if r["attempt"] == 0]
        second = [r for r in crashed if r["attempt"] == 1]
        assert [r["step"] for r in first] == list(range(CRASH))
        assert [r["step"] for r in second] == list(range(RESUME, STEPS))
        assert [r["train_step"] for r in second] == list(range(RESUME + 1, STEPS + 1))
        resumed = first[:RESUME] + second
        assert [r["tokens"] for r in resumed] == [r["tokens"] for r in whole[rank]]
        assert [r["docs"] for r in resumed] == [r["docs"] for r in whole[rank]]
        assert [r["tokens"] for r in first[RESUME:]] == [r["tokens"] for r in second[:CRASH - RESUME]]
        assert all(r["resumed_from_degree"] is None for r in second)
        for r in whole[rank]:
            m = r["metrics"]
            assert m["croupier/data_wait_s"] >= 0 and m["croupier/tokens_dropped"] == 0
            assert m["croupier/steps"] == r["step"] + 1 and m["croupier/documents"] == (r["step"] + 1) * B // 2

    one = records(tmp_path, "one", 0)
    assert [r["step"] for r in one] == list(range(RESUME, STEPS))
    assert all(r["world"] == 1 and r["resumed_from_degree"] == 2 and r["carry_dropped_on_resume"] == 0 for r in one)
    assert [r["docs"] for r in one] == simulated(ds, 1, 0)[RESUME:]
    assert [r["docs"] for r in one] == [a["docs"] + b["docs"] for a, b in zip(whole[0][RESUME:], whole[1][RESUME:])]
