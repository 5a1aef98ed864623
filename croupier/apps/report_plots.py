"""The report's figures, drawn from plain arrays (no server, no files needed).

Each function writes one PNG with matplotlib's Agg backend and returns its path. They are
what a user looks at to choose and defend a clip threshold:

- `plot_sizes_vs_draws`: cluster size against draws on log axes, with the lines random
  sampling (draws proportional to size), uniform sampling (equal draws) and the clip bound
  (draws = clip x size) would give.
- `plot_passes`: passes (draws / size: how often each sample was repeated on average) per
  cluster, largest cluster first, against the clip line.
- `plot_draws_over_time`: cumulative draws over steps for the largest and smallest clusters,
  and how many clusters are still active.
- `plot_rank_lag`: the spread between the fastest and slowest rank over time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from croupier.errors import ConfigError  # noqa: E402

_DPI = 110


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def _check_lengths(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"per-cluster arrays must have one length, got {lengths}")
    k = next(iter(lengths.values()))
    if k == 0:
        raise ConfigError("a report needs at least one cluster")
    return k


def plot_sizes_vs_draws(sizes: Sequence[int], draws: Sequence[int], path: str | Path, *,
                        policy: str = "", clip: int | None = None,
                        clipped_at: Sequence[int] | None = None) -> Path:
    """Log-log scatter of cluster size vs draws with the random, uniform and clip lines."""
    sizes = np.asarray(sizes, dtype=np.float64)
    draws = np.asarray(draws, dtype=np.float64)
    _check_lengths(sizes=sizes, draws=draws)
    clipped = np.zeros(len(sizes), bool) if clipped_at is None else np.asarray(clipped_at) >= 0
    total = draws.sum()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    shown = np.maximum(draws, 0.5)  # a cluster never drawn still shows, on the floor
    ax.scatter(sizes[~clipped], shown[~clipped], s=14, alpha=0.75, label="active cluster")
    if clipped.any():
        ax.scatter(sizes[clipped], shown[clipped], s=18, marker="x", color="C3", label="clipped cluster")
    xs = np.geomspace(max(sizes.min(), 1.0), sizes.max(), 50)
    if total > 0:
        ax.plot(xs, total * xs / sizes.sum(), "--", color="0.4", lw=1, label="random (∝ size)")
        ax.plot(xs, np.full_like(xs, total / len(sizes)), ":", color="0.4", lw=1, label="uniform (equal)")
    if clip:
        ax.plot(xs, clip * xs, "-", color="C3", lw=1, alpha=0.6, label=f"clip bound ({clip} × size)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cluster size (samples)")
    ax.set_ylabel("draws (samples dealt)")
    ax.set_title(f"Cluster size vs draws — {policy or 'policy'}, {int(total):,} draws")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_passes(sizes: Sequence[int], draws: Sequence[int], path: str | Path, *,
                clip: int | None = None, clipped_at: Sequence[int] | None = None,
                policy: str = "") -> Path:
    """Passes (draws / size) of every cluster, largest first, against the clip line."""
    sizes = np.asarray(sizes, dtype=np.float64)
    draws = np.asarray(draws, dtype=np.float64)
    k = _check_lengths(sizes=sizes, draws=draws)
    order = np.argsort(-sizes, kind="stable")
    passes = (draws / sizes)[order]
    clipped = (np.zeros(k, bool) if clipped_at is None else np.asarray(clipped_at) >= 0)[order]
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    colors = np.where(clipped, "C3", "C0")
    ax.bar(np.arange(k), passes, width=1.0 if k > 60 else 0.8, color=colors)
    if clip:
        ax.axhline(clip, color="C3", lw=1.2, ls="--", label=f"clip = {clip}")
        ax.legend(fontsize=8)
    ax.set_xlabel("cluster, largest first")
    ax.set_ylabel("passes (draws / size)")
    ax.set_title(f"Repeats per cluster — {policy or 'policy'} (red: clipped)")
    ax.set_xlim(-0.5, k - 0.5)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_draws_over_time(steps: Sequence[int], history: np.ndarray, sizes: Sequence[int],
                         path: str | Path, *, clip: int | None = None, num_each: int = 3,
                         policy: str = "", source: str = "") -> Path:
    """Cumulative draws per step for the `num_each` largest and smallest clusters.

    `history` has shape (len(steps), K): cumulative draws of every cluster after each step.
    A second panel shows how many clusters are still active: below clip x size draws when
    a clip is set (all clusters otherwise).
    """
    steps = np.asarray(steps, dtype=np.int64)
    history = np.asarray(history, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if history.ndim != 2 or history.shape != (len(steps), len(sizes)):
        raise ConfigError(f"draws history must have shape (steps={len(steps)}, clusters={len(sizes)}), "
                          f"got {history.shape}")
    order = np.argsort(-sizes, kind="stable")
    n = min(num_each, len(sizes))
    picks = list(order[:n]) + [c for c in order[::-1][:n] if c not in set(order[:n])]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.2, 6.0), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.3]})
    for i, c in enumerate(picks):
        kind = "largest" if i < n else "smallest"
        line, = ax.plot(steps, history[:, c], lw=1.4, label=f"cluster {c} ({kind}, size {sizes[c]})")
        if clip:
            ax.axhline(clip * sizes[c], color=line.get_color(), lw=0.8, ls=":")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("cumulative draws")
    title = f"Draws over time — {policy or 'policy'}"
    if clip:
        title += f" (dotted: clip {clip} × size)"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if clip:
        active = (history < clip * sizes[None, :]).sum(axis=1)
    else:
        active = np.full(len(steps), len(sizes))
    ax2.plot(steps, active, color="C3", lw=1.4)
    ax2.set_ylim(0, len(sizes) * 1.05)
    ax2.set_ylabel("active clusters")
    ax2.set_xlabel("step" + (f"  ({source})" if source else ""))
    ax2.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_source_shares(steps: Sequence[int], source_draws: np.ndarray, weights: np.ndarray,
                       names: Sequence[str], path: str | Path, *, top: int = 10) -> Path:
    """Each source's share of the draws in every interval between marks (solid) against its
    weight share in force (dotted), for the `top` sources with the most draws."""
    steps = np.asarray(steps, dtype=np.int64)
    source_draws = np.asarray(source_draws, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if source_draws.shape != (len(steps), len(names)) or weights.shape != source_draws.shape:
        raise ConfigError(f"source history must have shape (steps={len(steps)}, sources={len(names)}), "
                          f"got {source_draws.shape} and {weights.shape}")
    delta = np.diff(source_draws, axis=0)
    tot = delta.sum(axis=1, keepdims=True)
    share = np.divide(delta, tot, out=np.zeros_like(delta), where=tot > 0)
    wshare = weights[1:] / np.maximum(weights[1:].sum(axis=1, keepdims=True), 1e-300)
    picks = np.argsort(-source_draws[-1], kind="stable")[:top]
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for i in picks:
        line, = ax.plot(steps[1:], share[:, i], lw=1.4, label=str(names[i]))
        ax.plot(steps[1:], wshare[:, i], lw=0.9, ls=":", color=line.get_color())
    ax.set_ylim(0, min(1.0, max(0.05, float(share.max(initial=0)) * 1.15)))
    ax.set_xlabel("step")
    ax.set_ylabel("share of draws per interval")
    ax.set_title("Sources: draws (solid) vs weight share in force (dotted)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_weights_over_time(steps: Sequence[int], weights: np.ndarray, origins: Sequence[str], path: str | Path, *,
                           group_loss: np.ndarray | None = None, top: int = 8) -> Path:
    """Weight share of the `top` groups that moved most, at each recorded change (markers by
    origin); with `group_loss`, a second panel of the per-group loss EMA."""
    steps = np.asarray(steps, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != len(steps) or len(origins) != len(steps):
        raise ConfigError(f"weights history must have shape (changes={len(steps)}, groups), got {w.shape}")
    share = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)
    moved = np.abs(share[-1] - share[0]) + share[-1]
    picks = np.argsort(-moved, kind="stable")[:top]
    panels = 2 if group_loss is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7.2, 4.2 * panels), squeeze=False)
    ax = axes[0][0]
    for g in picks:
        ax.step(steps, share[:, g], where="post", lw=1.3, label=f"group {int(g)}")
    for o in sorted(set(origins)):
        at = [s for s, x in zip(steps, origins) if x == o]
        ax.plot(at, np.zeros(len(at)), "|", ms=10, label=f"changes by {o}")
    ax.set_xlabel("step")
    ax.set_ylabel("weight share")
    ax.set_title("Weights over time (recorded changes)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    if group_loss is not None:
        ax2 = axes[1][0]
        loss = np.asarray(group_loss, dtype=np.float64)
        ax2.bar(np.arange(len(loss)), np.nan_to_num(loss), color="C1")
        ax2.set_xlabel("group")
        ax2.set_ylabel("loss EMA")
        ax2.set_title("Per-group training loss (EMA) at the checkpoint")
        ax2.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_rank_lag(times: Sequence[float], rank_steps: np.ndarray, path: str | Path, *,
                  max_lag: int | None = None) -> Path:
    """Each rank's acknowledged step over time and the fastest-minus-slowest spread.

    `rank_steps` has shape (len(times), world): every rank's next step at each sample time.
    """
    times = np.asarray(times, dtype=np.float64)
    rank_steps = np.asarray(rank_steps, dtype=np.float64)
    if rank_steps.ndim != 2 or rank_steps.shape[0] != len(times) or len(times) == 0:
        raise ConfigError(f"rank steps must have shape (samples={len(times)}, world), got {rank_steps.shape}")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.2, 5.2), sharex=True)
    for r in range(rank_steps.shape[1]):
        ax.plot(times, rank_steps[:, r], lw=1.2, label=f"rank {r}")
    ax.set_ylabel("acknowledged step")
    ax.set_title("Rank progress and lag")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    lag = rank_steps.max(axis=1) - rank_steps.min(axis=1)
    ax2.plot(times, lag, color="C3", lw=1.2)
    if max_lag:
        ax2.axhline(max_lag, color="0.4", ls="--", lw=1, label=f"max lag {max_lag}")
        ax2.legend(fontsize=8)
    ax2.set_ylabel("fastest − slowest (steps)")
    ax2.set_xlabel("seconds")
    ax2.grid(True, alpha=0.3)
    return _save(fig, path)


def write_index_html(out_dir: str | Path, images: Sequence[tuple[str, str]], *, title: str,
                     summary: Sequence[tuple[str, str]] = (), notes: Sequence[str] = ()) -> Path:
    """A small static page showing the PNGs (paths relative to `out_dir`) and a summary."""
    import html

    out_dir = Path(out_dir)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    figs = "".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in images
    )
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse}th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #ddd}"
        "figure{display:inline-block;margin:1em}img{max-width:520px}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table>{rows}</table>"
        + (f"<ul>{items}</ul>" if items else "")
        + f"{figs}</body></html>"
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
