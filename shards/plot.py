"""`croupier shards plot`: the sorted cluster sizes of a dataset on a log scale (or a score's histogram), as a PNG.

The picture to look at before choosing a clip threshold: how steep the size distribution
falls and where its median lies.
"""

from __future__ import annotations

import numpy as np


def plot_cluster_sizes(dataset: str, out: str) -> None:
    """Draw the dataset's cluster sizes, largest first, into the PNG file `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from croupier.format.sidecar import Sidecar

    side = Sidecar.open(dataset)
    sizes = np.sort(side.sizes)[::-1]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ranks = np.arange(1, len(sizes) + 1)
    ax.fill_between(ranks, sizes, step="mid", alpha=0.35)
    ax.step(ranks, sizes, where="mid", lw=1.2, label="cluster size")
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("samples (log scale)")
    med = float(np.median(sizes))
    ax.axhline(med, color="gray", ls="--", lw=1, label=f"median {med:g}")
    ax.set_title(f"{side.num_clusters} clusters, {side.num_samples} samples "
                 f"(largest {int(sizes[0])}, smallest {int(sizes[-1])})")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def plot_score_histogram(dataset: str, name: str, out: str, bins: int = 60) -> None:
    """Draw the histogram of score column `name`, with its quartiles, into the PNG file `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from croupier.format.sidecar import Sidecar
    from croupier.shards.summary import score_source

    side = Sidecar.open(dataset)
    values = np.asarray(side.scores(name), dtype=np.float64)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.hist(values, bins=bins, alpha=0.7)
    for q, style in ((0.25, ":"), (0.5, "--"), (0.75, ":")):
        v = float(np.quantile(values, q))
        ax.axvline(v, color="gray", ls=style, lw=1, label=f"q{int(q * 100)} {v:.4g}")
    ax.set_xlabel(f"score {name!r} ({score_source(side.score_params(name))})")
    ax.set_ylabel("samples")
    ax.set_title(f"{name}: {len(values)} samples, min {values.min():.4g}, max {values.max():.4g}")
    ax.grid(True, alpha=0.25)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
