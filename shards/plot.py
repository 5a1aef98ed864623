"""`croupier shards plot`: the sorted cluster sizes of a dataset on a log scale, as a PNG.

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
