"""croupier.server.sampling: the pure sampling core.

A global batch is a function of (layout, policy, global batch, seed, step) and the online
changes so far; state is O(clusters). Numpy and the core package only: no gRPC, ZeroMQ,
torch, faiss, threads or file I/O (tests/unit/test_layers.py checks the imports). The trainer's
embedded mode runs this same code.
"""

from __future__ import annotations

from croupier.lazy import exports

__all__ = ["Change", "MixSampler", "PolicyConfig", "Sampler", "SamplerState", "mixture_sampler"]

__getattr__, __dir__ = exports(__name__, {
    "Sampler": "croupier.server.sampling.sampler",
    "MixSampler": "croupier.server.sampling.mix_sampler",
    "PolicyConfig": "croupier.server.sampling.policy",
    "SamplerState": "croupier.server.sampling.state",
    "Change": "croupier.server.sampling.state",
    "mixture_sampler": "croupier.server.sampling.mixture",
})
