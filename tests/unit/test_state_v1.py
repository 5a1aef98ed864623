"""A state directory written by the v1 server resumes exactly (test data: tests/data/state_v1/).

The folders were written once by the server of commit 923a3a5 (`tests/data/make_state_v1.py`
says how) and are never regenerated: today's job must open them, keep every step already
delivered identical, and go on with the steps that `Sampler` and `croupier simulate
--state-dir` give. A few ids are pinned here as well, so the data and the code cannot drift
together.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from croupier.cli import main
from croupier.layout import ClusterLayout
from croupier.server.durability.change_log import read_changes
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.durability.event_log import iter_events
from croupier.server.feedback.adapt import AdaptSpec
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from jobs import get_slice

DATA = next(p / "data" / "state_v1" for p in Path(__file__).resolve().parents if (p / "data" / "state_v1").is_dir())
"""tests/data/state_v1, wherever in tests/ this file lives."""
B, SEED, WORLD = 16, 7, 2
BASIC_SIZES = [500, 120, 30, 7]
ADAPT_SIZES = [60, 60, 60, 60]
RESUMED_FROM = {"basic": 30, "adaptive": 27}
# Pinned: the first four ids of a few delivered steps, and of steps served after the resume.
GOLDEN_DELIVERED = {
    "basic": {0: [577, 633, 652, 653], 17: [401, 522, 530, 606], 35: [285, 138, 380, 451]},
    "adaptive": {0: [98, 137, 239, 198], 17: [47, 55, 54, 43], 26: [33, 14, 15, 26]},
}


def token_counts(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) % 7 + 3).astype(np.int64)


def sizes(name: str) -> list[int]:
    return BASIC_SIZES if name == "basic" else ADAPT_SIZES


def policy(name: str) -> PolicyConfig:
    return PolicyConfig("clusterclip", clip=4 if name == "basic" else 20)


def open_job(name: str, state: Path) -> Job:
    spec = JobSpec(name="v1" if name == "basic" else "v1a", max_lag=8, max_lookahead=4, checkpoint_every=10,
                   snapshot_every=4)
    if name == "basic":
        return Job(ClusterLayout.from_sizes(BASIC_SIZES), policy(name), B, SEED, spec=spec, store=CheckpointStore(state))
    return Job(ClusterLayout.from_sizes(ADAPT_SIZES), policy(name), B, SEED, spec=spec, store=CheckpointStore(state),
               adapt=AdaptSpec("loss-softmax", every=5), token_counts=[(0, token_counts(sum(ADAPT_SIZES)))])


def recorded(name: str) -> dict[str, Any]:
    d = json.loads((DATA / name / "delivered.json").read_text())
    d["delivered"] = {int(t): np.array(ids, dtype=np.int64) for t, ids in d["delivered"].items()}
    return d


def reference(name: str, n: int) -> list[np.ndarray]:
    """The job's sequence from step 0: the sampler with the job's online changes."""
    s = Sampler(ClusterLayout.from_sizes(sizes(name)), policy(name), B, SEED)
    if name == "basic":  # the operator's changes, as make_state_v1.py made them
        s.schedule(16, clip=2)
        s.schedule(26, weights=[1.0, 3.0, 1.0, 2.0])
        s.schedule(36, clip=3)
    else:  # the controller's proposals and one operator clip, from the event log
        changes = read_changes(DATA / name)
        assert [(c.step, c.origin) for c in changes] == [(5, "loss-softmax"), (10, "loss-softmax"), (13, ""),
                                                        (15, "loss-softmax"), (20, "loss-softmax"),
                                                        (25, "loss-softmax")]
        for c in changes:
            s.schedule_change(c)
    return [s.next_batch() for _ in range(n)]


def simulated(name: str, state: Path, steps: int, capsys: pytest.CaptureFixture[str]) -> list[np.ndarray]:
    capsys.readouterr()
    assert main(["simulate", "--state-dir", str(state), "--cluster-sizes", ",".join(map(str, sizes(name))),
                 "--global-batch", str(B), "--seed", str(SEED), "--format", "jsonl", "--steps", str(steps)]) == 0
    return [np.array(json.loads(line)["indices"]) for line in capsys.readouterr().out.splitlines()]


def step_ids(job: Job, step: int, world: int = WORLD) -> np.ndarray:
    return np.concatenate([get_slice(job, r, world, step, timeout=10).ids for r in range(world)])


@pytest.fixture(params=["basic", "adaptive"])
def old_state(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """A copy of one v1 state directory (a job writes into its state directory)."""
    state = tmp_path / request.param
    shutil.copytree(DATA / request.param, state)
    (state / "delivered.json").unlink()
    return request.param, state


def test_the_recorded_data_is_the_sequence_pinned_here() -> None:
    for name, pins in GOLDEN_DELIVERED.items():
        rec = recorded(name)
        ref = reference(name, rec["acked"])
        for t, ids in pins.items():
            assert rec["delivered"][t][:4].tolist() == ids, (name, t)
        for t, ids in rec["delivered"].items():
            assert np.array_equal(ids, ref[t]), (name, t)


def test_an_old_state_dir_resumes_where_the_ranks_stood(old_state: tuple[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    name, state = old_state
    rec = recorded(name)
    acked, tail = rec["acked"], 14
    ref = reference(name, acked + tail)
    sim = simulated(name, state, acked + tail, capsys)
    job = open_job(name, state)
    try:
        assert job.resumed_from == RESUMED_FROM[name]
        for r in range(WORLD):
            assert job.join(r, WORLD).next_step == RESUMED_FROM[name]  # the checkpoint's positions
            job.ack(r, WORLD, acked)  # a reconnecting rank says where it is
        for t in range(acked, acked + tail):
            ids = step_ids(job, t)
            assert np.array_equal(ids, ref[t]), t
            assert np.array_equal(ids, sim[t]), t
            for r in range(WORLD):
                job.ack(r, WORLD, t + 1)
    finally:
        job.close()


def test_every_step_already_delivered_comes_back_identical(old_state: tuple[str, Path]) -> None:
    name, state = old_state
    rec = recorded(name)
    job = open_job(name, state)
    try:
        for r in range(WORLD):
            job.join(r, WORLD)
        for t in sorted(rec["delivered"], reverse=True):  # newest first: replays from older checkpoints
            assert np.array_equal(step_ids(job, t), rec["delivered"][t]), t
    finally:
        job.close()


def test_the_old_trainer_token_re_forms_the_job_exactly(old_state: tuple[str, Path]) -> None:
    name, state = old_state
    rec = recorded(name)
    ref = reference(name, rec["acked"] + 8)
    job = open_job(name, state)
    try:
        assert job.join(0, 1, resume_token=rec["token"]).next_step == rec["token_step"]
        for t in range(rec["token_step"], rec["acked"] + 8):
            assert np.array_equal(step_ids(job, t, world=1), ref[t]), t
            job.ack(0, 1, t + 1)
    finally:
        job.close()


def test_the_adaptive_sections_restore_the_tally_and_the_controller(tmp_path: Path) -> None:
    state = tmp_path / "adaptive"
    shutil.copytree(DATA / "adaptive", state)
    rec = recorded("adaptive")
    job = open_job("adaptive", state)
    try:
        st = job.status()
        ids = np.concatenate([rec["delivered"][t] for t in range(rec["acked"])])
        expected = np.bincount(ids // 60, weights=token_counts(sum(ADAPT_SIZES))[ids], minlength=4)
        assert st.tokens is not None and st.tokens_since == 0
        assert st.tokens.tolist() == expected.astype(np.int64).tolist()
        assert st.adapt is not None and st.adapt.accepted == 2 * rec["acked"] and st.adapt.refused == 0
        assert st.adapt.group_weight[0] > 0.5  # the hot cluster the controller favoured
    finally:
        job.close()


def _scenario() -> Any:
    spec = importlib.util.spec_from_file_location("make_state_v1", DATA.parent / "make_state_v1.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["basic", "adaptive"])
def test_todays_server_writes_the_same_files(name: str, tmp_path: Path) -> None:
    """The v1 scenario run again: byte for byte the same payloads, event log and steps; the
    same metadata but for when and by which version it was written, and the same mark, plus
    what later versions add (the digest of the changes a checkpoint holds; the event log's
    record count and digest in the mark; the log's copy, equal to it)."""
    out = tmp_path / name
    out.mkdir()
    getattr(_scenario(), f"make_{name}")(out)
    old, new = CheckpointStore(DATA / name), CheckpointStore(out)
    assert new.steps() == old.steps()
    for step in old.steps():
        a, b = old.load(step), new.load(step)
        assert b.state == a.state, step
        skip = ("created", "server_version", "events_digest")
        assert {k: v for k, v in b.meta.items() if k not in skip} == {k: v for k, v in a.meta.items() if k not in skip}
        assert len(b.meta["events_digest"]) == 64
    for file in ("events.log", "delivered.json"):
        assert (out / file).read_bytes() == (DATA / name / file).read_bytes(), file
    assert (out / "events.copy.log").read_bytes() == (out / "events.log").read_bytes()
    mark, old_mark = json.loads((out / "generated.mark").read_bytes()), json.loads((DATA / name / "generated.mark").read_bytes())
    assert {k: mark[k] for k in old_mark} == old_mark
    assert mark["events"] == sum(1 for _ in iter_events(out / "events.log")) and len(mark["events_digest"]) == 64
