"""The batches a trainer adapter feeds: one croupier step per batch, its ids kept, only the keys a model takes.

croupier's datasets yield two shapes of item:

- `CroupierIterableDataset` yields samples (the MDS columns plus `_croupier_step` and
  `_croupier_id`); a batch of the rank's slice size is exactly one step's slice.
  `SliceCollator` collates the columns with the trainer's own collator and keeps the step
  (`_croupier_step`, an int) and the slice's ids (`_croupier_ids`, int64 [n]) beside them;
- `PackedSequences` yields one packed item per step (`input_ids`, `labels`, `position_ids`,
  `document_ids`, `loss_mask`, `_croupier_step`), already the rank's batch. `PackedSlices`
  wraps it to add `_croupier_ids`, the ids of the step's slice in slice order, which a
  per-sample loss report needs (the packed rows also hold carried tails of earlier steps'
  documents and may lose a document entirely to the carry bound).

`split_meta` takes the croupier keys (those starting with `_croupier_`) out of a batch, and
`forward_keys` / `model_inputs` pass a model only the keys its `forward` names, so the
packer's `document_ids` and `loss_mask` reach a model that takes them and no other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.client.packing import PackedSequences
from croupier.errors import ConfigError

IDS_KEY = "_croupier_ids"
"""The step's slice ids, int64 [n] in slice order, in every batch an adapter feeds."""
META_PREFIX = "_croupier_"


def croupier_datasets(dataset: Any) -> tuple[CroupierIterableDataset, PackedSequences | None]:
    """(the rank's `CroupierIterableDataset`, the packer over it or None) of a trainer's dataset.

    Refuses anything else: an adapter's exactness rests on reading croupier's own slices."""
    if isinstance(dataset, PackedSlices):
        dataset = dataset.packed
    if isinstance(dataset, PackedSequences):
        return dataset.dataset, dataset
    if isinstance(dataset, CroupierIterableDataset):
        return dataset, None
    raise ConfigError(f"train_dataset must be a CroupierIterableDataset or PackedSequences (the rank's slices), "
                      f"got {type(dataset).__name__}")


class PackedSlices(IterableDataset):
    """`PackedSequences` items with `_croupier_ids` (the step's slice ids) added.

    Packs exactly what the packer packs (it calls `packer.pack` on the same steps), and its
    state is the packer's, so a loader state saved over either restores over the other."""

    def __init__(self, packed: PackedSequences) -> None:
        super().__init__()
        self.packed = packed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for step, samples in self.packed.dataset.iter_steps():
            item = self.packed.pack(step, samples)
            item[IDS_KEY] = torch.tensor([int(s[ID_KEY]) for s in samples], dtype=torch.int64)
            yield item

    def state_dict(self) -> dict[str, Any]:
        return self.packed.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.packed.load_state_dict(state)

    def stats(self) -> dict[str, int]:
        return self.packed.stats()


class SliceCollator:
    """Collates one step's samples with `collate` (the trainer's collator), keeping step and ids.

    Every sample of a batch must come from one step (the trainer checks that consecutive
    batches differ in step): a batch is then exactly the step's slice, the per-rank batch size
    being global batch / data-parallel size. Picklable, so DataLoader workers can run it."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        steps = {int(s[STEP_KEY]) for s in samples}
        if len(steps) != 1:
            raise ConfigError(f"a batch holds samples of steps {sorted(steps)}: the per-device batch size must "
                              f"equal the rank's slice (global batch / data-parallel size), got {len(samples)}")
        ids = torch.tensor([int(s[ID_KEY]) for s in samples], dtype=torch.int64)
        columns = [{k: v for k, v in s.items() if not k.startswith(META_PREFIX)} for s in samples]
        batch = dict(self.collate(columns))
        batch[STEP_KEY] = steps.pop()
        batch[IDS_KEY] = ids
        return batch


def split_meta(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's candidate inputs, croupier's keys) of a batch."""
    inputs = {k: v for k, v in batch.items() if not k.startswith(META_PREFIX)}
    meta = {k: v for k, v in batch.items() if k.startswith(META_PREFIX)}
    return inputs, meta


def forward_keys(model: torch.nn.Module) -> frozenset[str]:
    """The keyword arguments `model.forward` names (not those a `**kwargs` would swallow).

    A `**kwargs` of a Hugging Face model carries attention or loss options; handing it the
    packer's `document_ids` or `loss_mask` would at best be ignored and at worst reach a kernel."""
    params = inspect.signature(model.forward).parameters.values()
    named = (p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return frozenset(named) - {"self"}


def model_inputs(batch: Mapping[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    """The keys of `batch` the model takes; refuses a batch that shares none with it."""
    inputs = {k: v for k, v in batch.items() if k in keys}
    if not inputs:
        raise ConfigError(f"the batch keys {sorted(batch)} include none of the model's forward arguments "
                          f"{sorted(keys)}")
    return inputs


def slice_ids(meta: Mapping[str, Any]) -> np.ndarray:
    """The step's slice ids of a batch's croupier keys, as int64 numpy."""
    ids = meta.get(IDS_KEY)
    if ids is None:
        raise ConfigError(f"the batch has no {IDS_KEY!r}: it was not made by a croupier adapter's loader")
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)
