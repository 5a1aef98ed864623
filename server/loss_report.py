"""Validation of one rank's loss report before anything changes.

A rank reports, for a step it trained, one loss per id of the slice it was dealt for that
step, in slice order. `check_report` checks the report against that slice and maps every id
to its group, returning (groups, losses) ready for `LossStats.add`; or it raises
`ReportRefused` naming the rule and the bad value. Nothing is folded before the whole report
has passed, so a refused report changes nothing.

Rules (each refusal names it):
- `length`: one loss per id of the slice (both lengths are named);
- `finite`: no NaN or infinity (the first bad index and value are named);
- `non-negative`: a training loss (cross-entropy, per-sample mean) is >= 0;
- `mask-length`: a `present` mask, when given, has one flag per id.

`present` (optional, bool per id): False marks an id with no information in this report (a
packed document none of whose tokens were trained in the step, see
`croupier.client.loss_fold`); its loss value is ignored, NaN included, and it is left out of
the statistics. The rules above apply to the present entries only.

The job refuses, with the same exception class, a report for a step the rank was never dealt
(rule `dealt`), from a rank outside the world (rule `rank`), or a repeated report of a step
(rule `duplicate`); `ReportRefused` carries the rule as `.rule` for metrics.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np

from croupier.errors import ConfigError
from croupier.server.layout import ClusterLayout

GroupOf = Union[np.ndarray, Callable[[np.ndarray], np.ndarray]]
"""Maps int64 sample ids to int64 groups: a dense array indexed by id, or a vectorized callable."""


class ReportRefused(ConfigError):
    """A loss report breaks a rule; it is refused whole and changes nothing.

    A ConfigError (so a CroupierError and a ValueError): the servicer maps it to
    INVALID_ARGUMENT (a malformed report) or FAILED_PRECONDITION (rule `dealt`)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"loss report refused ({rule}): {message}")
        self.rule = rule


def groups_of(ids: np.ndarray, group_of: GroupOf) -> np.ndarray:
    """The group of each id (int64), through a dense array or a callable."""
    ids = np.asarray(ids, dtype=np.int64)
    if callable(group_of):
        groups = np.asarray(group_of(ids), dtype=np.int64)
    else:
        table = np.asarray(group_of)
        if ids.size and (ids.min() < 0 or ids.max() >= table.size):
            bad = int(ids[(ids < 0) | (ids >= table.size)][0])
            raise ReportRefused("id", f"sample id {bad} is outside the group table's [0, {table.size})")
        groups = table[ids].astype(np.int64, copy=False)
    if groups.shape != ids.shape:
        raise ReportRefused("groups", f"the group mapping returned {groups.shape} groups for {ids.shape} ids")
    return groups


def check_report(ids: np.ndarray, losses: np.ndarray, group_of: GroupOf,
                 present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(groups, losses) of the present entries of a valid report; raises ReportRefused otherwise.

    ids: the slice the rank was dealt for the step (int64, slice order).
    losses: one float per id, in the same order.
    group_of: id -> group (see `GroupOf`; `layout_group_of` builds one for a ClusterLayout).
    present: optional bool per id; False = no information for that id (its value is ignored).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    if losses.size != ids.size:
        raise ReportRefused("length", f"the report holds {losses.size} losses but the rank was dealt "
                                      f"{ids.size} ids for that step (one loss per id, in slice order)")
    if present is not None:
        present = np.asarray(present, dtype=bool).reshape(-1)
        if present.size != ids.size:
            raise ReportRefused("mask-length", f"the presence mask holds {present.size} flags for {ids.size} ids")
        ids, losses = ids[present], losses[present]
    bad = ~np.isfinite(losses)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ReportRefused("finite", f"loss {_where(i, present)} is {losses[i]!r}; losses must be finite "
                                      f"({int(bad.sum())} non-finite in all)")
    neg = losses < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ReportRefused("non-negative", f"loss {_where(i, present)} is {losses[i]!r}; losses must be >= 0 "
                                            f"({int(neg.sum())} negative in all)")
    return groups_of(ids, group_of), losses


def _where(i: int, present: np.ndarray | None) -> str:
    """Index i of the present entries, told as the index into the whole report."""
    if present is None:
        return f"at index {i}"
    return f"at index {int(np.flatnonzero(present)[i])}"


def layout_group_of(layout: ClusterLayout) -> GroupOf:
    """id -> cluster for a layout: O(1) memory for contiguous (cluster-major) layouts.

    With a member list (clusters are not id ranges) this builds an id -> cluster table of
    int32 (int64 beyond 2**31 clusters) of `num_samples` entries, -1 for ids outside the
    layout (a selection left them out); such an id in a report is refused (rule `id`).
    """
    if layout.members is None:
        offsets = layout.offsets
        num = layout.num_positions

        def contiguous(ids: np.ndarray) -> np.ndarray:
            if ids.size and (ids.min() < 0 or ids.max() >= num):
                bad = int(ids[(ids < 0) | (ids >= num)][0])
                raise ReportRefused("id", f"sample id {bad} is outside the layout's [0, {num})")
            return np.searchsorted(offsets, ids, side="right") - 1
        return contiguous
    dtype = np.int32 if layout.num_clusters < 2 ** 31 else np.int64
    table = np.full(layout.num_samples, -1, dtype=dtype)
    table[np.asarray(layout.members, dtype=np.int64)] = np.repeat(
        np.arange(layout.num_clusters, dtype=dtype), layout.sizes)

    def membered(ids: np.ndarray) -> np.ndarray:
        groups = groups_of(ids, table)
        if groups.size and groups.min() < 0:
            bad = int(ids[groups < 0][0])
            raise ReportRefused("id", f"sample id {bad} belongs to no cluster of the layout")
        return groups
    return membered
