"""Per-sample losses of one trained step, in slice order, from a causal LM's logits.

What `CroupierIterableDataset.report_losses(step, losses, present)` wants: one loss per id of
the rank's slice of the step. A causal LM's loss at position t predicts token t + 1, so the
per-token losses are `cross_entropy(logits[:, :-1], labels[:, 1:])` (ignoring -100), [R, L - 1]:

- plain batches (one row per sample of the slice): a sample's loss is the mean over its
  row's predicted tokens; a row with none has no loss (`present` False);
- packed batches (`document_ids` present): the per-token losses are folded into one loss
  per document with `croupier.client.loss_fold.fold_token_losses`; the carried tails of
  earlier steps' documents are not in this step's slice and are left out of the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from croupier.client.loss_fold import fold_token_losses
from croupier.errors import ConfigError

IGNORE_INDEX = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy per position, float32 [R, L - 1] (0 where the label is ignored)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ConfigError(f"per-sample losses need logits [R, L, V] and labels [R, L], got {tuple(logits.shape)} "
                          f"and {tuple(labels.shape)}")
    with torch.no_grad():
        shifted = logits[:, :-1].detach().float()
        target = labels[:, 1:].to(shifted.device)
        loss = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(target.shape)


def sample_losses(ids: np.ndarray, logits: torch.Tensor, labels: torch.Tensor,
                  batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(loss per slice id, present mask), both [n] in slice order, of one step's batch.

    ids: the step's slice ids; batch: the step's batch (its `document_ids` and `loss_mask`
    make it a packed batch)."""
    per_token = token_losses(logits, labels)
    if "document_ids" in batch:
        docs = batch["document_ids"]
        if docs.dim() == 1:
            docs = docs[None, :]
        folded = fold_token_losses(ids, per_token, docs, batch.get("loss_mask"))
        return folded.losses, folded.present
    if per_token.shape[0] != ids.size:
        raise ConfigError(f"a plain batch of {per_token.shape[0]} rows cannot report the {ids.size} samples of its "
                          f"slice: one row per sample is needed (or pack with PackedSequences)")
    counted = (labels[:, 1:] != IGNORE_INDEX).to(per_token.device)
    tokens = counted.sum(dim=1)
    total = (per_token * counted).sum(dim=1, dtype=torch.float64)
    present = (tokens > 0).cpu().numpy()
    losses = np.full(ids.size, np.nan)
    losses[present] = (total[tokens > 0] / tokens[tokens > 0]).cpu().numpy()
    return losses, present
