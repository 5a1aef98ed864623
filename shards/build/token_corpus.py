"""Tokenized corpora as build inputs: Megatron indexed datasets and OLMo-style token arrays.

`croupier shards build corpus.idx ...` or `croupier shards build tokens.npy --eos-id N ...`
takes documents that are token ids already: each document becomes one sample holding only a
token column (`--token-field`, int32), with no text and no tokenization; its token count goes
to the sidecar's `token_counts`. Embeddings come from the user (`--embeddings FILE`) or from
decoding the tokens with `--tokenizer` and embedding the text.

Megatron indexed dataset (`MMapIndexedDataset`, a `PREFIX.bin` + `PREFIX.idx` pair; pass the
`.idx`): the index is, little-endian,

    9 bytes  b"MMIDIDX\\x00\\x00"       magic
    uint64   1                          version
    uint8    dtype code                 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                        6 float64, 7 float32, 8 uint16
    uint64   S                          number of sequences
    uint64   D                          number of entries of doc_idx (documents + 1)
    int32    sizes[S]                   tokens of every sequence
    int64    pointers[S]                byte offset of every sequence in the .bin
    int64    doc_idx[D]                 first sequence of every document, then S

and the `.bin` holds the tokens. A document is its sequences doc_idx[i] .. doc_idx[i+1]-1,
concatenated.

OLMo-style token array (`.npy`): a flat array of token ids, either a NumPy `.npy` file or,
as OLMo's own memory-mapped files are, raw headerless ids (`--token-dtype`, default uint16).
Documents are separated by the end-of-document token (`--eos-id`, required): every document
ends with it, as OLMo/Dolma tokenization appends it, and a document is the ids up to and
including its EOS; ids after the last EOS form a last document. So the documents, in order,
concatenate back to the original array. (A separate boundaries file is not read: the EOS is
the boundary OLMo itself uses.)

Token ids must be non-negative integers that fit int32. Several token inputs are read in the
order given; text and token inputs are not mixed in one build. Token inputs are named
explicitly (a folder is walked for text inputs only).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
MEGATRON_DTYPES: dict[int, Any] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                                   7: np.float32, 8: np.uint16}
"""Megatron's dtype codes (`megatron.core.datasets.indexed_dataset.DType`)."""
TOKEN_KINDS = ("megatron", "olmo")
INT32_MAX = 2**31 - 1


def token_kind(path: Path) -> str | None:
    """`megatron` for a `.idx` (or its `.bin`), `olmo` for a `.npy`, else None."""
    suffix = path.suffix.lower()
    if suffix in (".idx", ".bin"):
        return "megatron"
    if suffix == ".npy":
        return "olmo"
    return None


class MegatronCorpus:
    """A Megatron indexed dataset, memory-mapped: documents as token arrays."""

    kind = "megatron"

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        self.idx, self.bin = p.with_suffix(".idx"), p.with_suffix(".bin")
        for f in (self.idx, self.bin):
            if not f.is_file():
                raise DatasetError(f"Megatron indexed dataset {str(p.with_suffix(''))!r}: {f.name} is missing "
                                   "(the .bin and .idx files go together)")
        where = str(self.idx)
        raw = np.memmap(self.idx, dtype=np.uint8, mode="r")
        head = 9 + 8 + 1 + 8 + 8
        if len(raw) < head or bytes(raw[:9]) != MEGATRON_MAGIC:
            raise DatasetError(f"{where} is not a Megatron index (no MMIDIDX header)")
        version, code, seqs, docs = struct.unpack("<QBQQ", bytes(raw[9:head]))
        if version != MEGATRON_VERSION:
            raise DatasetError(f"{where}: Megatron index version {version}, this croupier reads {MEGATRON_VERSION}")
        if code not in MEGATRON_DTYPES or np.dtype(MEGATRON_DTYPES[code]).kind not in "iu":
            raise DatasetError(f"{where}: dtype code {code} is not an integer token type")
        self.dtype = np.dtype(MEGATRON_DTYPES[code])
        need = head + 4 * seqs + 8 * seqs + 8 * docs
        if len(raw) < need:
            raise DatasetError(f"{where} is truncated: {len(raw)} bytes, its header needs {need}")
        self.sizes = np.frombuffer(raw, dtype="<i4", count=seqs, offset=head)
        self.pointers = np.frombuffer(raw, dtype="<i8", count=seqs, offset=head + 4 * seqs)
        self.doc_idx = np.frombuffer(raw, dtype="<i8", count=docs, offset=head + 12 * seqs)
        if docs < 1 or self.doc_idx[0] != 0 or self.doc_idx[-1] != seqs or (np.diff(self.doc_idx) < 0).any():
            raise DatasetError(f"{where}: doc_idx must rise from 0 to the {seqs} sequences")
        self.tokens = np.memmap(self.bin, dtype=self.dtype, mode="r") if self.bin.stat().st_size else \
            np.zeros(0, dtype=self.dtype)
        ends = self.pointers + self.sizes.astype(np.int64) * self.dtype.itemsize
        if seqs and (int(ends.max()) > self.bin.stat().st_size or (self.pointers % self.dtype.itemsize).any()):
            raise DatasetError(f"{where}: sequence pointers reach past {self.bin.name} "
                               f"({self.bin.stat().st_size} bytes)")
        seq_lengths = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        self.lengths = seq_lengths[self.doc_idx[1:]] - seq_lengths[self.doc_idx[:-1]]

    def __len__(self) -> int:
        return len(self.doc_idx) - 1

    def doc(self, i: int) -> np.ndarray:
        s0, s1 = int(self.doc_idx[i]), int(self.doc_idx[i + 1])
        step = self.dtype.itemsize
        parts = [self.tokens[int(self.pointers[s]) // step:int(self.pointers[s]) // step + int(self.sizes[s])]
                 for s in range(s0, s1)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.idx.with_suffix("").resolve()), "dtype": str(self.dtype),
                "documents": len(self), "sequences": int(len(self.sizes))}


class OlmoCorpus:
    """A flat token array (`.npy` or raw ids) cut into documents after every EOS."""

    kind = "olmo"

    def __init__(self, path: str | Path, eos_id: int | None, dtype: str = "uint16") -> None:
        self.path = Path(path)
        if eos_id is None:
            raise ConfigError(f"token array {str(self.path)!r} needs --eos-id N: documents are separated by the "
                              "end-of-document token")
        if not self.path.is_file():
            raise DatasetError(f"token array {str(self.path)!r} does not exist")
        with open(self.path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            try:
                arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DatasetError(f"token array {str(self.path)!r} is unreadable: {exc}") from None
            self.header = "npy"
        else:
            try:
                dt = np.dtype(dtype)
            except TypeError:
                raise ConfigError(f"--token-dtype {dtype!r} is not a NumPy dtype") from None
            size = self.path.stat().st_size
            if size % dt.itemsize:
                raise DatasetError(f"raw token array {str(self.path)!r} has {size} bytes, not a whole number of "
                                   f"{dt} ids (--token-dtype)")
            arr = np.memmap(self.path, dtype=dt, mode="r") if size else np.zeros(0, dtype=dt)
            self.header = "raw"
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DatasetError(f"token array {str(self.path)!r} must be 1-D integer ids, got {arr.dtype} {arr.shape}")
        self.tokens = arr
        self.eos_id = int(eos_id)
        ends = np.flatnonzero(np.asarray(arr) == self.eos_id) + 1
        if len(ends) == 0 or ends[-1] != len(arr):
            ends = np.concatenate([ends, [len(arr)]]) if len(arr) else ends
        self.starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
        self.ends = ends.astype(np.int64)
        self.lengths = self.ends - self.starts

    def __len__(self) -> int:
        return len(self.ends)

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[int(self.starts[i]):int(self.ends[i])])

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve()), "dtype": str(self.tokens.dtype),
                "format": self.header, "eos_id": self.eos_id, "documents": len(self)}


def open_corpus(path: str | Path, eos_id: int | None, token_dtype: str) -> MegatronCorpus | OlmoCorpus:
    """The token corpus at `path` (a Megatron .idx/.bin or an OLMo-style .npy)."""
    kind = token_kind(Path(path))
    if kind == "megatron":
        return MegatronCorpus(path)
    if kind == "olmo":
        return OlmoCorpus(path, eos_id, token_dtype)
    raise ConfigError(f"{str(path)!r} is not a token corpus (a Megatron .idx/.bin or a .npy token array)")


def as_int32(tokens: np.ndarray, where: str) -> np.ndarray:
    """Token ids as int32, refusing negative ids or ids past int32."""
    t = np.asarray(tokens)
    if len(t) and (int(t.min()) < 0 or int(t.max()) > INT32_MAX):
        raise DatasetError(f"{where}: token ids must lie in [0, {INT32_MAX}], got [{int(t.min())}, {int(t.max())}]")
    return t.astype(np.int32)


class TokenStore:
    """The build's working copy of the documents' tokens: `tokens.npy` (int32, all documents end to
    end) and `token_offsets.npy` (int64, N+1), memory-mapped, indexed by document id."""

    TOKENS, OFFSETS = "tokens.npy", "token_offsets.npy"

    def __init__(self, work: Path) -> None:
        self.tokens = np.load(work / self.TOKENS, mmap_mode="r")
        self.offsets = np.load(work / self.OFFSETS, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def docs(self, ids: np.ndarray) -> list[np.ndarray]:
        off = self.offsets
        return [np.asarray(self.tokens[off[i]:off[i + 1]]) for i in np.asarray(ids, dtype=np.int64).tolist()]

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return (np.asarray(self.offsets[ids + 1]) - np.asarray(self.offsets[ids])).astype(np.int64)

    def nbytes(self, lo: int, hi: int) -> np.ndarray:
        """Stored size of documents [lo, hi): 4 bytes per int32 token."""
        return 4 * self.lengths(np.arange(lo, hi, dtype=np.int64))


def ingest_corpora(paths: list[str], work: Path, eos_id: int | None, token_dtype: str,
                   chunk: int = 1 << 22) -> tuple[int, list[dict[str, Any]]]:
    """Copy every document of the token inputs, in order, into a `TokenStore` in `work`; returns the
    number of documents and each input's description."""
    corpora = [open_corpus(p, eos_id, token_dtype) for p in paths]
    total = int(sum(int(np.sum(c.lengths)) for c in corpora))
    n = sum(len(c) for c in corpora)
    tmp_tokens = work / f".{TokenStore.TOKENS}.tmp"
    out = np.lib.format.open_memmap(tmp_tokens, mode="w+", dtype=np.int32, shape=(total,))
    offsets = np.zeros(n + 1, dtype=np.int64)
    pos, doc = 0, 0
    for c, path in zip(corpora, paths):
        lengths = np.asarray(c.lengths, dtype=np.int64)
        offsets[doc + 1:doc + 1 + len(c)] = pos + np.cumsum(lengths)
        flat = _contiguous(c)
        if flat is not None:  # the documents end to end are one stretch of the file: copy it in chunks
            for lo in range(0, len(flat), chunk):
                out[pos + lo:pos + min(len(flat), lo + chunk)] = as_int32(flat[lo:lo + chunk], path)
        else:
            at = pos
            for i in range(len(c)):
                d = c.doc(i)
                out[at:at + len(d)] = as_int32(d, f"{path}, document {i}")
                at += len(d)
        pos += int(lengths.sum())
        doc += len(c)
    out.flush()
    del out
    from croupier.format.atomic import replace_durably, write_npy_atomic

    write_npy_atomic(work / TokenStore.OFFSETS, offsets)
    replace_durably(tmp_tokens, work / TokenStore.TOKENS)
    return n, [c.describe() for c in corpora]


def _contiguous(c: MegatronCorpus | OlmoCorpus) -> np.ndarray | None:
    """The corpus's tokens when its documents, in order, are exactly the file's ids end to end."""
    if isinstance(c, OlmoCorpus):
        return c.tokens
    step = c.dtype.itemsize
    expect = np.concatenate([[0], np.cumsum(c.sizes.astype(np.int64))[:-1]]) * step if len(c.sizes) else c.pointers
    if len(c.sizes) and np.array_equal(c.pointers, expect):  # documents are consecutive runs of sequences
        return c.tokens[:int(c.sizes.sum())]
    return None
