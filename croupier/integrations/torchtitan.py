"""torchtitan: croupier's packed slices as a torchtitan dataloader, resumable across DP degrees.

torchtitan's trainer asks its dataloader builder for a loader of this data-parallel rank
(`dp_rank`, `dp_world_size`, from its `ParallelDims`), iterates
`({"input": ids, ...}, labels)` with labels already shifted, and saves the loader through its
checkpointer (DCP) as a `Stateful`: `ParallelAwareDataloader.state_dict()` returns
`{"dp_rank_{r}": <this rank's StatefulDataLoader state, pickled>, "world_size": W}`, so every
DP rank's entry is its own key, and it refuses (asserts) a state saved at another
data-parallel degree.

`build_croupier_dataloader(make_dataset, dp_rank=, dp_world_size=, seq_len=, local_batch_size=)`
returns a `CroupierTitanLoader` that does the same, without needing torchtitan importable:

- each item is one croupier step of this DP rank: `PackedSequences` rows of seq_len + 1
  tokens cut into `input` (the first seq_len) and `labels` (the next-token targets, -100 on
  padding and where the target is another document's token, as torchtitan's own text
  dataset shifts within documents), plus `positions` (restarting at each document);
- its state is torchtitan's layout (`dp_rank_{r}` and `world_size`), plus `croupier_global`,
  the same on every rank: the global next step (one past the last step yielded) and the
  dataset's rank-independent state at it. At the same degree a rank restores its own
  `StatefulDataLoader` state exactly (the packer's carry included, any number of workers).
  At another degree, where torchtitan refuses, the loader resumes through the global step:
  every DP rank of the new degree reads its slice of the same next step, so the global
  sequence continues exactly (a carry belongs to a lane of the old degree: it is dropped and
  counted in `carry_dropped_on_resume`). Shrinking loads with DCP's default planner; growing
  needs `DefaultLoadPlanner(allow_partial_load=True)`, since a new rank's `dp_rank_{r}` key is
  not in the checkpoint (the rank then resumes from `croupier_global`).
- `metrics()` is the data wait since the last call (mean, max, total seconds) and the
  packer's counters; `log_metrics(metrics_processor, step)` hands them to torchtitan's
  metric logger (TensorBoard / W&B) beside its own `data_loading_times`.

With torchtitan 0.3.0 installed, `CroupierTitanDataLoader` (made on first access) is the same
loader as a torchtitan `BaseDataLoader` with a `Config`, to set as a trainer config's
`dataloader`; its `build(dp_world_size=, dp_rank=, tokenizer=, seq_len=, local_batch_size=, ...)`
is what the trainer calls.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from croupier.client.packing import PACK_STATE_VERSION
from croupier.errors import ConfigError, StateError
from croupier.integrations.loader import CroupierLoader, pack_counters, wait_logs

STEP_KEY = "_croupier_step"
IGNORE_INDEX = -100
ENTRY_VERSION = 1
GLOBAL_KEY = "croupier_global"
"""The key of the rank-independent entry (the global next step), the same on every DP rank."""


def titan_batch(item: Mapping[str, Any], positions: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A packed item (rows of seq_len + 1 tokens) as torchtitan's `({"input": ids, "positions": pos}, labels)`.

    labels[i] is input_ids[i + 1], or -100 where that token is padding or starts another
    document (so no document is trained to predict the next one's first token)."""
    ids, labels, docs = item["input_ids"], item["labels"], item["document_ids"]
    target = labels[:, 1:].clone()
    target[docs[:, 1:] != docs[:, :-1]] = IGNORE_INDEX
    inputs: dict[str, torch.Tensor] = {"input": ids[:, :-1].contiguous()}
    if positions:
        inputs["positions"] = item["position_ids"][:, :-1].contiguous()
    return inputs, target.contiguous()


class CroupierTitanLoader(CroupierLoader):
    """The DP rank's packed croupier steps in torchtitan's batch format, with its state layout.

    packed: a `PackedSequences` whose dataset reads data-parallel rank `dp_rank` of
    `dp_world_size` (its topology is checked). positions: also yield `positions`.
    loader_kwargs: as for `StatefulDataLoader` (num_workers, snapshot_every_n_steps, ...).
    """

    def __init__(self, packed: Any, *, dp_rank: int, dp_world_size: int, positions: bool = True,
                 **loader_kwargs: Any) -> None:
        from croupier.client.packing import PackedSequences

        if not isinstance(packed, PackedSequences):
            raise ConfigError(f"CroupierTitanLoader takes a PackedSequences (torchtitan trains on token rows), got "
                              f"{type(packed).__name__}")
        topo = packed.dataset.topology
        if (topo.rank, topo.world) != (dp_rank, dp_world_size):
            raise ConfigError(f"the dataset reads rank {topo.rank} of {topo.world}, but this loader is for data-parallel "
                              f"rank {dp_rank} of {dp_world_size}: build the dataset with "
                              f"Topology({dp_rank}, {dp_world_size}) (tensor and pipeline peers share a DP rank)")
        loader_kwargs.pop("batch_size", None)
        if loader_kwargs.get("num_workers", 0) == 0:  # as torchtitan's ParallelAwareDataloader
            loader_kwargs.pop("persistent_workers", None)
            loader_kwargs.pop("prefetch_factor", None)
        super().__init__(packed, batch_size=None, **loader_kwargs)
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.positions = positions
        self._rank_id = f"dp_rank_{dp_rank}"
        self.next_step: int | None = None  # one past the last step yielded
        self.resumed_from_degree: int | None = None  # set when a state of another degree was loaded
        self.carry_dropped_on_resume = 0  # tokens the old degree's lanes carried (all its ranks together)
        self.last_document_ids: list[int] = []  # global ids of the documents in the last batch, in order

    @property
    def packed(self) -> Any:
        return self.dataset

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for item in super().__iter__():
            step = int(item[STEP_KEY])
            if self.next_step is not None and step != self.next_step:
                raise StateError(f"data-parallel rank {self.dp_rank} got step {step} after step {self.next_step - 1}")
            self.next_step = step + 1
            docs = item["document_ids"].reshape(-1)
            self.last_document_ids = list(dict.fromkeys(docs[docs >= 0].tolist()))
            yield titan_batch(item, self.positions)

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torchtitan's layout: this DP rank's entry (pickled) and the DP degree."""
        inner = self.packed.dataset
        entry = {
            "version": ENTRY_VERSION,
            "loader": super().state_dict(),
            "next_step": self.next_step,
            "global": None if self.next_step is None else inner.state_dict(next_step=self.next_step),
        }
        shared = {"version": ENTRY_VERSION, "next_step": self.next_step, "global": entry["global"]}
        return {self._rank_id: pickle.dumps(entry), "world_size": self.dp_world_size,
                GLOBAL_KEY: pickle.dumps(shared)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores this rank's own state at the same DP degree, or the global step at another."""
        if not state_dict:
            return  # torchtitan: an empty state is valid (nothing saved yet)
        world = state_dict.get("world_size")
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise StateError(f"croupier torchtitan loader state world_size must be an int >= 1, got {world!r}")
        if world == self.dp_world_size:
            if self._rank_id not in state_dict:
                raise StateError(f"the loader state of DP degree {world} has no entry {self._rank_id!r} (it holds "
                                 f"{sorted(k for k in state_dict if k.startswith('dp_rank_'))})")
            entry = _entry(state_dict[self._rank_id])
            super().load_state_dict(entry["loader"])
            self.next_step = entry["next_step"]
            return
        # another data-parallel degree: the global next step, the same in every saved entry and in
        # the shared one (a new rank's own dp_rank_* key, absent from the checkpoint, keeps the
        # fresh value of a partial DCP load: next_step None)
        entries = [_entry(v) for k, v in sorted(state_dict.items()) if k.startswith("dp_rank_")]
        saved = [e for e in entries if e["next_step"] is not None]
        if GLOBAL_KEY in state_dict:
            saved.insert(0, _entry(state_dict[GLOBAL_KEY]))
        if not saved and not entries:
            raise StateError(f"the loader state of DP degree {world} holds no dp_rank_* entry and no "
                             f"{GLOBAL_KEY!r} to resume from")
        steps = {e["next_step"] for e in saved}
        if len(steps) > 1:
            raise StateError(f"the loader state's DP ranks stopped at different steps {sorted(steps, key=str)}: "
                             f"no global step to resume DP degree {self.dp_world_size} from")
        self.resumed_from_degree = world
        if not saved:
            return
        entry = saved[0]
        if entry["next_step"] is None:
            return
        self.carry_dropped_on_resume = sum(len(_entry_carry(e)) for e in entries if e["next_step"] is not None)
        packed = self.packed
        packed.load_state_dict({"version": PACK_STATE_VERSION, "dataset": entry["global"], "lane": [],
                                "seq_len": packed.seq_len, "rows": packed.rows, "carry_tokens": [],
                                "carry_docs": [], "stats": packed.stats()})
        self.next_step = entry["next_step"]

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self, prefix: str = "croupier/") -> dict[str, float]:
        """The data wait since the last call and the packer's counters, for a metric logger."""
        out: dict[str, float] = dict(wait_logs(self.take_waits(), prefix))
        counters = self.packed.stats() if self.num_workers == 0 else pack_counters(super().state_dict())
        out.update({f"{prefix}{k}": float(v) for k, v in counters.items()})
        if self.next_step is not None:
            out[f"{prefix}step"] = float(self.next_step - 1)
        return out

    def log_metrics(self, metrics_processor: Any, step: int) -> None:
        """Hands `metrics()` to torchtitan's metric logger (`MetricsProcessor.logger.log`)."""
        metrics_processor.logger.log(self.metrics(), step)


def _entry(raw: Any) -> dict[str, Any]:
    entry = pickle.loads(raw) if isinstance(raw, (bytes, bytearray)) else raw
    if not isinstance(entry, Mapping) or entry.get("version") != ENTRY_VERSION:
        raise StateError("a dp_rank_* entry is not a croupier torchtitan loader state of version "
                         f"{ENTRY_VERSION} (was it saved by torchtitan's own dataloader?)")
    return dict(entry)


def _entry_carry(entry: Mapping[str, Any]) -> list[int]:
    """The carried tokens in an entry's loader state (every worker's packer)."""
    found: list[int] = []

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            if "carry_tokens" in value and "dataset" in value:
                found.extend(value["carry_tokens"])
                return
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(entry.get("loader"))
    return found


def build_croupier_dataloader(make_dataset: Callable[[Any], Any], *, dp_rank: int, dp_world_size: int,
                              seq_len: int, local_batch_size: int, tokenizer: Any = None, text_key: str = "text",
                              token_key: str | None = None, eos_id: int | None = None, pad_id: int = 0,
                              max_carry: int | None = None, positions: bool = True,
                              **loader_kwargs: Any) -> CroupierTitanLoader:
    """The loader of torchtitan's data-parallel rank `dp_rank` of `dp_world_size`.

    make_dataset: Topology -> CroupierIterableDataset (served, or `CroupierIterableDataset.embedded`)
        reading that data-parallel rank; called with `Topology(dp_rank, dp_world_size)`.
    seq_len, local_batch_size: torchtitan's `training.seq_len` and `training.local_batch_size`
        (each item is local_batch_size rows of seq_len tokens, one croupier step).
    tokenizer: a Hugging Face tokenizer, or torchtitan's (`encode(text, add_bos=, add_eos=)`,
        `eos_id`); unused with token_key. The rest: as for `PackedSequences` and `StatefulDataLoader`.
    """
    packed = _packed(make_dataset, dp_rank, dp_world_size, seq_len, local_batch_size, tokenizer,
                     text_key=text_key, token_key=token_key, eos_id=eos_id, pad_id=pad_id, max_carry=max_carry)
    return CroupierTitanLoader(packed, dp_rank=dp_rank, dp_world_size=dp_world_size, positions=positions,
                               **loader_kwargs)


def _packed(make_dataset: Callable[[Any], Any], dp_rank: int, dp_world_size: int, seq_len: int,
            local_batch_size: int, tokenizer: Any, **packer: Any) -> Any:
    """The DP rank's dataset packed into rows of seq_len + 1 tokens (input and shifted labels)."""
    from croupier.client.packing import PackedSequences
    from croupier.topology import Topology

    for name, value in (("seq_len", seq_len), ("local_batch_size", local_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    dataset = make_dataset(Topology(dp_rank, dp_world_size))
    if tokenizer is not None and hasattr(tokenizer, "encode") and hasattr(tokenizer, "eos_id") \
            and not callable(tokenizer):
        tokenizer = TitanTokenizer(tokenizer)
    return PackedSequences(dataset, seq_len=seq_len + 1, rows=local_batch_size, tokenizer=tokenizer, **packer)


class TitanTokenizer:
    """A torchtitan tokenizer (`encode(text, add_bos=, add_eos=)`, `eos_id`) in the call form
    `PackedSequences` uses (`tok(texts, add_special_tokens=False)["input_ids"]`).

    torchtitan's `HuggingFaceTokenizer.encode` keeps what the tokenizer file's post-processor
    adds (a BERT-style file adds [CLS] and [SEP]) and its padding; the document's own tokens
    come from its `tokenizer` (a `tokenizers.Tokenizer`) with special tokens off and padding
    dropped, as the Hugging Face tokenizer of the same file gives them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        raw = getattr(tokenizer, "tokenizer", None)
        self._raw = raw if callable(getattr(raw, "encode", None)) else None

    def _encode(self, text: str) -> list[int]:
        if self._raw is None:
            return list(self.tokenizer.encode(text, add_bos=False, add_eos=False))
        enc = self._raw.encode(text, add_special_tokens=False)
        return [i for i, keep in zip(enc.ids, enc.attention_mask, strict=True) if keep]

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [self._encode(t) for t in texts]}


def _titan_loader_class() -> type:
    """`CroupierTitanDataLoader`: the loader as a torchtitan (>= 0.3) `BaseDataLoader` with a `Config`."""
    import dataclasses

    from torchtitan.components.dataloader import BaseDataLoader

    class CroupierTitanDataLoader(CroupierTitanLoader, BaseDataLoader):
        """Set `CroupierTitanDataLoader.Config(dataset_path=..., global_batch=..., cache_dir=...)` as the
        trainer config's `dataloader`; the trainer's `build(...)` gives the DP rank's loader."""

        @dataclasses.dataclass(kw_only=True, slots=True)
        class Config(BaseDataLoader.Config):
            server: str = ""
            """HOST:PORT of `croupier serve`; empty: embedded dealing over `dataset_path`"""
            job: str = "default"
            cache_dir: str = ""
            """local shard cache (required)"""
            global_batch: int = 0
            """documents per croupier step over all DP ranks (embedded dealing)"""
            seed: int = 0
            policy: str = "clusterclip"
            clip: str = ""
            budget_steps: int | None = None
            text_key: str = "text"
            token_key: str = ""
            eos_id: int | None = None
            """appended after every document (default: the tokenizer's EOS)"""
            max_carry: int | None = None
            num_workers: int = 0

        def __init__(self, config: Any, *, dp_world_size: int, dp_rank: int, tokenizer: Any = None,
                     seq_len: int, local_batch_size: int, snapshot_every_n_steps: int | None = None,
                     **kwargs: Any) -> None:
            def make(topology: Any) -> Any:
                return _config_dataset(config, topology)

            packed = _packed(make, dp_rank, dp_world_size, seq_len, local_batch_size,
                             None if config.token_key else tokenizer, text_key=config.text_key,
                             token_key=config.token_key or None, eos_id=config.eos_id,
                             max_carry=config.max_carry)
            extra: dict[str, Any] = {"num_workers": config.num_workers}
            if snapshot_every_n_steps is not None:
                extra["snapshot_every_n_steps"] = snapshot_every_n_steps
            CroupierTitanLoader.__init__(self, packed, dp_rank=dp_rank, dp_world_size=dp_world_size, **extra)

    return CroupierTitanDataLoader


def _config_dataset(config: Any, topology: Any) -> Any:
    """The croupier dataset a `CroupierTitanDataLoader.Config` names, reading `topology`'s slice."""
    from croupier.client.dataset import CroupierIterableDataset

    if not config.cache_dir:
        raise ConfigError("CroupierTitanDataLoader.Config.cache_dir is required (the local shard cache)")
    if config.server:
        return CroupierIterableDataset(config.server, config.job, cache_dir=config.cache_dir, topology=topology)
    if not config.dataset_path:
        raise ConfigError("CroupierTitanDataLoader.Config needs dataset_path (embedded dealing) or server")
    clip: int | str | None = int(config.clip) if config.clip.isdigit() else (config.clip or None)
    return CroupierIterableDataset.embedded(config.dataset_path, global_batch=config.global_batch,
                                            cache_dir=config.cache_dir, policy=config.policy, clip=clip,
                                            budget_steps=config.budget_steps, seed=config.seed, topology=topology)


_TITAN_CLASS: list[type] = []


def __getattr__(name: str) -> Any:
    if name == "CroupierTitanDataLoader":  # made on first access: it needs torchtitan importable
        if not _TITAN_CLASS:
            _TITAN_CLASS.append(_titan_loader_class())
        return _TITAN_CLASS[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
