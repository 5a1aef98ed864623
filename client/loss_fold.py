"""Folding per-token losses of packed rows into one loss per document of the step's slice.

A trainer that packs documents into rows (`croupier.client.packing.PackedSequences`) computes
a loss per token; the server wants one loss per id of the step's slice, in slice order.
`fold_token_losses` turns one into the other:

- a document's loss is the mean of its tokens' losses in this step's rows (the tokens the
  loss mask keeps; by default every token whose `document_ids` is >= 0);
- rows are read in packing order (row-major); the packer puts the carry first (the tail of
  documents of earlier steps), then the slice's documents in slice order. The fold matches
  the runs of equal `document_ids` against the slice from its end, so a document cut across
  steps contributes per step: its head to the step it was dealt in, its carried tail to
  `carried` of the next step (the slice of that step does not hold it, so the report of the
  step cannot name it; a trainer may drop it, as `report_losses` does);
- a document of the slice with no loss-bearing token in this step (cut off entirely into
  the carry, dropped beyond the carry bound, or a one-token document whose only token has no
  next-token target) gets loss NaN and `tokens` 0: `present` is False there. The server's
  validation (`croupier.server.feedback.loss_validation.check_report(..., present=...)`) leaves such
  ids out of the statistics instead of refusing the report, so send the mask with the
  losses; NaN where `present` is True (a diverged loss) is still refused.

Shifted losses: a causal LM's loss at position t is the loss of predicting token t + 1, so
a per-token loss array of shape [R, L - 1] is attributed to `document_ids[:, 1:]` (the
predicted token's document); an array of shape [R, L] is taken as already aligned.

If the runs cannot be matched to the slice (a slice that holds the same id twice in a row
merges two documents into one run; a carried document that is also in this step's slice),
the fold falls back to matching by id: every occurrence
of an id gets the mean over all that id's tokens not in the carry, and `aligned` is False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from croupier.errors import ConfigError


@dataclass(frozen=True, eq=False)
class FoldedLosses:
    """One step's per-document losses, in slice order, and what could not be attributed.

    losses: float64 [n], mean token loss per slice id (NaN where `tokens` is 0).
    tokens: int64 [n], the tokens that made each loss.
    carried_ids / carried_losses / carried_tokens: documents of earlier steps whose carried
      tail was trained in this step (their mean loss over these tokens), in packing order.
    aligned: False when the fold fell back to matching by id (see the module docstring).
    """

    losses: np.ndarray
    tokens: np.ndarray
    carried_ids: np.ndarray
    carried_losses: np.ndarray
    carried_tokens: np.ndarray
    aligned: bool = True

    @property
    def present(self) -> np.ndarray:
        """True where the document had at least one loss-bearing token in this step."""
        return self.tokens > 0


def _numpy(x: Any, name: str, floating: bool) -> np.ndarray:
    """A numpy array from a numpy array, list, or torch tensor (on any device, any float dtype)."""
    if hasattr(x, "detach"):
        x = x.detach()
        if floating and x.is_floating_point():
            x = x.double()
        x = x.cpu().numpy()
    arr = np.asarray(x, dtype=np.float64 if floating else np.int64)
    if arr.ndim not in (1, 2):
        raise ConfigError(f"{name} must have 1 or 2 dimensions (rows of tokens), got shape {arr.shape}")
    return arr


def fold_token_losses(slice_ids: Any, token_losses: Any, document_ids: Any,
                      loss_mask: Any = None) -> FoldedLosses:
    """Per-document losses of one step (see the module docstring).

    slice_ids: the ids the rank was dealt for the step, slice order (int64 [n]).
    token_losses: float [R, L] aligned with `document_ids`, or [R, L - 1] shifted.
    document_ids: int64 [R, L], the packer's `document_ids` (-1 on padding).
    loss_mask: optional bool [R, L] (default: document_ids >= 0).
    """
    ids = _numpy(slice_ids, "slice_ids", floating=False).reshape(-1)
    docs = _numpy(document_ids, "document_ids", floating=False)
    loss = _numpy(token_losses, "token_losses", floating=True)
    if docs.ndim == 1:
        docs = docs[None, :]
    if loss.ndim == 1:
        loss = loss[None, :]
    mask = docs >= 0 if loss_mask is None else _numpy(loss_mask, "loss_mask", floating=False).astype(bool)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != docs.shape:
        raise ConfigError(f"loss_mask has shape {mask.shape} but document_ids has {docs.shape}")
    rows, width = docs.shape
    if loss.shape == docs.shape:
        cols = slice(0, width)
    elif loss.shape == (rows, width - 1):
        cols = slice(1, width)
    else:
        raise ConfigError(f"token_losses has shape {loss.shape}; for document_ids of shape {docs.shape} it must be "
                          f"{docs.shape} (aligned) or {(rows, width - 1)} (shifted next-token losses)")
    flat = docs.reshape(-1)
    starts = np.ones(flat.size, dtype=bool)
    starts[1:] = flat[1:] != flat[:-1]
    run_of = np.cumsum(starts) - 1                       # run index of every token
    run_doc = flat[starts]
    real_runs = np.flatnonzero(run_doc >= 0)             # runs of real tokens, packing order
    runs = run_doc[real_runs]
    pos = np.arange(flat.size).reshape(rows, width)[:, cols].reshape(-1)
    keep = (mask[:, cols] & (docs[:, cols] >= 0)).reshape(-1)
    tok_run = run_of[pos[keep]]
    tok_loss = loss.reshape(-1)[keep]
    n_runs = run_doc.size
    run_sum = np.bincount(tok_run, weights=tok_loss, minlength=n_runs)
    run_cnt = np.bincount(tok_run, minlength=n_runs).astype(np.int64)
    carry = _carry_runs(runs, ids)
    losses = np.full(ids.size, np.nan)
    tokens = np.zeros(ids.size, dtype=np.int64)
    if carry is not None:
        body = real_runs[carry:]
        sums, cnts = run_sum[body], run_cnt[body]
        tokens[:body.size] = cnts
        with np.errstate(invalid="ignore", divide="ignore"):
            losses[:body.size] = np.where(cnts > 0, sums / np.maximum(cnts, 1), np.nan)
        carried = real_runs[:carry]
        aligned = True
    else:
        carried, aligned = _carry_by_id(runs, ids, real_runs)
        body = np.setdiff1d(real_runs, carried)
        uniq, inv = np.unique(run_doc[body], return_inverse=True)
        usum = np.bincount(inv, weights=run_sum[body], minlength=uniq.size)
        ucnt = np.bincount(inv, weights=run_cnt[body], minlength=uniq.size).astype(np.int64)
        at = np.searchsorted(uniq, ids)
        found = (at < uniq.size) & (uniq[np.minimum(at, uniq.size - 1)] == ids) if uniq.size else np.zeros(ids.size, bool)
        tokens[found] = ucnt[at[found]]
        ok = found & (tokens > 0)
        losses[ok] = usum[at[ok]] / tokens[ok]
    c_cnt = run_cnt[carried]
    with np.errstate(invalid="ignore", divide="ignore"):
        c_loss = np.where(c_cnt > 0, run_sum[carried] / np.maximum(c_cnt, 1), np.nan)
    return FoldedLosses(losses=losses, tokens=tokens, carried_ids=run_doc[carried].astype(np.int64),
                        carried_losses=c_loss, carried_tokens=c_cnt, aligned=aligned)


def _carry_runs(runs: np.ndarray, ids: np.ndarray) -> int | None:
    """How many leading runs are carry: the smallest c with runs[c:] == ids[:len(runs) - c]
    whose carry runs[:c] holds no id of the slice (else the split is ambiguous: None)."""
    n = runs.size
    in_slice = np.isin(runs, ids)
    limit = int(np.argmax(in_slice)) if in_slice.any() else n
    for c in range(0, limit + 1):
        m = n - c
        if m <= ids.size and np.array_equal(runs[c:], ids[:m]):
            return c
    return None


def _carry_by_id(runs: np.ndarray, ids: np.ndarray, real_runs: np.ndarray) -> tuple[np.ndarray, bool]:
    """Fallback: leading runs whose document is not in the slice are carry."""
    in_slice = np.isin(runs, ids)
    lead = int(np.argmax(in_slice)) if in_slice.any() else runs.size
    return real_runs[:lead], False
