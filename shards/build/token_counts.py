"""Per-sample token counts of an MDS dataset, for the cluster sidecar.

Counts let the sampler's users weigh clusters and sources by tokens rather than documents
(a cluster of long documents holds more training signal than its document count says). They
come either from tokenizing a text column with a Hugging Face tokenizer loaded offline, or
from the lengths of a stored token column (`shards build --tokenizer`, LLM Foundry's
`concat_tokens` layout). `croupier shards build --tokenizer` records them while it writes;
`croupier shards tokens` adds them to a dataset built without.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError

INTEGER_ENCODING = re.compile(r"^ndarray:u?int(8|16|32|64)$")
"""MDS encodings a token column may have (besides raw `bytes`, read as int64 ids, and
`ndarray`/`pkl`/`json`, whose values are checked one by one)."""
_CHECKED_PER_VALUE = ("bytes", "ndarray", "pkl", "json")


def check_token_column(columns: dict[str, str], field: str, where: str) -> None:
    """Refuses a token column that is missing or whose MDS encoding cannot hold integer ids."""
    if field not in columns:
        raise ConfigError(f"--token-field {field!r}: {where} has no such column; columns: "
                          f"{', '.join(columns) or 'none'}")
    enc = columns[field]
    if not (INTEGER_ENCODING.match(enc) or enc in _CHECKED_PER_VALUE):
        raise ConfigError(f"--token-field {field!r} of {where} is encoded {enc!r}: a token column must hold "
                          f"integer token ids (ndarray:int32, ndarray:int64, ... or bytes)")


def count_source(source: Any, *, tokenizer: Any = None, text_field: str | None = None,
                 token_field: str | None = None, chunk: int = 1024,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
    """int32 (N,) token count of every sample of an `MDSSource`, from `token_field`'s lengths
    or by tokenizing `text_field` with `tokenizer` (without special tokens, as the build's
    token column and the client's packer do)."""
    from croupier.tokenizer import encode, token_array

    if (text_field is None) == (token_field is None):
        raise ConfigError("count tokens from either a text field or a token field, not both or neither")
    n = len(source)
    counts = np.zeros(n, dtype=np.int32)
    field = token_field or text_field
    source.require_column(field)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        values = source.texts(lo, hi, field)
        if token_field is not None:
            counts[lo:hi] = [len(token_array(v, f"column {field!r} of sample {lo + i} of {source.location}"))
                             for i, v in enumerate(values)]
        else:
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise DatasetError(f"--text-field {field!r} of sample {lo + bad} of {source.location} holds "
                                   f"{type(values[bad]).__name__}, not text")
            counts[lo:hi] = [len(t) for t in encode(tokenizer, values)]
        if progress is not None:
            progress(hi - lo)
    return counts


def add_token_counts(dataset: str, *, tokenizer: str | None = None, text_field: str | None = None,
                     token_field: str | None = None, chunk: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Counts the tokens of every sample of a built dataset and stores them in its sidecar
    (atomically: the array first, then the manifest). Returns the manifest entry's figures."""
    from croupier.format.sidecar import Sidecar
    from croupier.shards.build.mds import MDSSource

    if text_field is not None and token_field is not None:
        raise ConfigError(f"give --text-field ({text_field!r}) or --token-field ({token_field!r}), not both")
    if chunk < 1:
        raise ConfigError(f"--chunk must be >= 1, got {chunk}")
    side = Sidecar.open(dataset)
    columns = dict(side.manifest.get("columns") or {})
    tok = None
    if token_field is None:
        text_field = text_field or side.manifest.get("text_field") or "text"
        if tokenizer is None:
            raise ConfigError(f"counting the tokens of the text field {text_field!r} needs --tokenizer")
    from croupier.tokenizer import load_tokenizer

    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)  # refused, named, before anything is read
    with MDSSource(side.remote or dataset) as src:
        if not columns:  # an adopted dataset: the encodings are in its index
            columns = {c: e for c, e in zip(src.columns, src.index.shards[0].info.get("column_encodings", []))}
        if token_field is not None:
            check_token_column(columns, token_field, f"dataset {dataset!r}")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(src), desc="tokens", unit="doc")
        try:
            counts = count_source(src, tokenizer=tok, text_field=None if token_field else text_field,
                                  token_field=token_field, chunk=chunk, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
    params = {"tokenizer": tokenizer, "field": token_field or text_field,
              "from": "token column" if token_field else "text"}
    side.write_token_counts(counts, params)
    return side.token_counts_params() or {}
