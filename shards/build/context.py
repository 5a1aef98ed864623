"""What every stage of one build works with: its settings, folders, state and lazy inputs.

`BuildPaths` says where the dataset, the sidecar and the work folder are (an `--adopt` build
writes only a sidecar, an object-store `--out` is built in `--work-dir` first).
`BuildContext` carries the build state and its commit (`commit(stage, unit)`: the state is
saved, then the hook runs, so a build killed in the hook resumes after that unit), the
stage timings, the progress output and the inputs that are opened once and shared: the
ingested text parts, the adopted dataset, the tokenizer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError
from croupier.format import sidecar_layout as names
from croupier.format.atomic import write_json_atomic
from croupier.format.sidecar_layout import SIDECAR_DIR
from croupier.shards.build import work_files
from croupier.shards.build.config import BuildConfig, Hook
from croupier.shards.build.progress import Progress


@dataclass(frozen=True)
class BuildPaths:
    """Where a build writes: the dataset folder `out`, its sidecar and the work folder."""

    out: Path
    in_place: bool
    """An `--adopt` build whose sidecar goes beside the adopted shards."""
    remote_out: str | None = None
    """An object-store `--out`: the dataset is built in `out` (under --work-dir), then published."""

    @property
    def side(self) -> Path:
        return self.out / SIDECAR_DIR

    @property
    def work(self) -> Path:
        return self.side / names.WORK_DIR

    @property
    def state(self) -> Path:
        return self.work / work_files.STATE

    @classmethod
    def of(cls, cfg: BuildConfig) -> BuildPaths:
        if cfg.adopt is not None:
            from croupier.shards.build.mds import is_remote

            if cfg.out is None and is_remote(cfg.adopt):
                raise ConfigError("--out DIR is required to adopt a remote dataset (the sidecar is written there)")
            out = Path(cfg.out) if cfg.out else Path(cfg.adopt)
            return cls(out, in_place=not is_remote(cfg.adopt) and out.resolve() == Path(cfg.adopt).resolve())
        if "://" in str(cfg.out):
            return cls(Path(cfg.work_dir) / "dataset", in_place=False, remote_out=str(cfg.out))  # type: ignore[arg-type]
        return cls(Path(cfg.out), in_place=False)  # type: ignore[arg-type]


class BuildContext:
    """One build's settings, folders, state, timings and shared inputs (see the module docstring)."""

    def __init__(self, cfg: BuildConfig, paths: BuildPaths, hook: Hook | None = None) -> None:
        self.cfg = cfg
        self.paths = paths
        self.hook = hook
        self.progress = Progress(cfg.progress)
        self.state: dict[str, Any] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self._source: Any = None
        self._tokenizer: Any = None

    @property
    def work(self) -> Path:
        return self.paths.work

    @property
    def n(self) -> int:
        """The number of documents (known once the ingest stage is done)."""
        return int(self.state["n"])

    # -- state ---------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the build state (atomically)."""
        write_json_atomic(self.paths.state, self.state)

    def commit(self, stage: str, unit: int) -> None:
        """Save the state after a finished unit of `stage`, then run the hook."""
        self.save()
        if self.hook is not None:
            self.hook(stage, unit)

    def timed(self, stage: str, t0: float, docs: int) -> dict[str, float]:
        """Record a stage's time since `t0` (perf_counter) and its documents; returns the entry."""
        entry = {"seconds": time.perf_counter() - t0, "docs": float(docs)}
        self.timings[stage] = entry
        return entry

    # -- inputs ----------------------------------------------------------------------------------
    def store(self) -> Any:
        """The ingested text parts (`TextStore`), or the token store of token corpora, indexed by document id."""
        from croupier.shards.build.textstore import TextStore

        if self.cfg.token_inputs:
            from croupier.shards.build.token_corpus import TokenStore

            return TokenStore(self.work)
        return TextStore(self.work / work_files.PARTS, self.state["parts"], self.cfg.keep_fields)

    def source(self) -> Any:
        """The adopted MDS dataset (`MDSSource`), opened once; refuses one without the text column."""
        if self._source is None:
            from croupier.shards.build.mds import MDSSource

            self._source = MDSSource(self.cfg.adopt)  # type: ignore[arg-type]
            if not self.decodes_tokens():
                self._source.require_column(self.cfg.text_field)
        return self._source

    def decodes_tokens(self) -> bool:
        """An adopted dataset with a token column and no text column is embedded by decoding."""
        source = self.source()
        return (self.cfg.tokenizer is not None and self.cfg.text_field not in source.columns
                and self.cfg.token_field in source.columns)

    def tokenizer(self) -> Any:
        """The --tokenizer, loaded (offline) once."""
        if self._tokenizer is None:
            from croupier.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.tokenizer)  # type: ignore[arg-type]
        return self._tokenizer

    def text_reader(self) -> Callable[[int, int], list[str]]:
        """`read(lo, hi)`: the texts of documents [lo, hi), from the ingested parts or the adopted dataset."""
        if self.cfg.adopt is None and self.cfg.token_inputs:
            tokens = self.store()

            def decode_store(lo: int, hi: int) -> list[str]:
                docs = tokens.docs(np.arange(lo, hi))
                return self.tokenizer().batch_decode([d.astype(np.int64) for d in docs], skip_special_tokens=True)

            return decode_store
        if self.cfg.adopt is None:
            store = self.store()
            return store.text_range
        source = self.source()
        if not self.decodes_tokens():
            return lambda lo, hi: source.texts(lo, hi, self.cfg.text_field)

        def decode(lo: int, hi: int) -> list[str]:
            from croupier.tokenizer import token_array

            rows = source.texts(lo, hi, self.cfg.token_field)
            arrays = [token_array(v, f"sample {lo + i} of {self.cfg.adopt}") for i, v in enumerate(rows)]
            return self.tokenizer().batch_decode(arrays, skip_special_tokens=True)

        return decode

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
