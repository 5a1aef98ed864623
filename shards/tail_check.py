"""After a build: would balancing its clusters reach the rare groups of each kept field?

A build that keeps metadata columns (`--keep-fields source,...`) prints, for every kept field
that is a grouping (at least 2 values, and no more values than half the documents), how much
of the samples cluster-balanced sampling would deal the field's rarest quarter of groups,
against their natural share and against one cluster per group (`--group-by FIELD`). On a
natural long-tailed corpus flat k-means over sentence embeddings deals the rare groups their
natural share whatever K (0.9-1.2x) while one cluster per group deals them 10-20x
(docs/shards.md), so the build says which one the user has before anyone trains. The figures
are those of `croupier shards inspect --by FIELD` (`diagnostics.long_tail_report`).
`after_build` is the check `croupier shards build` prints, as lines of text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from croupier.shards.diagnostics import MIN_TAIL_GAIN, LongTailReport, long_tail_report

MAX_GROUPS_PER_DOC = 0.5  # a field with more values than this share of the documents is not a grouping
CHUNK = 65_536


@dataclass(frozen=True)
class TailCheck:
    """One kept field against the build's clusters: the report, or why the field was skipped."""

    field: str
    groups: int
    report: LongTailReport | None = None  # the build's clusters against the field's groups
    grouped_gain: float = 1.0  # the rarest quarter's gain with one cluster per group
    skipped: str | None = None

    def lines(self) -> list[str]:
        if self.report is None:
            return [f"tail check by {self.field!r}: skipped ({self.skipped})"]
        r = self.report
        out = [f"tail check by {self.field!r}: {self.groups} groups; its rarest quarter holds "
               f"{r.rare_quarter_share:.1%} of the samples, balancing these clusters deals it "
               f"{r.rare_quarter_balanced_share:.1%} ({r.tail_gain:.2f}x), one cluster per group would deal it "
               f"{self.grouped_gain:.2f}x"]
        if r.tail_warning and self.grouped_gain >= MIN_TAIL_GAIN:
            out.append(r.tail_warning)
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"field": self.field, "groups": self.groups, "skipped": self.skipped,
                             "grouped_gain": self.grouped_gain}
        if self.report is not None:
            d.update(nmi=self.report.nmi, rare_quarter_share=self.report.rare_quarter_share,
                     rare_quarter_balanced_share=self.report.rare_quarter_balanced_share,
                     tail_gain=self.report.tail_gain, tail_warning=self.report.tail_warning)
        return d


def field_codes(side: Any, dataset: str, field: str,
                max_groups: int | None = None) -> tuple[np.ndarray, list[str]] | None:
    """Group code of every document (in id order) and the group names: from the sidecar's
    `groups.npy` when `field` is its `--group-by` field, else from the kept MDS column.

    Returns None as soon as the column shows more than `max_groups` distinct values (a field of
    ids or URLs is not read to the end).
    """
    from croupier.shards.build.grouping import group_name, read_grouping
    from croupier.shards.build.mds import MDSSource

    grouping = read_grouping(side)
    if grouping is not None and grouping.field == field:  # the sidecar has the codes: no column to read
        return np.asarray(grouping.codes(), dtype=np.int64), list(grouping.names)
    n = side.num_samples
    seen: dict[str, int] = {}
    codes = np.empty(n, dtype=np.int64)
    with MDSSource(side.remote or dataset) as src:
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            codes[lo:hi] = [seen.setdefault(group_name(v), len(seen)) for v in src.get(np.arange(lo, hi), field)]
            if max_groups is not None and len(seen) > max_groups:
                return None
    return codes, list(seen)


def check_field(side: Any, dataset: str, field: str) -> TailCheck:
    """The tail check of one kept column of a built dataset."""
    n = side.num_samples
    limit = int(n * MAX_GROUPS_PER_DOC)
    got = field_codes(side, dataset, field, max_groups=limit)
    if got is None:
        return TailCheck(field, limit + 1, skipped=f"more than {limit} values for {n} documents: not a grouping")
    codes, names = got
    if len(names) < 2:
        return TailCheck(field, len(names), skipped=f"a single value in all {n} documents")
    clusters = np.asarray(side.assignments(), dtype=np.int64)
    report = long_tail_report(clusters, codes, names, field)
    grouped = long_tail_report(codes, codes, names, field)
    return TailCheck(field, len(names), report=report, grouped_gain=grouped.tail_gain)


def tail_checks(dataset: str, fields: Sequence[str]) -> list[TailCheck]:
    """`check_field` for each of `fields` that the dataset keeps as a column (the text excepted)."""
    from croupier.format.sidecar import Sidecar

    side = Sidecar.open(dataset)
    columns = side.manifest.get("columns") or {}
    text = side.manifest.get("text_field")
    return [check_field(side, dataset, f) for f in fields if f in columns and f != text]


def after_build(dataset: str, fields: Sequence[str]) -> list[str]:
    """The tail check of a finished build, as lines to print.

    A dataset published to an object store is not read back, and a check that fails (a
    column that cannot be read) says why it was skipped: the build is done and published,
    a diagnostic does not undo it.
    """
    from croupier.errors import CroupierError

    if "://" in dataset:
        return [f"tail check: skipped (the dataset was published to {dataset}; "
                "`croupier shards inspect DIR --by FIELD` on a local copy gives the same figures)"]
    try:
        checks = tail_checks(dataset, fields)
    except CroupierError as exc:
        return [f"tail check: skipped ({exc})"]
    return [line for check in checks for line in check.lines()]
