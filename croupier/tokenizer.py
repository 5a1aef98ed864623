"""Hugging Face tokenizers loaded offline, and token columns in MDS shards.

Shared by `croupier shards build --tokenizer` (which stores token ids as an MDS column so that
training does not tokenize again) and the client's packer (which reads that column or
tokenizes text). Nothing here downloads: a tokenizer is a local folder or already in the
Hugging Face cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError

TOKEN_COLUMN_ENCODING = "ndarray:int32"
"""MDS encoding of a token column written by croupier (vocabularies fit in int32)."""


def load_tokenizer(name_or_path: str) -> Any:
    """A Hugging Face tokenizer from a local path or the local cache only (no download)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except Exception as exc:  # transformers raises several types for "not available offline"
        raise ConfigError(f"tokenizer {name_or_path!r} cannot be loaded offline (a local folder or a model "
                          f"already in the Hugging Face cache is needed): {exc}") from exc


def encode(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text, without special tokens, as int32 arrays."""
    if len(tokenizer) >= 2**31:
        raise ConfigError(f"tokenizer vocabulary of {len(tokenizer)} does not fit the int32 token column")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [np.asarray(row, dtype=np.int32) for row in ids]


def token_array(value: Any, where: str, bytes_dtype: str = "int64") -> np.ndarray:
    """A token column's value as an int64 array; raw bytes are read as `bytes_dtype` (LLM
    Foundry's concat_tokens layout stores int64 bytes). Anything not integer is refused."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = np.frombuffer(value, dtype=np.dtype(bytes_dtype))
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise DatasetError(f"token column of {where} holds {arr.dtype}, not integer token ids")
    return arr.astype(np.int64, copy=False).ravel()
