"""The sampler a mixture stands for: one source's `Sampler`, or a `MixSampler` over many.

Pure: the mixture comes opened (`croupier.mixture.load_mix` / `open_mix` read the file and
the sidecars); a mixture of one source builds exactly the single-dataset sampler, so its
fingerprint and sequence equal `croupier serve DATASET` with the same flags.
"""

from __future__ import annotations

import numpy as np

from croupier.mixture import Mixture
from croupier.server.sampling.autoclip import derive_clip
from croupier.server.sampling.mix_sampler import MixSampler, MixSource
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler

__all__ = ["mixture_sampler", "source_policy"]


def source_policy(mixture: Mixture, index: int = 0) -> PolicyConfig:
    """The single-source PolicyConfig a source's keys stand for."""
    d = mixture.spec.sources[index]
    return PolicyConfig(policy=d.policy, clip=d.clip, auto_clip=d.auto_clip, weights=d.cluster_weights,
                        budget_steps=mixture.spec.budget_steps, min_active_share=mixture.spec.min_active_share)

def mixture_sampler(mixture: Mixture, global_batch: int, seed: int = 0) -> Sampler | MixSampler:
    """The sampler of this mixture: today's `Sampler` for one source, else a `MixSampler`."""
    if mixture.single:
        return Sampler(mixture.layouts[0], source_policy(mixture, 0), global_batch, seed)

    weights = np.array(mixture.sample_weights)
    shares = weights / weights.sum()
    sources = []
    for i, (d, layout, info) in enumerate(zip(mixture.spec.sources, mixture.layouts, mixture.infos)):
        clip = d.clip
        if d.auto_clip:
            assert mixture.spec.budget_steps is not None
            per_step = max(1, int(round(shares[i] * global_batch)))
            clip = derive_clip(layout.sizes, per_step, mixture.spec.budget_steps, mixture.spec.min_active_share).clip
        sources.append(MixSource(name=d.name, layout=layout, id_offset=info.offset, weight=float(weights[i]),
                                 policy=d.policy, clip=clip, cluster_weights=d.cluster_weights,
                                 epochs=d.epochs))
    return MixSampler(sources, global_batch, seed, mixture.spec.on_source_exhausted)
