"""Packing a step's documents into exactly R x L tokens: shapes, boundaries, masks, the bounded
carry, exact save/restore and elastic resume. Pure packing here; through a real server in
test_client.py."""

from __future__ import annotations

import numpy as np
import pytest

from croupier.client.dataset import CroupierIterableDataset
from croupier.client.packing import IGNORE_INDEX, PackedSequences
from croupier.errors import ConfigError, DatasetError, StateError
from croupier.tokenizer import load_tokenizer
from croupier.topology import Topology

EOS = 9


def _dataset(tmp_path, rank: int = 0, world: int = 1) -> CroupierIterableDataset:
    # state_dict() is local: no server is needed to take or load states
    return CroupierIterableDataset("127.0.0.1:1", "t", cache_dir=tmp_path, start_step=0,
                                   topology=Topology(rank, world))


def _steps(seed: int, steps: int, per_step: int = 4) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    out, next_id = [], 0
    for _ in range(steps):
        batch = []
        for _ in range(per_step):
            n = int(rng.integers(1, 30))
            batch.append({"tokens": rng.integers(100, 200, n).astype(np.int32), "_croupier_id": next_id})
            next_id += 1
        out.append(batch)
    return out


def _packer(tmp_path, **kw) -> PackedSequences:
    kw.setdefault("seq_len", 16)
    kw.setdefault("rows", 3)
    return PackedSequences(_dataset(tmp_path), token_key="tokens", eos_id=EOS, pad_id=0, **kw)


def _real(item) -> np.ndarray:
    return item["input_ids"].numpy()[item["loss_mask"].numpy()]


def _carry_rule(steps: list[list[dict]], need: int, max_carry: int) -> tuple[int, int]:
    """(tokens carried after the last step, tokens dropped) by the documented rule: a step packs
    the carry then its documents (each + EOS) into `need` tokens and carries at most `max_carry`
    of the rest."""
    carry = dropped = 0
    for batch in steps:
        rest = max(carry + sum(len(d["tokens"]) + 1 for d in batch) - need, 0)
        carry = min(rest, max_carry)
        dropped += rest - carry
    return carry, dropped


def test_every_step_is_rows_by_seq_len_with_boundaries_and_masks(tmp_path):
    p = _packer(tmp_path, max_carry=10_000)
    steps = _steps(0, 6)
    items = [p.pack(s, samples) for s, samples in enumerate(steps)]
    for item in items:
        for key in ("input_ids", "labels", "loss_mask", "document_ids", "position_ids"):
            assert tuple(item[key].shape) == (3, 16), key
        mask = item["loss_mask"].numpy()
        assert (item["labels"].numpy()[~mask] == IGNORE_INDEX).all()
        assert (item["labels"].numpy()[mask] == item["input_ids"].numpy()[mask]).all()
        assert (item["document_ids"].numpy()[~mask] == -1).all()
        assert (item["input_ids"].numpy()[~mask] == 0).all()
    # with an unbounded carry nothing is lost or duplicated: the real tokens are the documents + EOS
    want = np.concatenate([np.concatenate([d["tokens"], [EOS]]) for batch in steps for d in batch])
    got = np.concatenate([_real(i) for i in items] + [p._carry_tokens])
    np.testing.assert_array_equal(got, want)
    # positions restart at each document start and each row start
    item = items[0]
    docs, pos = item["document_ids"].numpy(), item["position_ids"].numpy()
    for r in range(3):
        for c in range(16):
            if docs[r, c] < 0:
                assert pos[r, c] == 0
            elif c == 0 or docs[r, c] != docs[r, c - 1]:
                assert pos[r, c] == 0
            else:
                assert pos[r, c] == pos[r, c - 1] + 1


def test_carry_is_bounded_and_what_it_drops_is_counted(tmp_path):
    p = _packer(tmp_path, seq_len=8, rows=1)  # 8 tokens a step, carry at most 8
    steps = _steps(1, 5, per_step=6)
    for s, samples in enumerate(steps):
        p.pack(s, samples)
        assert p._carry_tokens.size <= 8
    st = p.stats()
    carry, dropped = _carry_rule(steps, 8, 8)
    assert dropped > 0 and (st["tokens_dropped"], p._carry_tokens.size) == (dropped, carry)
    assert st["tokens_in"] == st["tokens_packed"] + st["tokens_dropped"] + p._carry_tokens.size
    assert st["tokens_packed"] + st["tokens_padding"] == 5 * 8


def test_save_and_restore_continue_token_for_token(tmp_path):
    steps = _steps(2, 8)
    whole = _packer(tmp_path)
    ref = [whole.pack(s, b) for s, b in enumerate(steps)]
    first = _packer(tmp_path)
    head = [first.pack(s, b) for s, b in enumerate(steps[:3])]
    first.dataset._position, first.dataset._stride = 3, 1  # as iter_steps() leaves it after step 2
    state = first.state_dict()
    carried, _ = _carry_rule(steps[:3], 3 * 16, 16)
    assert carried > 0 and len(state["carry_tokens"]) == carried  # the state holds a cut document's tail
    second = _packer(tmp_path)
    second.load_state_dict(state)
    assert second.dataset.state_dict()["next_step"] == 3
    tail = [second.pack(s, b) for s, b in list(enumerate(steps))[3:]]
    assert len(head + tail) == len(ref) == 8
    for a, b in zip(head + tail, ref):
        for key in ("input_ids", "labels", "document_ids", "position_ids"):
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_elastic_resume_drops_the_carry_and_counts_it(tmp_path):
    p = _packer(tmp_path)
    steps = _steps(3, 2)
    for s, b in enumerate(steps):
        p.pack(s, b)
    p.dataset._position, p.dataset._stride = 2, 1
    state = p.state_dict()
    carried = len(state["carry_tokens"])
    assert carried > 0 and carried == _carry_rule(steps, 3 * 16, 16)[0]
    other = PackedSequences(_dataset(tmp_path, rank=1, world=2), token_key="tokens", eos_id=EOS, seq_len=16, rows=3)
    other.load_state_dict(state)
    assert other._carry_tokens.size == 0 and other.stats()["carry_dropped"] == carried
    same = _packer(tmp_path)
    same.load_state_dict(state)
    assert same._carry_tokens.size == carried and same.stats()["carry_dropped"] == 0


def test_text_is_tokenized_with_a_hugging_face_tokenizer(tmp_path, tiny_tokenizer):
    tok = load_tokenizer(str(tiny_tokenizer))
    p = PackedSequences(_dataset(tmp_path), tokenizer=str(tiny_tokenizer), eos_id=tok.sep_token_id,
                        seq_len=32, rows=2)
    samples = [{"text": "the cat sat on the mat", "_croupier_id": 4}, {"text": "a dog", "_croupier_id": 7}]
    item = p.pack(0, samples)
    want = [*tok("the cat sat on the mat", add_special_tokens=False)["input_ids"], tok.sep_token_id,
            *tok("a dog", add_special_tokens=False)["input_ids"], tok.sep_token_id]
    np.testing.assert_array_equal(_real(item), want)
    assert set(item["document_ids"].numpy().ravel().tolist()) == {4, 7, -1}
    # later steps call the fast tokenizer's backend (it agreed on the first), with the same ids
    assert p._backend is not None
    np.testing.assert_array_equal(_real(p.pack(1, samples)), want)
    # a backend set to truncate is not used: the tokenizer call gives the whole texts
    p.tokenizer.backend_tokenizer.enable_truncation(2)
    try:
        np.testing.assert_array_equal(_real(p.pack(2, samples)), want)
    finally:
        p.tokenizer.backend_tokenizer.no_truncation()


def test_bad_input_is_refused_with_the_rule(tmp_path):
    with pytest.raises(ConfigError, match="seq_len must be an int >= 2"):
        _packer(tmp_path, seq_len=1)
    with pytest.raises(ConfigError, match="rows must be an int >= 1"):
        _packer(tmp_path, rows=0)
    with pytest.raises(ConfigError, match="no-such-tokenizer.*cannot be loaded offline"):
        PackedSequences(_dataset(tmp_path), tokenizer=str(tmp_path / "no-such-tokenizer"), seq_len=8, rows=1)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        PackedSequences(_dataset(tmp_path), seq_len=8, rows=1)
    p = _packer(tmp_path)
    with pytest.raises(DatasetError, match=r"token column of sample 3 \('tokens'\) holds float32"):
        p.pack(0, [{"tokens": np.zeros(4, np.float32), "_croupier_id": 3}])
    with pytest.raises(StateError, match="3 rows of 16 tokens"):
        _packer(tmp_path, rows=4).load_state_dict(p.state_dict())


def test_a_token_dealt_step_is_cut_where_its_spans_say_with_segments_per_part_and_row(tmp_path):
    from croupier.client.dataset import TOKENS_KEY

    p = PackedSequences(_dataset(tmp_path), token_key="tokens", eos_id=99, seq_len=8, rows=2)
    docs = {5: np.arange(100, 111), 6: np.arange(200, 203), 7: np.arange(300, 319)}
    samples = [{"_croupier_id": 5, "tokens": docs[5], TOKENS_KEY: (3, 10, 12)},   # tokens 3..9 of 11, no EOS
               {"_croupier_id": 6, "tokens": docs[6], TOKENS_KEY: (0, 4, 4)},    # all 3 tokens and the EOS
               {"_croupier_id": 7, "tokens": docs[7], TOKENS_KEY: (0, 5, 20)}]   # its first 5 tokens
    item = p.pack(3, samples)
    assert item["input_ids"].tolist() == [[103, 104, 105, 106, 107, 108, 109, 200],
                                          [201, 202, 99, 300, 301, 302, 303, 304]]
    assert item["labels"].tolist() == item["input_ids"].tolist() and bool(item["loss_mask"].all())
    assert item["document_ids"].tolist() == [[5] * 7 + [6], [6, 6, 6, 7, 7, 7, 7, 7]]
    assert item["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert item["cu_seqlens"].tolist() == [0, 7, 8, 11, 16]
    bad = [dict(samples[0], **{TOKENS_KEY: (3, 10, 13)})] + samples[1:]
    with pytest.raises(DatasetError, match="sample 5: the tokenizer gives 11 tokens, the job dealt it as 12"):
        p.pack(4, bad)
