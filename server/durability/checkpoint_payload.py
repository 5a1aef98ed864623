"""A checkpoint's payload as named sections: the one codec the job, `simulate` and `report` share.

A checkpoint file (`checkpoint_store`) holds metadata JSON and a payload. The payload is made
of up to three sections, each owned by one part of the job:

- `sampler`: the sampler state (`SamplerState.to_bytes`), always present;
- `tally`: the per-cluster token tally (`TokenTally.to_bytes`), when the job counts tokens
  and the state is the generator's own;
- `adapter`: the adaptive controller's statistics (`Adapter.to_bytes`), for an adaptive job.

On disk (format v1, unchanged since the first release, so every state directory written
before this module existed reads back byte for byte) the sections are concatenated in that
order, and the metadata records the byte length of each optional section: `tokens_bytes`
for the tally and `adapt_bytes` for the adapter (0: absent). The sampler section is what
remains at the front. Nothing else in croupier cuts a payload apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from croupier.errors import StateError

SECTIONS = ("sampler", "tally", "adapter")
"""The sections, in their on-disk order."""
LENGTH_KEYS = {"tally": "tokens_bytes", "adapter": "adapt_bytes"}
"""The metadata key that records each optional section's byte length."""


@dataclass(frozen=True)
class CheckpointPayload:
    """The sections of one checkpoint's payload (None: the section is absent)."""

    sampler: bytes
    tally: bytes | None = None
    adapter: bytes | None = None

    @property
    def tally_bytes(self) -> int:
        """The tally section's length (metadata `tokens_bytes`; 0: absent)."""
        return len(self.tally or b"")

    @property
    def adapter_bytes(self) -> int:
        """The adapter section's length (metadata `adapt_bytes`; 0: absent)."""
        return len(self.adapter or b"")

    def encode(self) -> bytes:
        """The payload bytes; the metadata records `tally_bytes` and `adapter_bytes` beside them."""
        return self.sampler + (self.tally or b"") + (self.adapter or b"")

    @classmethod
    def decode(cls, data: bytes, meta: Mapping[str, Any], where: str) -> CheckpointPayload:
        """The sections of `data`, cut by the lengths `meta` records; StateError when they do
        not fit (a checkpoint whose metadata and payload disagree)."""
        try:
            n_tally = int(meta.get(LENGTH_KEYS["tally"], 0) or 0)
            n_adapter = int(meta.get(LENGTH_KEYS["adapter"], 0) or 0)
        except (TypeError, ValueError) as exc:
            raise StateError(f"checkpoint {where} has malformed section lengths: {exc}") from None
        if n_tally < 0 or n_adapter < 0 or n_tally + n_adapter > len(data):
            raise StateError(f"checkpoint {where} has sections of {n_tally} (tally) and {n_adapter} (adapter) "
                             f"bytes, more than its payload of {len(data)} bytes")
        end_sampler = len(data) - n_tally - n_adapter
        end_tally = len(data) - n_adapter
        return cls(sampler=bytes(data[:end_sampler]),
                   tally=bytes(data[end_sampler:end_tally]) if n_tally else None,
                   adapter=bytes(data[end_tally:]) if n_adapter else None)
