"""`PackedSequences`: each step's documents as exactly R rows of L tokens, for LLM trainers.

A causal-LM trainer under DDP or FSDP wants equal shapes on every rank every step, not
documents. `PackedSequences` wraps a `CroupierIterableDataset` and turns the rank's slice of
each step into one item of `rows` x `seq_len` tokens:

- `input_ids`   int64 [R, L]: the documents' tokens, each document followed by `eos_id`, packed
  back to back in the server's order;
- `labels`      int64 [R, L]: `input_ids` with -100 on padding (the model shifts them);
- `loss_mask`   bool  [R, L]: True on real tokens;
- `document_ids` int64 [R, L]: the global sample id each token came from (-1 on padding), for
  per-document attention masks;
- `position_ids` int64 [R, L]: positions restarting at every document start and row start
  (0 on padding);
- `_croupier_step`: the step.

Use it with `DataLoader(packed, batch_size=None)` (the item is already the rank's batch).

Carry: tokens beyond R x L at the end of a step are carried into the next step of the same
lane, at most `max_carry` of them (default one row, L); the rest are dropped and counted in
`stats()["tokens_dropped"]`. So a step never needs more than its own documents plus one row,
and R x L can always be met or padded. The carry is part of `state_dict()`, so a restore
continues byte for byte. On elastic resume (another rank, world size or worker count than
the state was saved with) the carry belongs to no lane any more: it is dropped and counted in
`stats()["carry_dropped"]`, and packing starts afresh at the restored step.

Token columns: with `token_key`, a sample's tokens come from that MDS column (an integer
array, e.g. written by `croupier shards build --tokenizer`), and nothing is tokenized at
training time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from croupier.client.dataset import STEP_KEY, TOKENS_KEY, CroupierIterableDataset
from croupier.errors import ConfigError, DatasetError, StateError
from croupier.tokenizer import load_tokenizer, token_array

PACK_STATE_VERSION = 1
IGNORE_INDEX = -100


class PackedSequences(IterableDataset):
    """Exactly `rows` x `seq_len` tokens per step for this rank, deterministic and resumable.

    dataset: the rank's `CroupierIterableDataset`.
    tokenizer: a Hugging Face tokenizer (or a name/path loaded offline); unused with `token_key`.
    text_key: the MDS column holding the text; token_key: a column of token ids instead.
    eos_id: appended after every document (default: the tokenizer's EOS token).
    pad_id: fills rows a step cannot fill (masked out of the loss).
    max_carry: tokens carried into the next step at most (default seq_len).
    """

    def __init__(self, dataset: CroupierIterableDataset, *, seq_len: int, rows: int, tokenizer: Any = None,
                 text_key: str = "text", token_key: str | None = None, eos_id: int | None = None,
                 pad_id: int = 0, max_carry: int | None = None) -> None:
        super().__init__()
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ConfigError(f"seq_len must be an int >= 2 (a next-token target needs two tokens), got {seq_len!r}")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"rows must be an int >= 1, got {rows!r}")
        if max_carry is not None and max_carry < 0:
            raise ConfigError(f"max_carry must be >= 0 tokens, got {max_carry}")
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        if token_key is None and tokenizer is None:
            raise ConfigError("packing needs a tokenizer, or token_key naming a column of token ids")
        if eos_id is None:
            eos_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
            if eos_id is None:
                raise ConfigError("no eos_id given and the tokenizer has no eos_token_id: pass eos_id")
        self.dataset = dataset
        self.seq_len = seq_len
        self.rows = rows
        self.tokenizer = tokenizer
        self.text_key = text_key
        self.token_key = token_key
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.max_carry = seq_len if max_carry is None else int(max_carry)
        self._carry_tokens = np.zeros(0, np.int64)
        self._carry_docs = np.zeros(0, np.int64)
        self._backend: Any = None  # a fast tokenizer's backend, once it agrees with the tokenizer (`_encode`)
        self._backend_checked = False
        self._stats = dict(steps=0, documents=0, tokens_in=0, tokens_packed=0, tokens_padding=0,
                           tokens_dropped=0, carry_dropped=0)

    # -- packing ---------------------------------------------------------------------------------

    def _rows(self, samples: list[dict[str, Any]]) -> list[Any]:
        """Each document's token ids: int64 arrays from the token column, or lists from the tokenizer."""
        if self.token_key is not None:
            return [token_array(s[self.token_key], f"sample {s.get('_croupier_id')} ({self.token_key!r})")
                    for s in samples]
        return self._encode([str(s[self.text_key]) for s in samples])

    def _tokens(self, samples: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(every document's tokens followed by EOS, back to back; each document's length + 1)."""
        if self.token_key is not None:
            arrays = self._rows(samples)
            lengths = np.fromiter((a.size + 1 for a in arrays), np.int64, len(arrays))
            eos = np.array([self.eos_id], np.int64)
            flat = np.concatenate([x for a in arrays for x in (a, eos)]) if arrays else np.zeros(0, np.int64)
            return flat, lengths
        encoded = self._rows(samples)
        lengths = np.fromiter((len(row) + 1 for row in encoded), np.int64, len(encoded))
        eos_row = (self.eos_id,)
        flat = np.fromiter(itertools.chain.from_iterable(x for row in encoded for x in (row, eos_row)), np.int64,
                           int(lengths.sum()))
        return flat, lengths

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, no special tokens. A Hugging Face fast tokenizer is called
        through its backend (`backend_tokenizer.encode_batch`: the same ids without the
        per-call wrapping, a sixth of the tokenizer's time on short steps) once the first
        batch showed both ways agree, and while the backend neither truncates nor pads."""
        backend = self._backend
        if backend is not None and backend.truncation is None and backend.padding is None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self._backend is None and not self._backend_checked:
            self._backend_checked = True
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None and hasattr(backend, "encode_batch") and backend.truncation is None \
                    and backend.padding is None \
                    and [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] == list(encoded):
                self._backend = backend
        return encoded

    def pack(self, step: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """One step's item from its samples (and the carry), updating the carry and counters.
        Under a job dealt in tokens the slice fixes the cut instead (`_pack_exact`)."""
        if samples and TOKENS_KEY in samples[0]:
            return self._pack_exact(step, samples, self._rows(samples))
        flat, lengths = self._tokens(samples)
        ids = np.fromiter((int(s["_croupier_id"]) for s in samples), np.int64, len(samples))
        tokens = np.concatenate([self._carry_tokens, flat])
        owners = np.concatenate([self._carry_docs, np.repeat(ids, lengths)])
        starts = np.zeros(tokens.size, bool)  # first token of a document (a carried tail is no start)
        starts[self._carry_tokens.size + np.cumsum(lengths) - lengths] = True
        need = self.rows * self.seq_len
        used = min(need, tokens.size)
        rest = tokens.size - used
        keep = min(rest, self.max_carry)
        self._carry_tokens = tokens[used:used + keep].copy()
        self._carry_docs = owners[used:used + keep].copy()
        st = self._stats
        st["steps"] += 1
        st["documents"] += len(samples)
        st["tokens_in"] += int(lengths.sum())
        st["tokens_packed"] += used
        st["tokens_padding"] += need - used
        st["tokens_dropped"] += rest - keep
        input_ids = np.full(need, self.pad_id, np.int64)
        document_ids = np.full(need, -1, np.int64)
        seg_start = np.ones(need, bool)
        input_ids[:used] = tokens[:used]
        document_ids[:used] = owners[:used]
        seg_start[:used] = starts[:used]
        shape = (self.rows, self.seq_len)
        input_ids, document_ids, seg_start = input_ids.reshape(shape), document_ids.reshape(shape), seg_start.reshape(shape)
        seg_start[:, 0] = True  # positions restart at every row start too
        mask = document_ids >= 0
        cols = np.arange(self.seq_len, dtype=np.int64)
        row_base = np.maximum.accumulate(np.where(seg_start, cols, 0), axis=1)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(np.where(mask, input_ids, IGNORE_INDEX)),
            "loss_mask": torch.from_numpy(mask),
            "document_ids": torch.from_numpy(document_ids),
            "position_ids": torch.from_numpy(np.where(mask, cols - row_base, 0)),
            STEP_KEY: step,
        }

    def _pack_exact(self, step: int, samples: list[dict[str, Any]], rows: list[Any]) -> dict[str, Any]:
        """A token-dealt step: each document's stream tokens [start, end) as the slice says, in
        rows of seq_len (a step's rows are its G / D tokens / seq_len, so a token schedule's ramp
        adds rows); no padding, no drop, no carry. A document whose tokens differ from the
        counts the job dealt by is refused, naming it and both counts."""
        ids: list[int] = []
        sizes: list[int] = []
        cut: list[Any] = []  # each document's part [a, b) of its stream tokens (its tokens, then EOS)
        column = self.token_key is not None  # int64 arrays; else the tokenizer's lists
        eos = np.array([self.eos_id], np.int64) if column else (self.eos_id,)
        for s, row in zip(samples, rows):
            a, b, dealt = s[TOKENS_KEY]
            if len(row) + 1 != dealt:
                raise DatasetError(f"sample {int(s['_croupier_id'])}: the tokenizer gives {len(row)} tokens, the job "
                                   f"dealt it as {int(dealt) - 1} (its sidecar's token counts were made another way): "
                                   "refusing to shift the token stream")
            cut.append(row[a:b] if b <= len(row) else (np.concatenate((row[a:], eos)) if column else (*row[a:], *eos)))
            ids.append(int(s["_croupier_id"]))
            sizes.append(int(b) - int(a))
        need = sum(sizes)
        if need % self.seq_len:
            raise ConfigError(f"this rank is dealt {need} tokens at step {step} (global tokens / data-parallel "
                              f"ranks), not a multiple of seq_len {self.seq_len}: the rows of a step are its tokens "
                              "/ seq_len")
        if not cut:
            tokens = np.zeros(0, np.int64)
        elif column:
            tokens = np.concatenate(cut)
        else:
            tokens = np.fromiter(itertools.chain.from_iterable(cut), np.int64, need)
        st = self._stats
        st["steps"] += 1
        st["documents"] += len(samples)
        st["tokens_in"] += need
        st["tokens_packed"] += need
        shape = (need // self.seq_len, self.seq_len)
        # a segment starts at every document part (consecutive parts are different documents, a
        # split document's part included) and at every row; positions count from its start
        bounds = sorted({*itertools.accumulate(sizes[:-1], initial=0), *range(0, need, self.seq_len)}) if need else []
        seglens = [y - x for x, y in zip(bounds, [*bounds[1:], need])]
        positions = np.arange(need) - np.repeat(np.array(bounds, np.int64), seglens)
        input_ids = tokens.reshape(shape)  # fresh arrays (the conversion, the repeats): views need no copy
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(input_ids.copy()),
            "loss_mask": torch.from_numpy(np.ones(shape, bool)),
            "document_ids": torch.from_numpy(np.repeat(np.array(ids, np.int64), sizes).reshape(shape)),
            "position_ids": torch.from_numpy(positions.reshape(shape)),
            "cu_seqlens": torch.from_numpy(np.array([*bounds, need], np.int32)),
            STEP_KEY: step,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for step, samples in self.dataset.iter_steps():
            yield self.pack(step, samples)

    def stats(self) -> dict[str, int]:
        """Counters of this process: steps, documents, tokens_in, tokens_packed, tokens_padding,
        tokens_dropped (beyond the carry bound), carry_dropped (on elastic resume)."""
        return dict(self._stats)

    # -- state -----------------------------------------------------------------------------------

    def _lane(self) -> list[int]:
        info = get_worker_info()
        topo = self.dataset.topology
        return [topo.rank, topo.world, 1 if info is None else info.num_workers, 0 if info is None else info.id]

    def state_dict(self, next_step: int | None = None) -> dict[str, Any]:
        """The dataset's position plus the carry, local and cheap (safe to call every step).

        next_step: a global step (see `CroupierIterableDataset.state_dict`); such a state carries
        no carry, since it may resume on any number of workers."""
        inner = self.dataset.state_dict(next_step=next_step)
        carry = next_step is None
        return {
            "version": PACK_STATE_VERSION,
            "dataset": inner,
            "lane": self._lane(),
            "seq_len": self.seq_len,
            "rows": self.rows,
            "carry_tokens": self._carry_tokens.tolist() if carry else [],
            "carry_docs": self._carry_docs.tolist() if carry else [],
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores position and carry; the carry is dropped (and counted) on elastic resume."""
        if not isinstance(state, Mapping) or state.get("version") != PACK_STATE_VERSION:
            raise StateError(f"packed state version {getattr(state, 'get', lambda k: None)('version')!r} is not "
                             f"supported (expected {PACK_STATE_VERSION})")
        missing = [k for k in ("dataset", "lane", "seq_len", "rows", "carry_tokens", "carry_docs", "stats") if k not in state]
        if missing:
            raise StateError(f"packed state lacks {missing}")
        if (state["seq_len"], state["rows"]) != (self.seq_len, self.rows):
            raise StateError(f"packed state is for {state['rows']} rows of {state['seq_len']} tokens, this packer "
                             f"makes {self.rows} of {self.seq_len}")
        tokens = np.asarray(state["carry_tokens"], np.int64)
        docs = np.asarray(state["carry_docs"], np.int64)
        if tokens.shape != docs.shape or tokens.ndim != 1 or tokens.size > self.max_carry:
            raise StateError(f"packed state carry is malformed: {tokens.size} tokens and {docs.size} document ids "
                             f"(at most {self.max_carry}, equal lengths)")
        self.dataset.load_state_dict(state["dataset"])
        self._stats = {k: int(state["stats"].get(k, 0)) for k in self._stats}
        if list(state["lane"]) == self._lane():
            self._carry_tokens, self._carry_docs = tokens, docs
        else:
            self._stats["carry_dropped"] += int(tokens.size)
            self._carry_tokens = self._carry_docs = np.zeros(0, np.int64)
