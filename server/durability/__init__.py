"""croupier.server.durability: what a job keeps on disk, and the one way each piece is read.

A state directory holds checkpoints (`checkpoint_store`: atomic, checksummed files; their
payload's named sections: `checkpoint_payload`), the generated-step mark and the background
writer (`checkpoint_writer`), and the event log of online changes (`event_log`,
`change_log`). `state_dir.StateDir` is the one reader the job, `simulate --state-dir` and
`report` share; `resume_token` is the string a trainer keeps to resume at a step.

The names below are the public surface; each loads its module on first use.
"""

from __future__ import annotations

from croupier.lazy import exports

__all__ = ["Checkpoint", "CheckpointMeta", "CheckpointPayload", "CheckpointStore", "CheckpointToken", "ResumeToken",
           "StateDir", "StateDirInvalid"]

__getattr__, __dir__ = exports(__name__, {
    "Checkpoint": "croupier.server.durability.state_dir",
    "StateDir": "croupier.server.durability.state_dir",
    "StateDirInvalid": "croupier.server.durability.state_dir",
    "CheckpointMeta": "croupier.server.durability.checkpoint_writer",
    "CheckpointPayload": "croupier.server.durability.checkpoint_payload",
    "CheckpointStore": "croupier.server.durability.checkpoint_store",
    "ResumeToken": "croupier.server.durability.resume_token",
    "CheckpointToken": "croupier.server.durability.resume_token",
})
