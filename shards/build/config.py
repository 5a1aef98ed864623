"""What a build is asked to do (`BuildConfig`) and what it produced (`BuildResult`).

`BuildConfig` is validated at construction, so every engine starts from settings that hold
together; `key()` is the part of it that a resumed build must share with the interrupted
one. The default K (`auto_clusters`) is here too: it is a setting, derived from the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from croupier.errors import ConfigError
from croupier.format.sidecar_layout import LAYOUTS
from croupier.shards.build.grouping import GroupingConfig

Hook = Callable[[str, int], None]
"""`hook(stage, unit)`: called after every committed unit of work (a part, a chunk, a task)."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines a build's output (plus how to report progress)."""

    out: str | None
    inputs: tuple[str, ...] = ()
    adopt: str | None = None
    text_field: str = "text"
    keep_fields: tuple[str, ...] = ()
    embedder: str = "minilm"
    clusters: int | None = None
    layout: str = "cluster-major"
    shard_size: int = 1 << 26
    compression: str | None = "zstd"
    seed: int = 0
    niter: int = 20
    max_train: int = 262_144
    chunk: int = 8192
    assign_chunk: int = 65_536
    part_docs: int = 262_144
    batch_size: int = 64
    skip_bad: bool = False
    overwrite: bool = False
    device: str | None = None
    progress: bool = True
    tokenizer: str | None = None
    token_field: str = "tokens"
    work_dir: str | None = None
    group_by: str | None = None
    clusters_per_group: int | None = None
    cluster_size: int | None = None
    min_cluster_size: int | None = None
    embed_cache: str | None = None
    """A folder of embeddings kept across builds of the same texts (`croupier.shards.build.embed_cache`)."""
    embeddings: str | None = None
    """The user's embeddings in place of the embedder: a .npy/.parquet file or a field of the records
    (`croupier.shards.build.embeddings_in`)."""
    embeddings_column: str | None = None
    """With a Parquet --embeddings: the column holding the vectors (default `embedding`)."""
    embeddings_key: str | None = None
    """With a Parquet --embeddings: a column that must equal this field of the records, row by row."""
    eos_id: int | None = None
    """With OLMo-style .npy token inputs: the end-of-document token that separates the documents."""
    token_dtype: str = "uint16"
    """With raw (headerless) OLMo-style token inputs: the ids' dtype."""

    def __post_init__(self) -> None:
        if (self.group_by is not None or self.clusters_per_group is not None or self.cluster_size is not None
                or self.min_cluster_size is not None):
            self._check_grouping()
        if bool(self.inputs) == bool(self.adopt):
            raise ConfigError("give either INPUT files/folders or --adopt MDS_DIR_OR_REMOTE, not both or neither")
        if self.adopt is None and not self.out:
            raise ConfigError("--out DIR is required when building from inputs")
        if self.out and "://" in self.out and (self.adopt is not None or not self.work_dir):
            raise ConfigError(f"--out {self.out} is an object store: build from inputs and give --work-dir DIR, a "
                              "local folder for the resumable work (got "
                              + ("--adopt" if self.adopt is not None else "no --work-dir") + ")")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; valid layouts: {', '.join(LAYOUTS)}")
        if self.adopt is not None and self.layout != "original":
            raise ConfigError("--adopt keeps the dataset as it is: use --layout original "
                              f"(got {self.layout!r})")
        if self.adopt is not None and self.keep_fields:
            raise ConfigError("--keep-fields applies to building from inputs, not to --adopt")
        if self.clusters is not None and self.clusters < 1:
            raise ConfigError(f"--clusters must be >= 1, got {self.clusters}")
        for name, v, lo in (("--shard-size", self.shard_size, 1 << 10), ("--chunk", self.chunk, 1),
                            ("assign chunk", self.assign_chunk, 1), ("part size", self.part_docs, 1),
                            ("--niter", self.niter, 1), ("--batch-size", self.batch_size, 1)):
            if v < lo:
                raise ConfigError(f"{name} must be >= {lo}, got {v}")
        if self.shard_size >= 1 << 32:
            raise ConfigError(f"--shard-size must be < 4 GiB (MDS limit), got {self.shard_size}")
        if not self.text_field:
            raise ConfigError("--text-field must not be empty")
        self._check_embeddings()
        self._check_token_inputs()
        if self.tokenizer is not None and self.token_field in (self.text_field, *self.keep_fields):
            raise ConfigError(f"--token-field {self.token_field!r} must differ from the text field and the kept fields")

    def _check_grouping(self) -> None:
        """--group-by: the field is kept (an MDS column) and read at ingest; see `grouping`."""
        if self.group_by is None:
            raise ConfigError("--clusters-per-group, --cluster-size and --min-cluster-size need --group-by FIELD")
        if self.adopt is not None:
            raise ConfigError("--group-by applies to building from inputs, not to --adopt")
        if self.clusters is not None:
            raise ConfigError(f"--clusters {self.clusters} and --group-by are exclusive: the groups make the clusters "
                              "(use --clusters-per-group or --cluster-size)")
        if self.group_by == self.text_field:
            raise ConfigError(f"--group-by {self.group_by!r} must not be the text field")
        self.grouping()  # validates the rule
        if self.group_by not in self.keep_fields:
            object.__setattr__(self, "keep_fields", (*self.keep_fields, self.group_by))

    def _check_embeddings(self) -> None:
        """--embedder (a name, `none` or a model folder) and --embeddings FILE|FIELD hold together."""
        from croupier.shards.build.embed import NO_EMBEDDER, check_embedder
        from croupier.shards.build.embeddings_in import is_file_source

        if self.embeddings is None:
            check_embedder(self.embedder)
            if self.embeddings_column is not None or self.embeddings_key is not None:
                raise ConfigError("--embeddings-column and --embeddings-key apply to --embeddings FILE.parquet")
            if self.embedder == NO_EMBEDDER:
                rule = self.grouping()
                if rule is None:
                    raise ConfigError("--embedder none needs --group-by FIELD (one cluster per value) or "
                                      "--embeddings FILE|FIELD: without either nothing can make the clusters")
                if rule.clusters_per_group is not None or rule.cluster_size is not None:
                    raise ConfigError(f"--embedder none cannot run k-means inside the groups ({rule.rule()}): "
                                      "give --embeddings FILE|FIELD, or one cluster per group")
                if self.embed_cache is not None:
                    raise ConfigError(f"--embed-cache {self.embed_cache} keeps embeddings; --embedder none makes none")
            return
        if not self.embeddings:
            raise ConfigError("--embeddings must name a .npy/.parquet file or a field of the records, got ''")
        if self.embed_cache is not None:
            raise ConfigError(f"--embed-cache {self.embed_cache} keeps an embedder's output; "
                              f"--embeddings {self.embeddings} gives the embeddings: drop one")
        parquet = self.embeddings.lower().endswith(".parquet")
        if (self.embeddings_column is not None or self.embeddings_key is not None) and not parquet:
            raise ConfigError(f"--embeddings-column and --embeddings-key apply to a .parquet file, "
                              f"not --embeddings {self.embeddings}")
        if not is_file_source(self.embeddings) and self.embeddings == self.text_field:
            raise ConfigError(f"--embeddings {self.embeddings!r} is the text field, not a field of vectors")

    @property
    def token_inputs(self) -> bool:
        """Whether the inputs are token corpora (`croupier.shards.build.token_corpus`), not text."""
        from croupier.shards.build.token_corpus import token_kind

        return bool(self.inputs) and token_kind(Path(self.inputs[0])) is not None

    def _check_token_inputs(self) -> None:
        """Token corpora: all inputs of one kind, embeddings from a file or from decoding, no fields."""
        from croupier.shards.build.token_corpus import token_kind

        kinds = [token_kind(Path(p)) for p in self.inputs]
        if not any(kinds):
            if self.eos_id is not None:
                raise ConfigError(f"--eos-id {self.eos_id} separates the documents of .npy token inputs; "
                                  "the inputs are text")
            return
        if not all(kinds):
            text = next(p for p, k in zip(self.inputs, kinds) if k is None)
            token = next(p for p, k in zip(self.inputs, kinds) if k is not None)
            raise ConfigError(f"token corpora and text inputs do not mix in one build (got {token} and {text})")
        if "olmo" in kinds and self.eos_id is None:
            raise ConfigError("a .npy token array needs --eos-id N, the end-of-document token that separates "
                              "its documents")
        if self.group_by is not None or self.keep_fields:
            raise ConfigError("token corpora have no fields: --group-by and --keep-fields apply to text inputs")
        if self.embeddings is not None and not self.embeddings.lower().endswith((".npy", ".parquet")):
            raise ConfigError(f"--embeddings {self.embeddings!r}: token corpora have no fields, give a .npy or "
                              ".parquet file")
        if self.embeddings_key is not None:
            raise ConfigError("--embeddings-key matches a field of the records; token corpora have none")
        if self.embeddings is None and self.tokenizer is None:
            raise ConfigError("a token corpus has no text to embed: give --embeddings FILE (one vector per "
                              "document) or --tokenizer NAME_OR_PATH to decode the tokens for the embedder")

    @property
    def cluster_major(self) -> bool:
        """Whether the shards are rewritten cluster by cluster (else input order is kept)."""
        return self.layout == "cluster-major"

    def grouping(self) -> GroupingConfig | None:
        """The --group-by rule, or None for a build clustered by k-means over the whole corpus."""
        return None if self.group_by is None else GroupingConfig(self.group_by, self.clusters_per_group,
                                                                 self.cluster_size, self.min_cluster_size)

    def key(self) -> dict[str, Any]:
        """The settings a resumed build must share with the interrupted one.

        `skip_bad` is not among them: everything ingested before a stop was good, so a
        build that stopped on a bad record may resume with --skip-bad; nor is `embed_cache`
        (it only decides where the same embeddings come from).
        """
        d = asdict(self)
        for k in ("overwrite", "device", "progress", "out", "batch_size", "skip_bad", "work_dir", "embed_cache"):
            d.pop(k)
        d["inputs"] = list(self.inputs)
        d["keep_fields"] = list(self.keep_fields)
        return d


@dataclass
class BuildResult:
    """What a build produced and how long each stage took (seconds, documents)."""

    out: Path | str
    """The dataset folder, or the object-store URL it was published to."""
    fingerprint: str
    num_samples: int
    num_clusters: int
    layout: str
    skipped: int = 0
    resumed: bool = False
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


def auto_clusters(n: int) -> int:
    """Default K: about sqrt(N), at most 1024 and at most N."""
    return int(max(1, min(1024, n, round(math.sqrt(n)))))
