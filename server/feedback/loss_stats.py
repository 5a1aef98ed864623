"""Per-group training-loss statistics: what the sampler has learned from the trainers' reports.

A group is whatever index space a controller re-weights: clusters, sources, or clusters
within sources. Everything here is O(groups) (six arrays of length G) whatever the number of
samples or reports, so it fits in a checkpoint next to the sampler state.

Per group g:
- `ema[g]`: exponential moving average of the group's mean loss per report. A report (one
  rank's losses for one step) that holds samples of g folds their mean m into the average:
  `ema = ema_decay * ema + (1 - ema_decay) * m`; the first report of a group sets `ema = m`.
  So `ema_decay` is per report that contains the group, not per step or per sample: with
  decay 0.9 the average remembers about the last 10 reports of that group. NaN until the
  group is first reported.
- `reports[g]`: reports that contained the group; `samples[g]`: samples reported;
  `loss_sum[g]`: the sum of their losses (float64), from which a controller takes the mean
  loss of any interval by differencing two snapshots;
- `last_step[g]`: the step of the latest report of the group, -1 before the first.
And `total_reports`: every report folded in, whatever its groups.

Serialized by `to_bytes()`: MAGIC (8) | header length (u32 LE) | header JSON | arrays | CRC-32
(u32 LE) over everything before it; the arrays are little-endian (ema, loss_sum float64;
reports, samples, last_step int64). `from_bytes` is strict: bad magic, version, length or
checksum are refused with a StateError that names the fault.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np

from croupier.errors import ConfigError, StateError

MAGIC = b"CRPLOSS1"
VERSION = 1
DEFAULT_EMA_DECAY = 0.9
_ARRAYS: tuple[tuple[str, str], ...] = (("ema", "<f8"), ("loss_sum", "<f8"), ("reports", "<i8"),
                                        ("samples", "<i8"), ("last_step", "<i8"))


class LossStats:
    """Per-group loss EMA, counts and last-updated step; see the module docstring."""

    def __init__(self, num_groups: int, ema_decay: float = DEFAULT_EMA_DECAY) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
            raise ConfigError(f"loss statistics need an integer number of groups >= 1, got {num_groups!r}")
        if not isinstance(ema_decay, (int, float)) or not (0.0 <= float(ema_decay) < 1.0):
            raise ConfigError(f"ema_decay must be a number in [0, 1), got {ema_decay!r}")
        g = int(num_groups)
        self.num_groups = g
        self.ema_decay = float(ema_decay)
        self.ema = np.full(g, np.nan, dtype=np.float64)
        self.loss_sum = np.zeros(g, dtype=np.float64)
        self.reports = np.zeros(g, dtype=np.int64)
        self.samples = np.zeros(g, dtype=np.int64)
        self.last_step = np.full(g, -1, dtype=np.int64)
        self.total_reports = 0

    # -- updates --------------------------------------------------------------------------------
    def add(self, step: int, groups: np.ndarray, losses: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Folds one report: per-sample `losses` (float64) of samples in `groups` (int64).

        `weights` (a job dealt in tokens: each piece's tokens in the slice) makes a group's
        mean of the report the weighted one, so a group's loss is per token, and a document
        split between two ranks or steps counts each part by its tokens.

        The inputs are expected to be validated already (`loss_validation.check_report`); this
        checks only the shapes and the group range, so a bad call never half-applies.
        An empty report still counts in `total_reports` (the rank trained, nothing usable).
        """
        groups = np.asarray(groups, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float64)
        if groups.shape != losses.shape or groups.ndim != 1:
            raise ConfigError(f"a report needs one group per loss; got {groups.shape} groups and {losses.shape} losses")
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != losses.shape or (weights.size and weights.min() <= 0):
                raise ConfigError(f"a report's weights must be one positive number per loss; got {weights.shape}")
        if groups.size and (groups.min() < 0 or groups.max() >= self.num_groups):
            bad = int(groups[(groups < 0) | (groups >= self.num_groups)][0])
            raise ConfigError(f"group {bad} is outside [0, {self.num_groups})")
        self.total_reports += 1
        if not groups.size:
            return
        weighted = losses if weights is None else losses * weights
        if groups.size * 8 < self.num_groups:  # a small report: O(samples), not O(groups)
            seen, inverse = np.unique(groups, return_inverse=True)
            counts = np.bincount(inverse, minlength=seen.size)
            sums = np.bincount(inverse, weights=weighted, minlength=seen.size)
            wsums = counts if weights is None else np.bincount(inverse, weights=weights, minlength=seen.size)
        else:
            full_counts = np.bincount(groups, minlength=self.num_groups)
            seen = np.flatnonzero(full_counts)
            counts = full_counts[seen]
            sums = np.bincount(groups, weights=weighted, minlength=self.num_groups)[seen]
            wsums = counts if weights is None else np.bincount(groups, weights=weights, minlength=self.num_groups)[seen]
        means = sums / wsums
        if weights is not None:
            sums = means * counts  # the loss sum of the group's pieces at their (weighted) mean
        old = self.ema[seen]
        first = np.isnan(old)
        d = self.ema_decay
        self.ema[seen] = np.where(first, means, d * np.where(first, 0.0, old) + (1.0 - d) * means)
        self.loss_sum[seen] += sums
        self.reports[seen] += 1
        self.samples[seen] += counts
        self.last_step[seen] = np.maximum(self.last_step[seen], int(step))

    # -- queries --------------------------------------------------------------------------------
    @property
    def seen(self) -> np.ndarray:
        """Boolean mask of the groups reported at least once."""
        return self.reports > 0

    def filled_ema(self) -> np.ndarray:
        """The EMAs with never-reported groups set to the mean EMA of the reported ones.

        A neutral fill: an unseen group is neither favoured nor starved by a loss-driven
        rule. All NaN (nothing reported yet) gives zeros."""
        out = self.ema.copy()
        seen = self.seen
        out[~seen] = float(out[seen].mean()) if seen.any() else 0.0
        return out

    def summary(self) -> dict[str, float | int]:
        """Scalars for status and logs: reports, groups seen, mean/min/max EMA of the seen groups."""
        seen = self.seen
        ema = self.ema[seen]
        return {"total_reports": self.total_reports, "groups": self.num_groups, "groups_seen": int(seen.sum()),
                "samples": int(self.samples.sum()),
                "ema_mean": float(ema.mean()) if ema.size else math.nan,
                "ema_min": float(ema.min()) if ema.size else math.nan,
                "ema_max": float(ema.max()) if ema.size else math.nan}

    # -- serialization --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The statistics as checksummed bytes (see the module docstring)."""
        header = {"version": VERSION, "num_groups": self.num_groups, "ema_decay": self.ema_decay,
                  "total_reports": self.total_reports}
        hb = json.dumps(header, sort_keys=True).encode()
        parts = [MAGIC, struct.pack("<I", len(hb)), hb]
        parts += [np.ascontiguousarray(getattr(self, name), dtype=dt).tobytes() for name, dt in _ARRAYS]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> LossStats:
        """Statistics from `to_bytes()` output; refuses anything corrupt, truncated or of another version."""
        if len(data) < len(MAGIC) + 8 or data[:len(MAGIC)] != MAGIC:
            raise StateError(f"not croupier loss statistics (bad magic or only {len(data)} bytes)")
        body = memoryview(data)[:-4]
        (crc,) = struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise StateError(f"loss statistics checksum mismatch (stored {crc:#010x}, computed "
                             f"{zlib.crc32(body):#010x}): the data is corrupt or truncated")
        (hlen,) = struct.unpack_from("<I", body, len(MAGIC))
        off = len(MAGIC) + 4
        try:
            header = json.loads(bytes(body[off:off + hlen]))
        except ValueError as exc:
            raise StateError(f"loss statistics header is not valid JSON: {exc}") from None
        if header.get("version") != VERSION:
            raise StateError(f"loss statistics version {header.get('version')!r} is not supported (this is {VERSION})")
        off += hlen
        g = int(header["num_groups"])
        want = off + 8 * g * len(_ARRAYS)
        if len(body) != want:
            raise StateError(f"loss statistics hold {len(body)} bytes, expected {want} for {g} groups")
        out = cls(g, ema_decay=float(header["ema_decay"]))
        out.total_reports = int(header["total_reports"])
        for name, dt in _ARRAYS:
            native = np.float64 if dt == "<f8" else np.int64
            setattr(out, name, np.frombuffer(body, dtype=dt, count=g, offset=off).astype(native))
            off += 8 * g
        return out
