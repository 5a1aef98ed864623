"""The sampler a mixture stands for: one source's `Sampler`, or a `MixSampler` over many.

Pure: the mixture comes opened (`croupier.mixture.load_mix` / `open_mix` read the file and
the sidecars); a mixture of one source builds exactly the single-dataset sampler, so its
fingerprint and sequence equal `croupier serve DATASET` with the same flags. A mixture of
several sources in `unit = "tokens"` builds a `TokenUnitMix`: the same documents as a
`MixSampler`, and token-exact shares under a job dealt in tokens (`token_mixture`).
"""

from __future__ import annotations

import numpy as np

from croupier.errors import ConfigError
from croupier.mixture import Mixture
from croupier.server.sampling.autoclip import derive_clip
from croupier.server.sampling.mix_sampler import MixSampler, MixSource
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.token_mixture import TokenMixSource, TokenUnitMix, source_chunks

__all__ = ["mixture_sampler", "source_policy", "token_sources"]


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
    if mixture.spec.unit == "tokens":
        return TokenUnitMix(sources, global_batch, seed, mixture.spec.on_source_exhausted,
                            token_sources(mixture, global_batch))
    return MixSampler(sources, global_batch, seed, mixture.spec.on_source_exhausted)


def token_sources(mixture: Mixture, chunk: int) -> list[TokenMixSource]:
    """The sources of a `unit = "tokens"` mixture as a token stream deals them exactly
    (`token_mixture`): token weights as the file gives them, each source's policy (an auto clip
    takes budget_steps draws of its documents per draw), its token counts and budget, and
    documents per draw: its expected share of the `chunk` documents a step draws."""
    pieces = list(mixture.token_counts) + [None] * (len(mixture.infos) - len(mixture.token_counts))
    for info, c in zip(mixture.infos, pieces):
        if c is None:
            raise ConfigError(f"unit = \"tokens\" needs per-sample token counts in every source; source "
                              f"{info.name!r} has none")
    weights = np.array(mixture.sample_weights)
    chunks = source_chunks(weights / weights.sum(), int(chunk))
    out = []
    for i, (d, layout, info) in enumerate(zip(mixture.spec.sources, mixture.layouts, mixture.infos)):
        out.append(TokenMixSource(name=d.name, layout=layout, id_offset=info.offset, weight=float(d.weight),
                                  config=source_policy(mixture, i), counts=np.asarray(pieces[i]), chunk=chunks[i],
                                  token_budget=d.token_budget, epochs=d.epochs))
    return out
