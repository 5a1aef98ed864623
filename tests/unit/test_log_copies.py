"""The sequence survives damage to its own records: a restarted job replays every delivered step
exactly, or refuses to start naming the damage — never a different id.

A job with online changes at steps 40, 90, 150 and 220 delivers 300 steps to one rank and
stops; its state directory is then damaged (a flipped byte, a cut, a deleted or emptied file)
in the event log, its copy and the generated-step mark, one at a time and at random, and a
new job opens the directory."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from croupier.errors import StateError
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.durability.log_copies import COPY_NAME
from croupier.server.durability.state_dir import StateDirInvalid
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from jobs import train_step

SIZES = [3000, 800, 200, 50, 10]
CONFIG = PolicyConfig(policy="weighted", weights=(1.0,) * 5, clip=3, on_exhausted="random")
STEPS = 300


def open_job(state: Path, every: int = 0, **kw) -> Job:
    return Job(ClusterLayout.from_sizes(SIZES), CONFIG, 16, 3, spec=JobSpec(checkpoint_every=every),
               store=CheckpointStore(state), **kw)


def run(state: Path, every: int = 0) -> list[np.ndarray]:
    """The job of the module docstring; the ids it delivered, step by step."""
    job = open_job(state, every)
    try:
        job.join(0, 1)
        out = []
        for step in range(STEPS):
            if step in (40, 220):
                job.update(step, clip=4 if step == 40 else 9)
            elif step in (90, 150):
                job.update(step, weights=[1.0 + (step % 7), 1, 2, 3, 5])
            out.append(train_step(job, 0, 1, step).copy())
        return out
    finally:
        job.close()


def replayed(state: Path, every: int = 0, **kw) -> list[np.ndarray]:
    """Every step again, from a new job on the same state directory (rank 0 starts over at 0)."""
    job = open_job(state, every, **kw)
    try:
        job.join(0, 1, resume_token="")
        job._reform_locked(0, 1)  # the rank reads from step 0 again, as a replaying reader would
        return [train_step(job, 0, 1, step).copy() for step in range(STEPS)]
    finally:
        job.close()


@pytest.fixture(scope="module")
def delivered(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    state = tmp_path_factory.mktemp("job") / "state"
    return state, run(state)


def copy_of(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 64
    path.write_bytes(bytes(data))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_the_issue_reproduction_a_flipped_byte_of_a_full_length_record_is_repaired(delivered, tmp_path):
    state = copy_of(delivered[0], tmp_path / "s")
    log = state / "events.log"
    flip(log, 223)  # inside the last record, which is whole: a checksum failure, not a torn write
    assert same(replayed(state), delivered[1])
    assert (state / "events.log").read_bytes() == (state / COPY_NAME).read_bytes()  # repaired from the copy


@pytest.mark.parametrize("damage", ["delete", "empty", "header", "flip-last", "cut"])
def test_damage_to_one_copy_is_repaired_from_the_other(delivered, tmp_path, damage: str) -> None:
    for name in ("events.log", COPY_NAME):
        state = copy_of(delivered[0], tmp_path / f"{damage}-{name}")
        path = state / name
        data = path.read_bytes()
        if damage == "delete":
            path.unlink()
        elif damage == "empty":
            path.write_bytes(b"")
        elif damage == "header":
            path.write_bytes(data[:12])
        elif damage == "flip-last":
            flip(path, len(data) - 10)
        else:
            path.write_bytes(data[:len(data) - 30])
        assert same(replayed(state), delivered[1]), (damage, name)


@pytest.mark.parametrize("damage", ["delete-both", "header-both", "flip-both", "cut-both"])
def test_a_change_lost_in_both_copies_refuses_the_start_naming_it(delivered, tmp_path, damage: str) -> None:
    state = copy_of(delivered[0], tmp_path / damage)
    for name in ("events.log", COPY_NAME):
        path = state / name
        data = path.read_bytes()
        if damage == "delete-both":
            path.unlink()
        elif damage == "header-both":
            path.write_bytes(data[:12])
        elif damage == "flip-both":
            flip(path, len(data) - 10)
        else:
            path.write_bytes(data[:len(data) - 30])
    with pytest.raises(StateDirInvalid, match=r"(?s)lost change.*acknowledged.*--fresh.*--accept-log-damage"):
        open_job(state)


def test_accept_log_damage_keeps_the_whole_changes_and_says_so(delivered, tmp_path, caplog) -> None:
    state = copy_of(delivered[0], tmp_path / "s")
    for name in ("events.log", COPY_NAME):
        data = (state / name).read_bytes()
        (state / name).write_bytes(data[:len(data) - 30])
    got = replayed(state, accept_log_damage=True)
    assert "accepting event log damage" in caplog.text
    assert same(got[:220], delivered[1][:220])  # before the lost change
    assert not same(got, delivered[1])  # after it, the sequence the log now holds
    mark = json.loads((state / "generated.mark").read_text())
    assert mark["events"] == 3  # the mark now records what the log holds
    assert same(replayed(state), got)  # and a further restart needs no flag


def test_a_torn_record_never_acknowledged_is_dropped(delivered, tmp_path) -> None:
    from croupier.server.durability.event_log import Event, record_bytes

    state = copy_of(delivered[0], tmp_path / "s")
    torn = record_bytes(b"x" * 40)[:-7]  # an append cut short by a crash: in the log, not in its copy
    with open(state / "events.log", "ab") as f:
        f.write(torn)
    assert Event  # the record format's own writer made it
    assert same(replayed(state), delivered[1])
    assert (state / "events.log").read_bytes() == (state / COPY_NAME).read_bytes()


def test_with_checkpoints_damage_after_the_newest_is_repaired_or_refused(tmp_path) -> None:
    state = tmp_path / "state"
    want = run(state, every=100)
    one = copy_of(state, tmp_path / "one")
    flip(one / "events.log", (one / "events.log").stat().st_size - 10)  # the change at 220, after checkpoint 200
    assert same(replayed(one, every=100), want)
    both = copy_of(state, tmp_path / "both")
    for name in ("events.log", COPY_NAME):
        flip(both / name, (both / name).stat().st_size - 10)
    with pytest.raises(StateDirInvalid, match="acknowledged"):
        open_job(both, every=100)


def test_random_damage_is_exact_or_refused(delivered, tmp_path) -> None:
    """Chaos: 40 directories, each with one to three random damages to the records; every
    outcome is the delivered sequence or a refusal."""
    rng = random.Random(29)
    outcomes = {"exact": 0, "refused": 0}
    for trial in range(40):
        state = copy_of(delivered[0], tmp_path / f"t{trial}")
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(["events.log", COPY_NAME, "generated.mark"])
            path = state / name
            if not path.exists():
                continue
            data = path.read_bytes()
            op = rng.choice(["flip", "cut", "delete", "empty"])
            if op == "flip" and data:
                flip(path, rng.randrange(len(data)))
            elif op == "cut":
                path.write_bytes(data[:rng.randrange(len(data) + 1)])
            elif op == "delete":
                path.unlink()
            else:
                path.write_bytes(b"")
        try:
            got = replayed(state)
        except (StateError, StateDirInvalid):
            outcomes["refused"] += 1
            continue
        assert same(got, delivered[1]), f"trial {trial}: a damaged record changed a delivered step"
        outcomes["exact"] += 1
    assert outcomes["exact"] + outcomes["refused"] == 40
    assert outcomes["exact"] >= 10 and outcomes["refused"] >= 1, outcomes


SIMULATE = ["simulate", "--cluster-sizes", ",".join(map(str, SIZES)), "--policy", "weighted", "--weights",
            "1,1,1,1,1", "--clip", "3", "--on-exhausted", "random", "--global-batch", "16", "--seed", "3",
            "--format", "jsonl", "--steps", str(STEPS)]


def test_simulate_state_dir_replays_a_job_without_a_checkpoint_and_checks_its_records(delivered, tmp_path,
                                                                                      capsys) -> None:
    from croupier.cli import main

    state = copy_of(delivered[0], tmp_path / "s")
    assert not list(state.glob("ckpt-*"))  # the job wrote no checkpoint: the mark and the log only
    flip(state / "events.log", 223)  # one copy damaged: the other gives the changes (nothing is repaired)
    assert main([*SIMULATE, "--state-dir", str(state)]) == 0
    lines = [json.loads(line)["indices"] for line in capsys.readouterr().out.splitlines()]
    assert same([np.array(x) for x in lines], delivered[1])
    assert (state / "events.log").read_bytes() != (state / COPY_NAME).read_bytes()
    for name in ("events.log", COPY_NAME):
        data = (state / name).read_bytes()
        (state / name).write_bytes(data[:len(data) - 30])
    assert main([*SIMULATE, "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert "lost change(s) the job acknowledged" in err and len(err.strip().splitlines()) == 1
    other = [*SIMULATE, "--state-dir", str(state)]
    other[other.index("--seed") + 1] = "4"
    copy_of(delivered[0], tmp_path / "t")
    other[-1] = str(tmp_path / "t")
    assert main(other) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_an_update_after_the_state_directory_was_removed_is_not_acknowledged(tmp_path) -> None:
    import shutil

    from croupier.server.job.types import CheckpointUnavailable

    state = tmp_path / "state"
    job = open_job(state)
    try:
        job.join(0, 1)
        job.update(10, clip=4)
        shutil.rmtree(state)
        with pytest.raises(CheckpointUnavailable, match="removed while the job ran"):
            job.update(20, clip=5)
        assert [c.step for c in job._seq.events] == [10]  # the refused change is not scheduled
    finally:
        job.close()
