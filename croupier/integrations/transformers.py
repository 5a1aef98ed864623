"""`CroupierTrainer`: a Hugging Face `transformers.Trainer` that trains every rank on exactly its croupier slice.

    trainer = CroupierTrainer(model=model, args=TrainingArguments(..., max_steps=N),
                              train_dataset=PackedSequences(CroupierIterableDataset(...), ...),
                              report_losses=True)
    trainer.train(resume_from_checkpoint=True)   # under torchrun or `accelerate launch`

What the plain Trainer does wrong with croupier's datasets, and what this subclass does instead
(public Trainer hooks only: `get_train_dataloader`, `compute_loss`, `log`, `train` and a
callback's `on_save` / `on_train_end`):

- **Each rank its slice.** The plain Trainer hands an `IterableDataset` to
  `accelerator.prepare`, which wraps it in `IterableDatasetShard` (each rank keeps every
  world-th batch) or dispatches batches from rank 0 (`dispatch_batches`): croupier's dataset
  already yields only this rank's slice, so either trains each rank on a fraction of its
  slice. `get_train_dataloader` builds a torchdata `StatefulDataLoader` itself
  (`croupier.integrations.loader.CroupierLoader`) and never passes it to accelerate; the
  Trainer's `_prepare_inputs` moves each batch to the rank's device as for any loader.
  A `PackedSequences` item is already the rank's batch (batch_size None); plain samples are
  batched `per_device_train_batch_size` at a time, which must be the rank's slice size (a
  batch holding two steps, or two batches of one step, are refused).
- **The model's keys only.** `compute_loss` passes the model just the batch keys its
  `forward` names: `input_ids`, `labels`, `position_ids` (and `document_ids`, `loss_mask`
  for a model that takes them); croupier's `_croupier_step` / `_croupier_ids` stay behind.
- **Exact resume.** Every Trainer checkpoint gets one loader-state file per rank
  (`croupier_loader.rank<R>.pt`, `StatefulDataLoader.state_dict()`, written on `on_save`
  by every rank, then a barrier: once any rank returns from the save, all files are on
  disk). `train(resume_from_checkpoint=...)` loads this rank's file into the loader before
  the first batch, so the run continues with exactly the batch after the checkpoint. The
  Trainer's own resume would instead skip the batches already trained by drawing them again
  (`skip_first_batches`), which on a restored croupier loader would throw away that many
  *new* batches; so `ignore_data_skip` is forced on — the loader state is the position.
- **Loss reports.** With `report_losses=True` every trained step's per-sample losses go to
  the job (`dataset.report_losses(step, losses, present)`; packed rows are folded per
  document with `croupier.client.loss_fold`). Reports made before a checkpoint are flushed
  with it (and at the end of training). Embedded datasets have no job to report to: refused.
- **Data wait in the logs.** Every `log` of the training loss also carries
  `croupier/data_wait_s` (mean seconds a step waited for its batch since the last log),
  `croupier/data_wait_max_s`, `croupier/data_wait_total_s` and the packer's counters
  (`croupier/steps`, `croupier/tokens_padding`, `croupier/tokens_dropped`, ...).

Ranks come from the launcher's environment (`RANK`, `WORLD_SIZE`: torchrun and
`accelerate launch` both set them; the dataset's `Topology.detect()`). Set `max_steps` (an
iterable dataset has no length) no larger than the steps the dataset yields.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from croupier.optional import require

require("accelerate", "the Hugging Face Trainer integration")
require("torchdata", "the Hugging Face Trainer integration (its StatefulDataLoader)")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

from croupier.client.dataset import STEP_KEY  # noqa: E402
from croupier.client.embedded import SERVER_ONLY  # noqa: E402
from croupier.errors import ConfigError  # noqa: E402
from croupier.integrations.batches import (  # noqa: E402
    PackedSlices,
    SliceCollator,
    croupier_datasets,
    forward_keys,
    model_inputs,
    slice_ids,
    split_meta,
)
from croupier.integrations.loader import CroupierLoader, wait_logs  # noqa: E402
from croupier.integrations.loader_state import load_rank_state, save_rank_state  # noqa: E402
from croupier.integrations.sample_losses import sample_losses  # noqa: E402

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 30.0
"""How long a checkpoint (and the end of training) waits for the loss reports made so far."""


class CroupierTrainer(transformers.Trainer):
    """A `transformers.Trainer` for croupier's `CroupierIterableDataset` / `PackedSequences` (see the module).

    Takes the Trainer's arguments, plus report_losses: send every trained step's per-sample
    losses to the job (a served dataset; the server needs `--adapt` to accept them)."""

    def __init__(self, *args: Any, report_losses: bool = False, **kwargs: Any) -> None:
        # refused before the Trainer sets anything up (Trainer's positional order: model, args, data_collator,
        # train_dataset)
        dataset = kwargs.get("train_dataset", args[3] if len(args) > 3 else None)
        self.croupier_dataset, self.croupier_packed = croupier_datasets(dataset)
        if report_losses and self.croupier_dataset.is_embedded:
            raise ConfigError(f"report_losses=True: {SERVER_ONLY}")
        super().__init__(*args, **kwargs)
        self.report_losses = bool(report_losses)
        if not self.args.ignore_data_skip:
            log.info("CroupierTrainer sets ignore_data_skip: the restored loader state is the position, skipping "
                     "batches would drop new ones")
            self.args.ignore_data_skip = True
        self.croupier_loader: CroupierLoader | None = None
        # {"step", "ids", "input_ids", "reported" (ids with a loss reported)} of this rank's last trained batch
        self.last_batch: dict[str, Any] = {}
        self._resume_from: str | None = None
        self._forward_keys: dict[int, frozenset[str]] = {}
        self._previous_step: int | None = None
        self.callback_handler.callbacks.insert(0, _LoaderStateCallback(self))

    # -- data -------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """`Trainer.train`; a resumed run also restores every rank's loader from the checkpoint."""
        resume: str | None
        if resume_from_checkpoint is True:
            resume = get_last_checkpoint(self.args.output_dir)
            if resume is None:
                raise ConfigError(f"resume_from_checkpoint=True: no checkpoint in output_dir "
                                  f"{self.args.output_dir!r}")
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            resume = os.fspath(resume_from_checkpoint)
        else:
            resume = None
        self._resume_from = resume
        return super().train(resume, *args, **kwargs)

    def get_train_dataloader(self) -> CroupierLoader:
        """The rank's own `StatefulDataLoader`, never wrapped, sharded or dispatched by accelerate."""
        args = self.args
        if self.croupier_packed is not None:
            dataset: Any = PackedSlices(self.croupier_packed)
            batching: dict[str, Any] = {"batch_size": None}
        else:
            dataset = self.croupier_dataset
            batching = {"batch_size": args.per_device_train_batch_size,
                        "collate_fn": SliceCollator(self.data_collator)}
        workers = args.dataloader_num_workers
        extra: dict[str, Any] = {}
        if workers > 0:
            extra = {"prefetch_factor": args.dataloader_prefetch_factor,
                     "persistent_workers": args.dataloader_persistent_workers}
        loader = CroupierLoader(dataset, num_workers=workers, pin_memory=args.dataloader_pin_memory, **batching,
                                **extra)
        if self._resume_from is not None:
            loader.load_state_dict(load_rank_state(self._resume_from, args.process_index, args.world_size))
            log.info("rank %d resumes its croupier loader from %s", args.process_index, self._resume_from)
        self.croupier_loader = loader
        self._previous_step = None
        return loader

    # -- the step ---------------------------------------------------------------------------------

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     *args: Any, **kwargs: Any) -> Any:
        """`Trainer.compute_loss` on the keys the model takes; reports per-sample losses when asked."""
        batch, meta = split_meta(inputs)
        if STEP_KEY not in meta:  # not one of our training batches (evaluation, a user's call)
            return super().compute_loss(model, inputs, return_outputs, *args, **kwargs)
        step = int(meta[STEP_KEY])
        training = model.training
        if training:
            self._check_step(step)
        keys = self._keys(model)
        report = training and self.report_losses
        labels = batch.get("labels")
        loss, outputs = super().compute_loss(model, model_inputs(batch, keys), True, *args, **kwargs)
        ids = slice_ids(meta)
        if training:
            self.last_batch = {"step": step, "ids": ids, "input_ids": batch.get("input_ids")}
        if report:
            if labels is None:
                raise ConfigError("report_losses=True needs `labels` in the batch (a causal LM's per-token losses)")
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
            losses, present = sample_losses(ids, logits, labels, batch)
            self.croupier_dataset.report_losses(step, losses, present)
            self.last_batch["reported"] = int(present.sum())
        return (loss, outputs) if return_outputs else loss

    def _keys(self, model: torch.nn.Module) -> frozenset[str]:
        keys = self._forward_keys.get(id(model))
        if keys is None:
            keys = forward_keys(self.accelerator.unwrap_model(model))
            self._forward_keys[id(model)] = keys
        return keys

    def _check_step(self, step: int) -> None:
        """A plain loader's batch must be one whole step: the next batch is of another step."""
        if self.croupier_packed is None and step == self._previous_step:
            raise ConfigError(f"two batches in a row are of step {step}: per_device_train_batch_size "
                              f"({self.args.per_device_train_batch_size}) is smaller than the rank's slice")
        self._previous_step = step

    # -- logs and checkpoints ---------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """`Trainer.log`; a training log also carries the data waits and the loader's counters."""
        if "loss" in logs and self.croupier_loader is not None:
            logs.update(wait_logs(self.croupier_loader.take_waits()))
            logs.update({f"croupier/{k}": float(v) for k, v in self.croupier_loader.counters().items()})
        super().log(logs, *args, **kwargs)

    def save_croupier_state(self, checkpoint_dir: str) -> None:
        """Writes this rank's loader state into a checkpoint folder, flushing loss reports first,
        then waits for every rank (a checkpoint is whole once any rank returns from here)."""
        if self.croupier_loader is None:
            return
        if self.report_losses:
            self._flush_reports()
        save_rank_state(checkpoint_dir, self.args.process_index, self.args.world_size,
                        self.croupier_loader.state_dict())
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _flush_reports(self) -> None:
        if not self.report_losses:
            return
        if not self.croupier_dataset.flush_losses(FLUSH_TIMEOUT_S):
            log.warning("loss reports were not all sent within %.0f s", FLUSH_TIMEOUT_S)

    def loss_report_stats(self) -> dict[str, int]:
        """This rank's loss-report counters (queued, sent, accepted, refused, dropped)."""
        if not self.report_losses:
            return {}
        return self.croupier_dataset.loss_report_stats()


class _LoaderStateCallback(transformers.TrainerCallback):
    """Saves every rank's loader state into each Trainer checkpoint; flushes reports at the end."""

    def __init__(self, trainer: CroupierTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.trainer.save_croupier_state(folder)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._flush_reports()
