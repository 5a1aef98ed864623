"""Example: a Hugging Face Trainer on croupier's packed slices, under torchrun or `accelerate launch`.

    torchrun --nproc_per_node 2 -m croupier.integrations.hf_train --server HOST:PORT --job JOB \
        --tokenizer TOKENIZER_DIR --cache CACHE --output-dir RUN --max-steps 100 [--resume] [--report-losses]
    accelerate launch --num_processes 2 -m croupier.integrations.hf_train ...   # the same
    python -m croupier.integrations.hf_train --embedded DATASET --global-batch 8 ...  # no server

A tiny GPT-2 from a config (no download) trains on `PackedSequences` through
`CroupierTrainer`: each rank exactly its slice, a loader state per rank in every Trainer
checkpoint (`--save-steps`), `--resume` continues from the newest checkpoint in
--output-dir on exactly the next batch, and `--report-losses` sends per-sample losses to the
job (a served job with `--adapt`). With `--record`, every rank appends
{"global_step", "step", "ids", "tokens", "reported"} per trained step to RUN/record.rank<R>.jsonl
("ids": the step's slice ids; "tokens": a hash of the rank's input ids; "reported": the ids
that had a loss to report, None without --report-losses), so runs can be compared;
`--crash-after N` ends the process with `os._exit` right after the checkpoint of step N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import transformers

from croupier.client.dataset import CroupierIterableDataset
from croupier.client.packing import PackedSequences
from croupier.tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun -m croupier.integrations.hf_train",
                                description=(__doc__ or "").split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="sampler server HOST:PORT")
    src.add_argument("--embedded", metavar="DATASET", help="deal in every rank, no server (a built dataset)")
    p.add_argument("--job", default="default")
    p.add_argument("--global-batch", type=int, default=None, help="--embedded: samples per step over all ranks")
    p.add_argument("--policy", default=None, help="--embedded: as `croupier serve --policy`")
    p.add_argument("--clip", default=None, help="--embedded: as `croupier serve --clip`")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder (loaded offline)")
    p.add_argument("--cache", required=True, help="local shard cache root")
    p.add_argument("--output-dir", required=True, help="Trainer checkpoints (and --record files)")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--save-steps", type=int, default=5)
    p.add_argument("--start-step", type=int, default=None, help="first step (default: the rank's position)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--report-losses", action="store_true", help="send per-sample losses to the job")
    p.add_argument("--record", action="store_true", help="write what every rank trained on, per step")
    p.add_argument("--crash-after", type=int, default=None, help="os._exit right after the checkpoint of this step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rows", type=int, default=2, help="packed rows per rank per step")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args(argv)


def build_dataset(args: argparse.Namespace, eos: int, tokenizer: Any) -> PackedSequences:
    if args.embedded is not None:
        if args.global_batch is None:
            raise SystemExit("--embedded needs --global-batch")
        clip = int(args.clip) if args.clip is not None and args.clip != "auto" else args.clip
        dataset = CroupierIterableDataset.embedded(args.embedded, global_batch=args.global_batch, cache_dir=args.cache,
                                                   policy=args.policy, clip=clip, start_step=args.start_step)
    else:
        dataset = CroupierIterableDataset(args.server, args.job, cache_dir=args.cache, start_step=args.start_step)
    return PackedSequences(dataset, tokenizer=tokenizer, eos_id=eos, seq_len=args.seq_len, rows=args.rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from croupier.integrations.transformers import CroupierTrainer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    train_dataset = build_dataset(args, eos, tokenizer)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tokenizer), n_layer=args.layers, n_embd=args.hidden, n_head=2,
        n_positions=max(args.seq_len, 128), eos_token_id=eos))
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cpu and distributed:
        # accelerate names the device of a multi-process CPU run "cpu:<local rank>", and the Trainer's resume
        # then fails to torch.load its optimizer state onto it ("don't know how to restore data location ...
        # tagged with cpu:0"); the plain "cpu" device loads
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    training = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, save_steps=args.save_steps, save_strategy="steps",
        logging_steps=args.save_steps, learning_rate=args.lr, per_device_train_batch_size=args.rows,
        dataloader_num_workers=args.workers, report_to=[], use_cpu=cpu, ddp_backend="gloo" if cpu and distributed else None,
        seed=0, disable_tqdm=True, ddp_find_unused_parameters=False)
    trainer = CroupierTrainer(model=model, args=training, train_dataset=train_dataset,
                              report_losses=args.report_losses)
    trainer.add_callback(_Watch(trainer, args))
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if args.record and args.report_losses:
        rank = trainer.args.process_index
        stats = trainer.loss_report_stats()
        Path(args.output_dir, f"reports.rank{rank}.json").write_text(json.dumps(stats))
    return 0


class _Watch(transformers.TrainerCallback):
    """Records what each rank trained on (--record) and crashes after a checkpoint (--crash-after)."""

    def __init__(self, trainer: Any, args: argparse.Namespace) -> None:
        self.trainer = trainer
        self.args = args
        self.crash = args.crash_after if not args.resume else None
        self.out = None
        if args.record:
            rank = trainer.args.process_index
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            self.out = open(Path(args.output_dir) / f"record.rank{rank}.jsonl", "a")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.out is None:
            return
        last = self.trainer.last_batch
        digest = hashlib.sha1(last["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16]
        self.out.write(json.dumps({"global_step": state.global_step, "step": last["step"],
                                   "ids": [int(i) for i in last["ids"]], "tokens": digest,
                                   "reported": last.get("reported")}) + "\n")
        self.out.flush()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the checkpoint of step N was written (every rank's part: CroupierTrainer waits for all)
        # before step N + 1 begins
        if self.crash is not None and state.global_step >= self.crash:
            os._exit(1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.out is not None:
            self.out.close()


if __name__ == "__main__":
    raise SystemExit(main())
