"""croupier.server: the sampler server, in layers.

- `sampling/`: the pure sampler (numpy and the core package only: no gRPC, threads or files);
- `feedback/`: loss reports and the adaptive weight controllers;
- `durability/`: checkpoints, the event log, resume tokens;
- `job/`: one job's coordinator (flow, recovery, online changes) over the sampler;
- `serving/`: the asyncio gRPC service, sessions, auth, metrics;
- `cli/`: `croupier serve` and `croupier simulate`.

The names below are the public surface; each loads its module on first use.
"""

from __future__ import annotations

from croupier.lazy import exports

__all__ = ["Job", "JobSpec", "MixSampler", "PolicyConfig", "Sampler", "SamplerState", "create_server"]

__getattr__, __dir__ = exports(__name__, {
    "Sampler": "croupier.server.sampling.sampler",
    "MixSampler": "croupier.server.sampling.mix_sampler",
    "PolicyConfig": "croupier.server.sampling.policy",
    "SamplerState": "croupier.server.sampling.state",
    "Job": "croupier.server.job.job",
    "JobSpec": "croupier.server.job.job",
    "create_server": "croupier.server.serving.service",
})
