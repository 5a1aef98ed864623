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

import numpy as np

from croupier.errors import ReportRefused
from croupier.layout import GroupOf, groups_of, layout_group_of

__all__ = ["GroupOf", "ReportRefused", "check_report", "groups_of", "layout_group_of"]


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
