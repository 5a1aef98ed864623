"""Online weight controllers: from per-group loss statistics to new sampling weights.

A controller sees a group index space (clusters, sources, or clusters within sources) and
`LossStats` over it. Every N steps the job calls `propose(stats, current_weights, step)`;
the controller answers new weights, or None (no change yet). The job schedules the answer at
a future step (beyond every rank's lookahead) as an ordinary recorded weight change, so the
sequence replays from the event log without the losses, and the clip keeps binding.

Controllers (`CONTROLLERS`, built by `make_controller(name, **params)`):

- `loss-softmax`: weights ∝ prior × exp(EMA loss / temperature). `temperature` (1.0, in loss
  units): lower sharpens towards the highest-loss groups.
- `odm`: Online Data Mixing (arXiv 2312.02406), an EXP3 bandit over groups rewarded by
  training loss. Per call, each active group's reward is its importance-weighted loss over the
  interval since the last call, r_g = (sum of g's losses) / (π_g × samples reported), π the
  current weights (unbiased for g's mean loss whether or not g was drawn, as EXP3's loss/π);
  the estimate R̂_g ← `reward_decay` × R̂_g + (1 - `reward_decay`) × r_g (ODM's smoothing α);
  policy ∝ prior × exp(`lr` × R̂), mixed with the prior by `explore` (EXP3's exploration γ).
  Defaults: lr 1.0, reward_decay 0.9, explore 0.1.
- `ado`: a scaling-law controller after ADO (arXiv 2410.11820). ADO fits L_g(n) = ε + β n^-α
  per group on its loss history and prefers groups whose loss falls fastest per sample,
  -dL/dn = α (L - ε) / n, weighted by a prior and a credit term h^s (h: moving average of the
  group's past weights). Here the fit is a power law in its local form, kept O(groups): per
  group, a weighted least-squares line of log(interval mean loss) on log(n) with exponential
  forgetting (`fit_decay` per observation), i.e. the local exponent
  d log L / d log n = -α (L - ε) / L of the law; so -dL/dn = -slope × L / n with L the group's
  loss EMA. n is the samples reported in all, the run's progress, as ADO's reference
  implementation counts it (one step size for every domain): a group's own count would make
  the binomial noise of its draws look like a difference in learning speed. Slopes are pooled across groups (empirical Bayes: each is shrunk towards the mean
  slope by its standard error), since with many groups each has few, noisy points. Groups without a fit yet (fewer than `min_points` observations) get the mean rate
  of the fitted ones. Preference ∝ prior × (h / prior)^`credit_power` × max(-dL/dn, 0),
  h ← `credit` × weights + (1 - `credit`) × h (ADO's h^s, taken relative to the prior so that
  a policy equal to its prior is neutral; the same as ADO's when the prior is uniform). Defaults: fit_decay 0.9, min_points 4, credit 0.1,
  credit_power 0.5.

Guardrails, common to every controller and applied in this order to a proposal
(`Guardrails`, defaults in brackets):
1. `min_reports` [10]: no change before the statistics hold this many reports in all.
2. Paused groups stay paused: a group whose current weight is 0 (base weight 0, or set to 0
   by the operator) gets 0; the others share the mass.
3. `smoothing` [0.5]: new = smoothing × current + (1 - smoothing) × proposal (both
   normalized); 0 follows the proposal, values near 1 move slowly.
4. `floor` [0.1] and `ceiling` [10.0]: every active group's share stays within
   [floor, ceiling] × 1/A, A the number of active groups (relative to the uniform share, so
   the bounds mean the same for 8 groups or 100,000): clip(s × proposal, floor/A, ceiling/A)
   for the one scale s that makes the shares sum to 1.
5. `precision_bits` [12]: shares are rounded to this many mantissa bits (relative step
   2^-12 ≈ 0.02%), so the event log stores a change in ~1.6 bytes a weight instead of 8
   (bounds hold to that precision). 52 keeps full float64 precision.

The prior is the normalized weights in force at the controller's first proposal (uniform
for clusterclip, the operator's weights for weighted), or the weights given to `set_prior`
(the job calls it when the operator changes the base weights); with equal losses every
controller proposes the prior back and nothing moves. A group active now but 0 in the prior gets the
uniform share as its prior.

Determinism: no randomness at all; the same statistics, weights and step give the same
proposal bit for bit. State (`state_bytes` / `load_state_bytes`) is O(groups) and goes into
the checkpoint next to the statistics.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from croupier.errors import ConfigError, StateError
from croupier.server.feedback.loss_stats import LossStats

STATE_MAGIC = b"CRPCTRL1"
STATE_VERSION = 1


@dataclass(frozen=True)
class Guardrails:
    """Limits every controller's proposal obeys; see the module docstring for each one."""

    floor: float = 0.1
    ceiling: float = 10.0
    smoothing: float = 0.5
    min_reports: int = 10
    precision_bits: int = 12

    def __post_init__(self) -> None:
        _check_number("floor", self.floor, 0.0, 1.0)
        _check_number("ceiling", self.ceiling, 1.0, math.inf)
        _check_number("smoothing", self.smoothing, 0.0, 1.0, open_high=True)
        _check_int("min_reports", self.min_reports, 0)
        _check_int("precision_bits", self.precision_bits, 1, 52)


def _check_number(name: str, value: Any, low: float, high: float, open_high: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (open_high and value == high):
        raise ConfigError(f"{name} must be in [{low}, {high}{')' if open_high else ']'}, got {value!r}")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        raise ConfigError(f"{name} must be an integer in [{low}, {high if high is not None else 'inf'}], got {value!r}")


# -- the guardrails as functions ----------------------------------------------------------------
def bound_shares(w: np.ndarray, active: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Shares within [lo, hi] on `active`, summing to 1, proportional to `w` where unbound.

    The answer is clip(s × w, lo, hi) for the one scale s that makes it sum to 1 (the sum is
    non-decreasing in s): bisection finds which groups sit at a bound, then s is solved
    exactly for the rest. Needs A × lo <= 1 <= A × hi (A active groups); groups with w = 0
    sit at lo, or share what the others leave when every positive one is at hi.
    """
    out = np.zeros(w.shape, dtype=np.float64)
    idx = np.flatnonzero(active)
    v = np.asarray(w, dtype=np.float64)[idx]
    hi = min(hi, 1.0)  # a share never exceeds 1
    if v.size and v.max() > 0:
        v = v / v.max()
        v[v < 1e-300] = 0.0  # below 1e-300 of the largest: zero (keeps the scales finite)
    pos = v > 0
    if not pos.any():
        out[idx] = 1.0 / idx.size
        return out
    if hi * int(pos.sum()) + lo * int((~pos).sum()) <= 1.0:  # every positive group at hi
        x = np.where(pos, hi, max((1.0 - hi * int(pos.sum())) / max(int((~pos).sum()), 1), lo))
        out[idx] = x
        return out
    # Geometric bisection on s (the scales span hundreds of orders of magnitude when the
    # weights do): at `low` every group is at or below lo (sum <= 1), at `high` every
    # positive one is at hi (sum >= 1).
    low, high = max(lo, 1e-300), max(hi / float(v[pos].min()), lo)
    for _ in range(400):
        mid = math.sqrt(low) * math.sqrt(high)
        if not low < mid < high:
            break
        if np.clip(mid * v, lo, hi).sum() < 1.0:
            low = mid
        else:
            high = mid
    sv = high * v
    at_hi, at_lo = sv >= hi, sv <= lo
    free = ~(at_hi | at_lo)
    x = np.where(at_hi, hi, lo)
    if free.any():
        s = (1.0 - hi * int(at_hi.sum()) - lo * int(at_lo.sum())) / float(v[free].sum())
        x[free] = np.clip(s * v[free], lo, hi)
    out[idx] = x
    return out


def round_mantissa(w: np.ndarray, bits: int) -> np.ndarray:
    """w rounded to `bits` mantissa bits (exact float operations; zeros stay zero)."""
    if bits >= 52:
        return w.copy()
    m, e = np.frexp(w)
    scale = float(2 ** bits)
    return np.ldexp(np.round(m * scale) / scale, e)


def check_current(weights: np.ndarray, num_groups: int) -> np.ndarray:
    """The current weights as float64, refused unless one finite weight >= 0 per group, not all 0."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != num_groups:
        raise ConfigError(f"current weights have {w.size} entries but the statistics have {num_groups} groups")
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"current weights must be finite and >= 0; weight {i} is {w[i]}")
    if not (w > 0).any():
        raise ConfigError("current weights are all zero: no group is active")
    return w


# -- controllers ------------------------------------------------------------------------------
class Controller(ABC):
    """Base of every controller: the guardrails, the prior, the state and the description."""

    name: ClassVar[str]
    PARAMS: ClassVar[dict[str, Any]]          # the controller's own parameters and defaults
    _ARRAYS: ClassVar[tuple[str, ...]] = ()   # names of its O(groups) float64 state arrays

    def __init__(self, guard: Guardrails, params: Mapping[str, Any]) -> None:
        self.guard = guard
        self.params = {**self.PARAMS, **params}
        self._check_params()
        self.num_groups: int | None = None
        self.prior: np.ndarray | None = None
        self.proposals = 0
        self.last_step = -1
        for a in self._ARRAYS:
            setattr(self, a, None)

    @abstractmethod
    def _check_params(self) -> None:
        """Refuses out-of-range parameters (ConfigError naming the parameter and value)."""

    @abstractmethod
    def _target(self, stats: LossStats, shares: np.ndarray, active: np.ndarray, prior: np.ndarray,
                step: int) -> np.ndarray | None:
        """The raw proposal (>= 0, any scale; only `active` entries count), or None for no change."""

    def _init_arrays(self, g: int) -> None:
        for a in self._ARRAYS:
            setattr(self, a, np.zeros(g, dtype=np.float64))

    # -- public API -----------------------------------------------------------------------------
    def propose(self, stats: LossStats, current_weights: np.ndarray, step: int) -> np.ndarray | None:
        """New float64 weights (normalized shares), or None: no change yet.

        current_weights: the weights in force at `step`, changes already scheduled included
        (any positive scale; 0 = paused). The answer keeps paused groups at 0 and obeys the
        guardrails; the caller schedules it at a future step.
        """
        g = stats.num_groups
        w = check_current(current_weights, g)
        if self.num_groups is None:
            self.num_groups = g
            self._init_arrays(g)
        elif self.num_groups != g:
            raise ConfigError(f"controller {self.name!r} was set up for {self.num_groups} groups, the statistics have {g}")
        if stats.total_reports < self.guard.min_reports:
            return None
        active = w > 0
        shares = w / w.sum()
        if self.prior is None:
            self.prior = shares.copy()
        n_active = int(active.sum())
        prior = np.where(active & (self.prior > 0), self.prior, 0.0)
        prior[active & (self.prior <= 0)] = 1.0 / n_active
        prior /= prior.sum()
        raw = self._target(stats, shares, active, prior, int(step))
        if raw is None:
            return None
        raw = np.where(active, np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0, posinf=0.0), 0.0)
        total = float(raw.sum())
        if not total > 0 or not math.isfinite(total):
            return None
        s = self.guard.smoothing
        mixed = s * shares + (1.0 - s) * (raw / total)
        bounded = bound_shares(mixed, active, self.guard.floor / n_active, self.guard.ceiling / n_active)
        out = round_mantissa(bounded, self.guard.precision_bits)
        out[~active] = 0.0
        self.proposals += 1
        self.last_step = int(step)
        return out

    def set_prior(self, weights: np.ndarray) -> None:
        """Makes `weights` (normalized) the prior: the job calls it when the operator sets new
        base weights, so the controller re-weights around the operator's choice from then on."""
        w = check_current(weights, len(weights) if self.num_groups is None else self.num_groups)
        self.prior = w / w.sum()

    def describe(self) -> dict[str, Any]:
        """Name, parameters, guardrails and counters, for status and logs."""
        return {"controller": self.name, "params": dict(self.params), "guardrails": asdict(self.guard),
                "groups": self.num_groups, "proposals": self.proposals, "last_step": self.last_step}

    def state_bytes(self) -> bytes:
        """The controller's state: MAGIC | header length u32 | JSON header | float64 arrays | CRC-32."""
        header = {"version": STATE_VERSION, "controller": self.name, "params": self.params,
                  "num_groups": self.num_groups, "proposals": self.proposals, "last_step": self.last_step,
                  "has_prior": self.prior is not None}
        hb = json.dumps(header, sort_keys=True).encode()
        arrays = [] if self.num_groups is None else [getattr(self, a) for a in self._ARRAYS]
        if self.prior is not None:
            arrays.append(self.prior)
        body = b"".join([STATE_MAGIC, struct.pack("<I", len(hb)), hb] +
                        [np.ascontiguousarray(a, dtype="<f8").tobytes() for a in arrays])
        return body + struct.pack("<I", zlib.crc32(body))

    def load_state_bytes(self, data: bytes) -> None:
        """Restores `state_bytes()` output of a controller of the same name; strict on load.

        The parameters and guardrails are this controller's (a restart may change them);
        the learned state (arrays, prior, counters) comes from the data."""
        if len(data) < len(STATE_MAGIC) + 8 or data[:len(STATE_MAGIC)] != STATE_MAGIC:
            raise StateError(f"not a croupier controller state (bad magic or only {len(data)} bytes)")
        body = memoryview(data)[:-4]
        (crc,) = struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise StateError("controller state checksum mismatch: the state is corrupt or truncated")
        (hlen,) = struct.unpack_from("<I", body, len(STATE_MAGIC))
        off = len(STATE_MAGIC) + 4
        try:
            header = json.loads(bytes(body[off:off + hlen]))
        except ValueError as exc:
            raise StateError(f"controller state header is not valid JSON: {exc}") from None
        if header.get("version") != STATE_VERSION:
            raise StateError(f"controller state version {header.get('version')!r} is not supported "
                             f"(this is {STATE_VERSION})")
        if header.get("controller") != self.name:
            raise StateError(f"controller state is of controller {header.get('controller')!r}, this is {self.name!r}")
        off += hlen
        g = header["num_groups"]
        n_arrays = (0 if g is None else len(self._ARRAYS)) + (1 if header["has_prior"] else 0)
        want = off + 8 * (g or 0) * n_arrays
        if len(body) != want:
            raise StateError(f"controller state holds {len(body)} bytes, expected {want} for {g} groups")
        arrays = []
        for _ in range(n_arrays):
            arrays.append(np.frombuffer(body, dtype="<f8", count=g, offset=off).astype(np.float64))
            off += 8 * g
        self.num_groups = g
        for a in self._ARRAYS:
            setattr(self, a, arrays.pop(0) if g is not None else None)
        self.prior = arrays.pop(0) if header["has_prior"] else None
        self.proposals = int(header["proposals"])
        self.last_step = int(header["last_step"])


class LossSoftmax(Controller):
    """Weights ∝ prior × exp(EMA loss / temperature); groups never reported get the mean EMA."""

    name = "loss-softmax"
    PARAMS = {"temperature": 1.0}

    def _check_params(self) -> None:
        t = self.params["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"temperature must be a finite number > 0, got {t!r}")

    def _target(self, stats: LossStats, shares: np.ndarray, active: np.ndarray, prior: np.ndarray,
                step: int) -> np.ndarray | None:
        if not stats.seen[active].any():
            return None
        z = stats.filled_ema() / float(self.params["temperature"])
        z = np.where(active, z, -np.inf)
        return prior * np.exp(z - z[active].max())


class Odm(Controller):
    """EXP3 over groups rewarded by importance-weighted training loss (Online Data Mixing)."""

    name = "odm"
    PARAMS = {"lr": 1.0, "reward_decay": 0.9, "explore": 0.1}
    _ARRAYS = ("reward", "seen_sum", "seen_samples")

    def _check_params(self) -> None:
        _check_number("lr", self.params["lr"], 0.0, math.inf)
        _check_number("reward_decay", self.params["reward_decay"], 0.0, 1.0, open_high=True)
        _check_number("explore", self.params["explore"], 0.0, 1.0)

    def _target(self, stats: LossStats, shares: np.ndarray, active: np.ndarray, prior: np.ndarray,
                step: int) -> np.ndarray | None:
        d_sum = stats.loss_sum - self.seen_sum
        d_n = stats.samples - self.seen_samples
        self.seen_sum = stats.loss_sum.copy()
        self.seen_samples = stats.samples.astype(np.float64)
        total = float(d_n[active].sum())
        if total <= 0:
            return None
        r = np.zeros_like(d_sum)
        r[active] = d_sum[active] / (shares[active] * total)
        a = float(self.params["reward_decay"])
        self.reward = np.where(active, a * self.reward + (1.0 - a) * r, self.reward)
        logits = float(self.params["lr"]) * self.reward
        logits = np.where(active, logits - logits[active].max(), -np.inf)
        p = prior * np.exp(logits)
        p /= p.sum()
        gamma = float(self.params["explore"])
        return (1.0 - gamma) * p + gamma * prior


class Ado(Controller):
    """Scaling-law controller: prefer groups whose fitted loss falls fastest per sample (ADO)."""

    name = "ado"
    PARAMS = {"fit_decay": 0.9, "min_points": 4, "credit": 0.1, "credit_power": 0.5}
    _ARRAYS = ("sw", "sx", "sy", "sxx", "sxy", "syy", "points", "credit_h", "seen_sum", "seen_samples")

    def _check_params(self) -> None:
        _check_number("fit_decay", self.params["fit_decay"], 0.0, 1.0, open_high=True)
        _check_int("min_points", self.params["min_points"], 2)
        _check_number("credit", self.params["credit"], 0.0, 1.0)
        _check_number("credit_power", self.params["credit_power"], 0.0, math.inf)

    def fitted_slopes(self) -> tuple[np.ndarray, np.ndarray]:
        """Per group: the local exponent d log L / d log n and its squared standard error
        (NaN where there is no fit yet: fewer than `min_points` observations)."""
        assert self.sw is not None
        sw = self.sw
        cxx = self.sxx - self.sx * self.sx / np.maximum(sw, 1e-300)   # centred sums
        cxy = self.sxy - self.sx * self.sy / np.maximum(sw, 1e-300)
        cyy = self.syy - self.sy * self.sy / np.maximum(sw, 1e-300)
        ok = (self.points >= int(self.params["min_points"])) & (cxx > 1e-12)
        slope = np.full(sw.shape, np.nan)
        var = np.full(sw.shape, np.nan)
        if not ok.any():
            return slope, var
        slope[ok] = cxy[ok] / cxx[ok]
        # Residual variance pooled over the fitted groups: a group's own, from a handful of
        # points, is often near zero by chance and would exempt a noisy slope from shrinkage.
        resid = np.maximum(cyy[ok] - slope[ok] * cxy[ok], 0.0)
        dof = np.maximum(sw[ok] - 2.0, 0.0)
        pooled = float(resid.sum() / dof.sum()) if dof.sum() > 0 else float(resid.mean())
        var[ok] = pooled / cxx[ok]
        return slope, var

    def pooled_slopes(self, active: np.ndarray) -> np.ndarray:
        """Slopes shrunk towards the mean slope of the fitted groups (empirical Bayes).

        Each group's slope s_g with squared standard error v_g becomes
        m + (s_g - m) × t / (t + v_g), with m the mean slope and t = max(var(s) - mean(v), 0)
        the spread the groups really have beyond their noise. Few, noisy points (the usual
        case with thousands of groups) pull a slope to the mean; a well-measured difference
        stays."""
        slope, var = self.fitted_slopes()
        fit = active & np.isfinite(slope)
        if fit.sum() < 2:
            return slope
        m = float(slope[fit].mean())
        t = max(float(slope[fit].var()) - float(var[fit].mean()), 0.0)
        out = slope.copy()
        shrink = np.where(t + var[fit] > 0, t / np.maximum(t + var[fit], 1e-300), 1.0)
        out[fit] = m + (slope[fit] - m) * shrink
        return out

    def _target(self, stats: LossStats, shares: np.ndarray, active: np.ndarray, prior: np.ndarray,
                step: int) -> np.ndarray | None:
        d_sum = stats.loss_sum - self.seen_sum
        d_n = stats.samples - self.seen_samples
        total_before = float(self.seen_samples.sum())
        self.seen_sum = stats.loss_sum.copy()
        self.seen_samples = stats.samples.astype(np.float64)
        total = float(self.seen_samples.sum())
        obs = np.flatnonzero(active & (d_n > 0))
        if obs.size:
            mean = d_sum[obs] / d_n[obs]
            x = np.full(obs.size, math.log(0.5 * (total_before + total)))
            y = np.log(np.maximum(mean, 1e-12))
            f = float(self.params["fit_decay"])
            for name, v in (("sw", 1.0), ("sx", x), ("sy", y), ("sxx", x * x), ("sxy", x * y), ("syy", y * y)):
                arr = getattr(self, name)
                arr[obs] = f * arr[obs] + v
            self.points[obs] += 1
        c = float(self.params["credit"])
        if self.proposals == 0 and not self.credit_h.any():
            self.credit_h = shares.copy()
        else:
            self.credit_h = c * shares + (1.0 - c) * self.credit_h
        slope = self.pooled_slopes(active)
        rate = np.maximum(-slope, 0.0) * np.nan_to_num(stats.ema, nan=0.0) / max(total, 1.0)
        fitted = active & np.isfinite(rate)
        if not fitted.any():
            return None
        rate = np.where(fitted, rate, float(rate[fitted].mean()))
        if not (rate[active] > 0).any():
            return None
        credit = np.divide(self.credit_h, prior, out=np.ones_like(prior), where=prior > 0)
        return prior * np.power(credit, float(self.params["credit_power"])) * rate


CONTROLLERS: dict[str, type[Controller]] = {c.name: c for c in (LossSoftmax, Odm, Ado)}
GUARDRAILS: tuple[str, ...] = tuple(Guardrails.__dataclass_fields__)


def make_controller(name: str, **params: Any) -> Controller:
    """The controller `name` with `params` (its own and the guardrails'); unknown ones are refused."""
    if name not in CONTROLLERS:
        raise ConfigError(f"unknown controller {name!r}; valid controllers: {', '.join(sorted(CONTROLLERS))}")
    cls = CONTROLLERS[name]
    valid = sorted(set(cls.PARAMS) | set(GUARDRAILS))
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)} for controller {name!r}; "
                          f"valid parameters: {', '.join(valid)}")
    guard = Guardrails(**{k: v for k, v in params.items() if k in GUARDRAILS})
    return cls(guard, {k: v for k, v in params.items() if k in cls.PARAMS})
