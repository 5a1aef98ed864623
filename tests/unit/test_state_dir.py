"""The checkpoint payload codec (named sections) and the one state-directory reader.

The v1 state directories in tests/data/state_v1 were written by the server of commit 923a3a5:
the codec must cut their payloads exactly where that server joined them, and write the same
bytes back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from croupier.errors import StateError
from croupier.server.durability.checkpoint_payload import CheckpointPayload
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.durability.state_dir import StateDir, StateDirInvalid
from croupier.server.sampling.state import SamplerState

DATA = next(p / "data" / "state_v1" for p in Path(__file__).resolve().parents if (p / "data" / "state_v1").is_dir())
"""tests/data/state_v1, wherever in tests/ this file lives."""


@pytest.mark.parametrize("name", ["basic", "adaptive"])
def test_v1_payloads_decode_into_their_sections_and_encode_back_byte_for_byte(name: str) -> None:
    store = CheckpointStore(DATA / name)
    assert store.steps()
    for step in store.steps():
        ck = store.load(step)
        p = CheckpointPayload.decode(ck.state, ck.meta, str(ck.path))
        assert p.encode() == ck.state
        assert (p.tally_bytes, p.adapter_bytes) == (ck.meta.get("tokens_bytes", 0), ck.meta.get("adapt_bytes", 0))
        assert SamplerState.from_bytes(p.sampler).step == step
        if name == "basic":
            assert p.tally is None and p.adapter is None
        else:
            assert p.adapter is not None and p.adapter.startswith(b"CRPADPT1")
            # the trainer's token at 24 is not the generator's own state: no tally there
            assert (p.tally is None) == (step == 24)
            assert p.tally is None or p.tally.startswith(b"CRPTOKS1")


def test_section_lengths_that_do_not_fit_are_refused() -> None:
    with pytest.raises(StateError, match="more than its payload"):
        CheckpointPayload.decode(b"x" * 10, {"tokens_bytes": 8, "adapt_bytes": 4}, "c")
    with pytest.raises(StateError, match="more than its payload"):
        CheckpointPayload.decode(b"x" * 10, {"adapt_bytes": -1}, "c")
    p = CheckpointPayload.decode(b"abcdef", {"tokens_bytes": 2, "adapt_bytes": 1}, "c")
    assert (p.sampler, p.tally, p.adapter) == (b"abc", b"de", b"f")
    assert CheckpointPayload(b"abc").encode() == b"abc"


def test_the_reader_gives_the_newest_checkpoint_and_every_change() -> None:
    ck, changes = StateDir.open(DATA / "basic").latest()
    assert ck.step == 30 and ck.n_changes == 2 and ck.meta.events_in_log
    assert [(c.step, c.clip) for c in changes] == [(16, 2), (26, None), (36, 3)]
    older = StateDir.open(DATA / "basic").newest(at_or_before=25)
    assert older is not None and older.step == 20 and older.n_changes == 1


def test_a_missing_or_empty_state_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="does not exist"):
        StateDir.open(tmp_path / "nope")
    with pytest.raises(StateError, match="holds no valid checkpoint"):
        StateDir.open(tmp_path).latest()


def test_a_log_shorter_than_the_checkpoint_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s"
    shutil.copytree(DATA / "basic", state)
    (state / "events.log").write_bytes((state / "events.log").read_bytes()[:8 + 4])  # the header alone
    with pytest.raises(StateDirInvalid, match="holds 2 online changes but events.log has only 0"):
        StateDir.open(state).latest()


def test_a_state_dir_from_before_the_event_log_lists_changes_in_its_checkpoint(tmp_path: Path) -> None:
    src = CheckpointStore(DATA / "basic").load(20)
    meta = dict(src.meta, events_in_log=False, events=[{"step": 16, "clip": 2}], n_events=1)
    CheckpointStore(tmp_path).write(20, meta, src.state)
    ck, changes = StateDir.open(tmp_path).latest()
    assert ck.n_changes == 1 and [(c.step, c.clip) for c in changes] == [(16, 2)]
