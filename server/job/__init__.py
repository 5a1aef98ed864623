"""croupier.server.job: one training job's coordinator over the sampler, and its parts.

`Job` (job.py) holds the one lock and the one source of truth and calls its parts under it:
`flow` (waiters, bounds, streams), `ranks` (positions, lanes, liveness), `checkpoints`
(schedule, mark, payload), `recovery` (where a restart resumes), `changes` (online changes),
`adaptive` (loss feedback), `status`, `token_tally`; `types` holds the values and errors
callers exchange with it.

The names below are the public surface; each loads its module on first use.
"""

from __future__ import annotations

from croupier.lazy import exports

__all__ = ["CheckpointResult", "CheckpointUnavailable", "Job", "JobReformed", "JobSpec", "JobStatus", "JoinResult",
           "NotJoined", "SliceData", "SliceStream", "StateDirInvalid", "StepOutOfRange", "UnknownJob"]

__getattr__, __dir__ = exports(__name__, {
    "Job": "croupier.server.job.job",
    "SliceStream": "croupier.server.job.flow",
    "JobStatus": "croupier.server.job.status",
    **{name: "croupier.server.job.types" for name in (
        "CheckpointResult", "CheckpointUnavailable", "JobReformed", "JobSpec", "JoinResult", "NotJoined", "SliceData",
        "StateDirInvalid", "StepOutOfRange", "UnknownJob")},
})
