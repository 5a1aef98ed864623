"""Folding per-token losses of the real packer's rows into one loss per document of the slice."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from croupier.client.loss_fold import fold_token_losses
from croupier.client.packing import PackedSequences
from croupier.errors import ConfigError
from croupier.layout import ClusterLayout
from croupier.server.feedback.loss_stats import LossStats
from croupier.server.feedback.loss_validation import ReportRefused, check_report, layout_group_of


def _packer(seq_len: int = 8, rows: int = 2) -> PackedSequences:
    # `pack` only uses the packer's own fields: no dataset is needed to pack given samples.
    return PackedSequences(None, seq_len=seq_len, rows=rows, token_key="tokens", eos_id=0)  # type: ignore[arg-type]


def _samples(ids: list[int], lengths: dict[int, int]) -> list[dict[str, Any]]:
    return [{"_croupier_id": i, "tokens": np.arange(1, lengths[i] + 1)} for i in ids]


def _by_doc(docs: np.ndarray, mult: float = 1.0) -> np.ndarray:
    """A per-token loss equal to the token's document id (times mult): means are checkable."""
    return np.where(docs >= 0, docs * mult, 123.0).astype(np.float64)


def test_fold_follows_documents_across_steps() -> None:
    packer = _packer()
    lengths = {10: 3, 11: 6, 12: 9, 20: 2, 21: 4, 30: 1, 31: 2, 32: 3, 33: 30}
    steps = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    folded = []
    for step, ids in enumerate(steps):
        item = packer.pack(step, _samples(ids, lengths))
        docs = item["document_ids"]
        f = fold_token_losses(ids, torch.from_numpy(_by_doc(docs.numpy())), docs, item["loss_mask"])
        folded.append(f)
        assert f.aligned and f.losses.tolist() == [float(i) for i in ids]
    # step 0: 10 (3+EOS), 11 (6+EOS) and 5 of 12's 10 tokens; the other 5 are carried
    assert folded[0].tokens.tolist() == [4, 7, 5] and folded[0].carried_ids.size == 0
    # step 1: 12's carried tail comes first and is reported apart from the slice
    assert folded[1].carried_ids.tolist() == [12] and folded[1].carried_tokens.tolist() == [5]
    assert folded[1].carried_losses.tolist() == [12.0] and folded[1].tokens.tolist() == [3, 5]
    # every real token is counted exactly once, in the slice or in the carry
    assert folded[2].tokens.sum() == 16 and folded[2].present.all()


def test_shifted_losses_go_to_the_predicted_token() -> None:
    packer = _packer()
    item = packer.pack(0, _samples([1, 2, 3], {1: 3, 2: 6, 3: 9}))
    docs = item["document_ids"].numpy()
    shifted = _by_doc(docs)[:, 1:]
    f = fold_token_losses([1, 2, 3], shifted, docs)
    assert f.losses.tolist() == [1.0, 2.0, 3.0]
    # row starts have no next-token target: 1 loses its first token, 2 its token at row 1 col 0
    assert f.tokens.tolist() == [3, 6, 5]


def test_documents_without_tokens_are_absent_and_the_server_accepts_them() -> None:
    packer = _packer(seq_len=4, rows=1)
    ids = [0, 5, 9]
    item = packer.pack(0, _samples(ids, {0: 2, 5: 8, 9: 3}))  # 4 tokens: only 0 and a piece of 5 fit
    docs = item["document_ids"].numpy()
    f = fold_token_losses(ids, _by_doc(docs, 0.5), docs)
    assert f.tokens.tolist() == [3, 1, 0] and f.present.tolist() == [True, True, False]
    assert np.isnan(f.losses[2])
    layout = ClusterLayout.from_sizes([5, 5])
    with pytest.raises(ReportRefused, match="finite"):
        check_report(ids, f.losses, layout_group_of(layout))  # without the mask, NaN is refused
    groups, losses = check_report(ids, f.losses, layout_group_of(layout), present=f.present)
    stats = LossStats(2)
    stats.add(0, groups, losses)
    assert stats.samples.tolist() == [1, 1] and stats.ema.tolist() == [0.0, 2.5]


def test_padding_and_masked_tokens_do_not_count() -> None:
    packer = _packer(seq_len=8, rows=2)
    item = packer.pack(0, _samples([4, 6], {4: 2, 6: 3}))  # 7 tokens in 16: padding follows
    docs = item["document_ids"].numpy()
    mask = item["loss_mask"].numpy().copy()
    mask[0, 0] = False
    f = fold_token_losses([4, 6], _by_doc(docs), docs, mask)
    assert f.tokens.tolist() == [2, 4] and f.losses.tolist() == [4.0, 6.0]


def test_a_slice_with_an_id_twice_in_a_row_falls_back_to_ids() -> None:
    packer = _packer(seq_len=16, rows=1)
    ids = [7, 7, 8]
    item = packer.pack(0, _samples(ids, {7: 2, 8: 2}))
    docs = item["document_ids"].numpy()
    f = fold_token_losses(ids, _by_doc(docs), docs)
    assert not f.aligned and f.losses.tolist() == [7.0, 7.0, 8.0] and f.tokens.tolist() == [6, 6, 3]


def test_a_slice_with_an_id_twice_apart_stays_aligned() -> None:
    packer = _packer(seq_len=16, rows=1)
    ids = [7, 8, 7]
    item = packer.pack(0, _samples(ids, {7: 2, 8: 2}))
    docs = item["document_ids"].numpy()
    f = fold_token_losses(ids, _by_doc(docs), docs)
    assert f.aligned and f.tokens.tolist() == [3, 3, 3]


def test_shape_refusals() -> None:
    docs = np.zeros((2, 8), np.int64)
    with pytest.raises(ConfigError, match=r"token_losses has shape \(2, 6\)"):
        fold_token_losses([0], np.zeros((2, 6)), docs)
    with pytest.raises(ConfigError, match="loss_mask has shape"):
        fold_token_losses([0], np.zeros((2, 8)), docs, np.ones((2, 7), bool))
    with pytest.raises(ConfigError, match="1 or 2 dimensions"):
        fold_token_losses([0], np.zeros((1, 2, 8)), docs)


def test_bfloat16_losses_on_torch() -> None:
    packer = _packer()
    item = packer.pack(0, _samples([1, 2], {1: 3, 2: 4}))
    docs = item["document_ids"]
    losses = torch.from_numpy(_by_doc(docs.numpy())).to(torch.bfloat16)
    f = fold_token_losses(torch.tensor([1, 2]), losses, docs)
    assert f.losses.tolist() == [1.0, 2.0] and f.losses.dtype == np.float64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_steps_count_every_token_once(seed: int) -> None:
    """Random slices and lengths over 40 steps: each step's tokens are all attributed, the
    slice's documents get their own id as loss, and the carry is exactly the previous tail."""
    rng = np.random.default_rng(seed)
    packer = _packer(seq_len=16, rows=3)
    next_id = 0
    for step in range(40):
        n = int(rng.integers(1, 9))
        ids = list(range(next_id, next_id + n))
        next_id += n
        lengths = {i: int(rng.integers(1, 30)) for i in ids}
        item = packer.pack(step, _samples(ids, lengths))
        docs = item["document_ids"].numpy()
        f = fold_token_losses(ids, _by_doc(docs), docs)
        assert f.aligned
        assert int(f.tokens.sum() + f.carried_tokens.sum()) == int((docs >= 0).sum())
        assert np.array_equal(f.losses[f.present], np.asarray(ids, float)[f.present])
        assert np.array_equal(f.carried_losses, f.carried_ids.astype(float))
        assert not np.isin(f.carried_ids, ids).any()
