"""Adapters that plug croupier's datasets into the trainers teams already run.

Each adapter imports its trainer lazily, inside the module that needs it, so croupier never
depends on a trainer; importing this package imports none:

- `croupier.integrations.transformers`: `CroupierTrainer`, a Hugging Face `transformers.Trainer`
  (and `accelerate launch`) that feeds every rank exactly its slice, saves the loader state of
  every rank into each Trainer checkpoint, and reports per-sample losses (docs/integrations.md);
- `croupier.integrations.lightning`: `CroupierDataModule`, a Lightning `LightningDataModule`
  whose `StatefulDataLoader` state is the global next step, so every rank resumes exactly from
  the checkpoint Lightning writes on rank 0, and `CroupierLogCallback` (data waits, counters);
- `croupier.integrations.torchtitan`: `build_croupier_dataloader` and `CroupierTitanDataLoader`,
  torchtitan's batch format, state per data-parallel rank in its checkpoint, and a change of
  data-parallel degree resumed through the global step;
- `croupier.integrations.batches`, `.sample_losses`, `.loader`, `.loader_state`: the
  trainer-independent pieces the adapters share (batch keys, per-sample losses, a timed
  `StatefulDataLoader`, one loader-state file per rank).
"""
