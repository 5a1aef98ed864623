"""`croupier shards build`: inputs -> MDS shards + embeddings + clusters + sidecar.

Stages, each resumable (state in `OUT/croupier/work/state.json`, saved after every chunk):

    ingest  stream the inputs into append-only text parts (one part = `part_docs` documents)
    embed   embed the texts chunk by chunk into a float16 memmap (N, d)
    train   spherical k-means on a bounded, seeded sample of the embeddings
    assign  nearest centroid of every document, chunk by chunk
    order   drop empty clusters, counting-sort documents by cluster (chunked, memmap)
    write   MDSWriter shards (input order, or cluster-major with shard boundaries at cluster
            starts when a cluster would otherwise straddle two shards) and the sidecar arrays
    final   move shards and index.json into OUT, write the manifest last, delete work files

`--adopt` skips ingest and write: it embeds the texts of an existing MDS dataset in place
(local or remote) and writes only the sidecar. Memory stays bounded by a chunk of texts,
the k-means training sample and O(K) arrays; everything per-document lives on disk.
A resumed build refuses settings or inputs that differ from the interrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from croupier import __version__
from croupier.errors import ConfigError, DatasetError
from croupier.format import sidecar_layout as names
from croupier.format.atomic import replace_durably, write_bytes_atomic, write_json_atomic, write_npy_atomic
from croupier.format.fingerprint import index_fingerprint
from croupier.format.mds_index import INDEX_BASENAME, MDSIndex
from croupier.format.sidecar_layout import LAYOUTS, MANIFEST, SIDECAR_DIR
from croupier.shards.build.cluster import KMeansConfig, assign_all, num_gpus, train_centroids
from croupier.format.sidecar import write_sidecar

ARRAYS = names.ARRAY_FILES
TOKEN_COUNTS_WORK = "token_counts.npy"
"""With --tokenizer: the write stage's token count of every sample id, in the work folder."""

STATE_VERSION = 1
Hook = Callable[[str, int], None]


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

    def grouping(self) -> Any:
        from croupier.shards.build.grouping import GroupingConfig

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


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, desc: str, total: int, initial: int = 0) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=f"{desc:>7}", unit="doc", unit_scale=True,
                    disable=not self.enabled, file=sys.stderr, mininterval=0.5, smoothing=0.1)

    def log(self, msg: str) -> None:
        if self.enabled:
            print(f"croupier shards: {msg}", file=sys.stderr, flush=True)


class Builder:
    """Runs (or resumes) one build. Use `build(cfg)`."""

    def __init__(self, cfg: BuildConfig, hook: Hook | None = None) -> None:
        self.cfg = cfg
        self.hook = hook
        self.p = _Progress(cfg.progress)
        self.source = None  # MDSSource when adopting
        self.remote_out: str | None = None  # an object-store --out: built in --work-dir, then published
        if cfg.adopt is not None:
            from croupier.shards.build.mds import is_remote

            if cfg.out is None and is_remote(cfg.adopt):
                raise ConfigError("--out DIR is required to adopt a remote dataset (the sidecar is written there)")
            self.out = Path(cfg.out) if cfg.out else Path(cfg.adopt)
            self.in_place = not is_remote(cfg.adopt) and self.out.resolve() == Path(cfg.adopt).resolve()
        elif "://" in str(cfg.out):
            self.remote_out = str(cfg.out)
            self.out = Path(cfg.work_dir) / "dataset"  # type: ignore[arg-type]
            self.in_place = False
        else:
            self.out = Path(cfg.out)  # type: ignore[arg-type]
            self.in_place = False
        self.side = self.out / SIDECAR_DIR
        self.work = self.side / names.WORK_DIR
        self.state_path = self.work / "state.json"
        self.state: dict[str, Any] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self._key: dict[str, Any] | None = None

    # -- state -----------------------------------------------------------------------------
    def _save(self) -> None:
        write_json_atomic(self.state_path, self.state)

    def _commit(self, stage: str, chunk: int) -> None:
        self._save()
        if self.hook is not None:
            self.hook(stage, chunk)

    def _full_key(self) -> dict[str, Any]:
        if self._key is None:
            from croupier.shards.build.inputs import input_signature

            key = self.cfg.key()
            if self.cfg.adopt is None:
                key["input_files"] = input_signature(self.cfg.inputs)
            else:
                key["adopt_index"] = index_fingerprint(self._source().index_bytes)
            self._key = key
        return self._key

    def _source(self) -> Any:
        if self.source is None:
            from croupier.shards.build.mds import MDSSource

            self.source = MDSSource(self.cfg.adopt)  # type: ignore[arg-type]
            if not self._decodes_tokens(self.source):
                self.source.require_column(self.cfg.text_field)
        return self.source

    def _decodes_tokens(self, source: Any) -> bool:
        """An adopted dataset with a token column and no text column is embedded by decoding."""
        return (self.cfg.tokenizer is not None and self.cfg.text_field not in source.columns
                and self.cfg.token_field in source.columns)

    def _tokenizer(self) -> Any:
        if getattr(self, "_tok", None) is None:
            from croupier.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.cfg.tokenizer)  # type: ignore[arg-type]
        return self._tok

    # -- output folder ------------------------------------------------------------------------
    def _prepare(self) -> bool:
        """Make the output folder ready; returns True when resuming an unfinished build."""
        cfg, out = self.cfg, self.out
        if out.exists() and not out.is_dir():
            raise DatasetError(f"output {str(out)!r} exists and is not a folder")
        key = self._full_key()
        finished = (self.side / MANIFEST).exists()
        has_state = self.state_path.exists()
        if cfg.adopt is not None:
            return self._prepare_adopt(key, finished, has_state)
        has_index = (out / INDEX_BASENAME).exists()
        if has_state and not finished:
            state = self._read_state()
            if state.get("key") == key and not cfg.overwrite:
                self.state = state
                return True
            if not cfg.overwrite and _has_progress(state):
                raise DatasetError(
                    f"output folder {str(out)!r} holds an unfinished build with other settings or changed "
                    "inputs; pass --overwrite to discard it and start over")
            shutil.rmtree(out)
        elif finished or has_index:
            what = "a finished croupier dataset" if finished else "an MDS dataset (index.json)"
            if not cfg.overwrite:
                raise DatasetError(f"output folder {str(out)!r} already holds {what}; "
                                   "pass --overwrite to replace it")
            shutil.rmtree(out)
        elif out.exists() and any(out.iterdir()):
            raise DatasetError(f"output folder {str(out)!r} is not empty and holds no dataset; "
                               "choose an empty or new folder")
        self.state = {"version": STATE_VERSION, "key": key}
        self.work.mkdir(parents=True, exist_ok=True)
        self._save()
        return False

    def _prepare_adopt(self, key: dict[str, Any], finished: bool, has_state: bool) -> bool:
        cfg, out = self.cfg, self.out
        src_index = self._source().index_bytes
        if not self.in_place and (out / INDEX_BASENAME).exists() and (out / INDEX_BASENAME).read_bytes() != src_index:
            if not cfg.overwrite:
                raise DatasetError(f"output folder {str(out)!r} already holds another dataset (index.json); "
                                   "pass --overwrite to replace it")
            (out / INDEX_BASENAME).unlink()
            shutil.rmtree(self.side, ignore_errors=True)
        elif not self.in_place and out.exists() and not (out / INDEX_BASENAME).exists() \
                and any(p.name != SIDECAR_DIR for p in out.iterdir()):
            raise DatasetError(f"output folder {str(out)!r} is not empty and holds no dataset; "
                               "choose an empty or new folder")
        if has_state and not finished:
            state = self._read_state()
            if state.get("key") == key and not cfg.overwrite:
                self.state = state
                return True
            if not cfg.overwrite and _has_progress(state):
                raise DatasetError(f"{str(self.side)!r} holds an unfinished sidecar build with other settings; "
                                   "pass --overwrite to start over")
        elif finished and not cfg.overwrite:
            raise DatasetError(f"{str(out)!r} already has a croupier sidecar; pass --overwrite to replace it "
                               "(the shards are never touched)")
        shutil.rmtree(self.side, ignore_errors=True)  # only our sidecar, never the shards
        self.state = {"version": STATE_VERSION, "key": key}
        self.work.mkdir(parents=True, exist_ok=True)
        self._save()
        return False

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"build state {str(self.state_path)!r} is unreadable ({exc}); "
                               "pass --overwrite to start over") from exc
        if state.get("version") != STATE_VERSION:
            raise DatasetError(f"build state {str(self.state_path)!r} has version {state.get('version')!r}; "
                               "pass --overwrite to start over")
        return state

    # -- stages ------------------------------------------------------------------------------
    def run(self) -> BuildResult:
        from croupier.shards.build.cluster import check_available

        check_available()  # before any work: a build without faiss fails at once, in one line
        if self.remote_out is not None and (self.side / MANIFEST).exists():
            return self._publish(resumed=True)  # built before, its upload was cut short
        if self.remote_out is not None and not self.state_path.exists() and not self.cfg.overwrite:
            from croupier.format.remote import exists, join

            self.out.parent.mkdir(parents=True, exist_ok=True)
            if exists(join(self.remote_out, INDEX_BASENAME), self.out.parent):
                raise DatasetError(f"{self.remote_out} already holds an MDS dataset (index.json); "
                                   "pass --overwrite to replace it")
        resumed = self._prepare()
        if resumed:
            done = [s for s in ("ingest", "embed", "train", "assign", "order", "write") if self.state.get(f"{s}_done")]
            self.p.log(f"resuming the unfinished build in {self.out} (finished stages: {', '.join(done) or 'none'})")
        try:
            if self.cfg.adopt is None:
                self._ingest()
                n = int(self.state["n"])
            else:
                n = len(self._source())
                self.state["n"] = n
            if self.cfg.group_by is None:
                k = self.cfg.clusters if self.cfg.clusters is not None else auto_clusters(n)
                if k > n:
                    raise ConfigError(f"--clusters {k} is larger than the number of documents ({n})")
                self.state["clusters"] = k
                self._embed()
                self._train()
                self._assign()
            else:
                from croupier.shards.build.grouping import group_stage

                group_stage(self)
            self._order()
            if self.cfg.adopt is None:
                self._write()
            else:
                self._write_arrays_original()
            fp = self._finalize()
        finally:
            if self.source is not None:
                self.source.close()
        if self.remote_out is not None:
            return self._publish(resumed=resumed)
        return BuildResult(out=self.out, fingerprint=fp, num_samples=n, num_clusters=int(self.state["k_final"]),
                           layout=self.cfg.layout, skipped=int(self.state.get("skipped", 0)), resumed=resumed,
                           timings=self.timings)

    def _publish(self, resumed: bool) -> BuildResult:
        """Upload the finished staging copy to the object store, then drop the copy."""
        from croupier.format.remote import publish
        from croupier.format.sidecar import Sidecar

        t0 = time.perf_counter()
        side = Sidecar.open(self.out)
        files = publish(self.out, self.remote_out)  # type: ignore[arg-type]
        self._timed("publish", t0, side.num_samples)
        self.p.log(f"uploaded {files} files to {self.remote_out}")
        res = BuildResult(out=str(self.remote_out), fingerprint=side.fingerprint, num_samples=side.num_samples,
                          num_clusters=side.num_clusters, layout=side.layout_kind,
                          skipped=int(side.manifest.get("skipped_records", 0)), resumed=resumed, timings=self.timings)
        del side
        shutil.rmtree(self.out)
        return res

    def _timed(self, stage: str, t0: float, docs: int) -> None:
        dt = time.perf_counter() - t0
        self.timings[stage] = {"seconds": dt, "docs": float(docs)}

    def _ingest(self) -> None:
        from croupier.shards.build.inputs import InputReader
        from croupier.shards.build.textstore import PartWriter

        st = self.state
        if st.get("ingest_done"):
            return
        parts: list[dict[str, Any]] = st.setdefault("parts", [])
        start = parts[-1]["end"] if parts else 0
        skipped0 = int(st.get("skipped", 0))
        reader = InputReader(self.cfg.inputs, self.cfg.text_field, self.cfg.keep_fields, self.cfg.skip_bad)
        folder = self.work / "parts"
        have = sum(p["docs"] for p in parts)
        t0 = time.perf_counter()
        bar = self.p.bar("ingest", total=0, initial=have)
        pw: PartWriter | None = None
        try:
            for pos, text, kept in reader.records(start=start):
                if pw is None:
                    pw = PartWriter(folder, len(parts), self.cfg.keep_fields)
                pw.add(text, kept)
                bar.update(1)
                if pw.n >= self.cfg.part_docs:
                    self._close_part(pw, parts, pos + 1, skipped0 + reader.stats.skipped, reader)
                    pw = None
            if pw is not None:
                self._close_part(pw, parts, reader._end, skipped0 + reader.stats.skipped, reader)
                pw = None
        finally:
            if pw is not None:
                pw.abort()
            bar.close()
        n = sum(p["docs"] for p in parts)
        st["skipped"] = skipped0 + reader.stats.skipped
        st.setdefault("bad_examples", []).extend(reader.stats.examples)
        del st["bad_examples"][5:]
        if st["skipped"]:
            self.p.log(f"skipped {st['skipped']} bad records, e.g. " + "; ".join(st["bad_examples"][:3]))
        if n == 0:
            shutil.rmtree(self.side, ignore_errors=True)
            if self.out.exists() and not any(self.out.iterdir()):
                self.out.rmdir()
            raise DatasetError("the inputs hold no documents" +
                               (f" ({st['skipped']} bad records skipped)" if st["skipped"] else ""))
        st["n"] = n
        st["ingest_done"] = True
        self._timed("ingest", t0, n - have)
        self._commit("ingest", len(parts))

    def _close_part(self, pw: Any, parts: list, end: int, skipped: int, reader: Any) -> None:
        info = pw.close()
        info["end"] = end
        parts.append(info)
        self.state["skipped"] = skipped
        self.state.setdefault("bad_examples", []).extend(reader.stats.examples)
        del self.state["bad_examples"][5:]
        reader.stats.examples.clear()
        self._commit("ingest", len(parts) - 1)

    def _store(self) -> Any:
        from croupier.shards.build.textstore import TextStore

        return TextStore(self.work / "parts", self.state["parts"], self.cfg.keep_fields)

    def _texts(self, lo: int, hi: int, store: Any) -> list[str]:
        if store is not None:
            return store.text_range(lo, hi)
        source = self._source()
        if self._decodes_tokens(source):
            from croupier.tokenizer import token_array

            rows = source.texts(lo, hi, self.cfg.token_field)
            arrays = [token_array(v, f"sample {lo + i} of {self.cfg.adopt}") for i, v in enumerate(rows)]
            return self._tokenizer().batch_decode(arrays, skip_special_tokens=True)
        return source.texts(lo, hi, self.cfg.text_field)

    def _make_embedder(self) -> Any:
        from croupier.shards.build.embed import get_embedder

        kwargs: dict[str, Any] = {}
        if self.cfg.embedder == "minilm":
            kwargs = {"device": self.cfg.device, "batch_size": self.cfg.batch_size}
        else:
            kwargs = {"seed": self.cfg.seed} if self.cfg.embedder == "hashing" else {}
        return get_embedder(self.cfg.embedder, **kwargs)

    def _embed(self) -> None:
        st = self.state
        if st.get("embed_done"):
            return
        n, c = int(st["n"]), self.cfg.chunk
        emb = self._make_embedder()
        st["embedder"] = emb.describe()
        path = self.work / "embeddings.npy"
        done = int(st.get("embed_chunks", 0))
        store = self._store() if self.cfg.adopt is None else None
        cache, key = None, None
        if self.cfg.embed_cache is not None:
            from croupier.shards.build.embed_cache import EmbeddingCache, cache_key

            t0 = time.perf_counter()
            cache = EmbeddingCache(self.cfg.embed_cache)
            key = cache_key(st["embedder"], (self._texts(lo, min(n, lo + c), store) for lo in range(0, n, c)))
            found = cache.fetch(key, n, emb.dim, path) if done == 0 else None
            fault = None if found is None else found.fault
            if fault is not None:  # logged whatever --quiet says, and kept in the manifest
                print(f"croupier shards: warning: embeddings cache {self.cfg.embed_cache}: {fault}; "
                      "embedding again and replacing it", file=sys.stderr, flush=True)
            st["embed_cache"] = {"key": key, "hit": bool(found is not None and found.hit), "fault": fault}
            if found is not None and found.hit:
                self.p.log(f"embeddings of {n} documents reused from {cache.path(key)}")
                self._timed("embed", t0, 0)
                self.timings["embed"].update(encode_seconds=0.0, cached_docs=float(n))
                st["embed_done"] = True
                self._save()
                return
        if done == 0 or not path.exists():
            done = 0
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, emb.dim))
        else:
            arr = np.load(path, mmap_mode="r+")
        nchunks = (n + c - 1) // c
        bar = self.p.bar("embed", total=n, initial=min(n, done * c))
        t0 = time.perf_counter()
        encode_s = 0.0  # time inside the embedder itself: the rest is pipeline overhead
        try:
            for i in range(done, nchunks):
                lo, hi = i * c, min(n, (i + 1) * c)
                texts = self._texts(lo, hi, store)
                t1 = time.perf_counter()
                vectors = emb.encode(texts)
                encode_s += time.perf_counter() - t1
                arr[lo:hi] = vectors.astype(np.float16)
                arr.flush()
                st["embed_chunks"] = i + 1
                bar.update(hi - lo)
                self._commit("embed", i)
        finally:
            bar.close()
        del arr
        self._timed("embed", t0, n - min(n, done * c))
        self.timings["embed"]["encode_seconds"] = encode_s
        if cache is not None and key is not None:
            self.p.log(f"embeddings stored in {cache.store(key, path)}")
        st["embed_done"] = True
        self._save()

    def _kcfg(self) -> KMeansConfig:
        return KMeansConfig(clusters=int(self.state["clusters"]), seed=self.cfg.seed, niter=self.cfg.niter,
                            max_train=max(self.cfg.max_train, int(self.state["clusters"])))

    def _train(self) -> None:
        st = self.state
        if st.get("train_done"):
            return
        kcfg = self._kcfg()
        emb = np.load(self.work / "embeddings.npy", mmap_mode="r")
        t0 = time.perf_counter()
        sample = min(len(emb), kcfg.max_train)
        self.p.log(f"k-means: {kcfg.clusters} clusters from a sample of {sample} of {len(emb)} documents "
                   f"({'GPU' if num_gpus() > 0 else 'CPU'}, seed {kcfg.seed})")
        centroids, obj = train_centroids(emb, kcfg)
        write_npy_atomic(self.work / "centroids_raw.npy", centroids)
        self._timed("train", t0, sample)
        st["objective"] = obj
        st["train_done"] = True
        self._commit("train", 0)

    def _assign(self) -> None:
        st = self.state
        if st.get("assign_done"):
            return
        emb = np.load(self.work / "embeddings.npy", mmap_mode="r")
        centroids = np.load(self.work / "centroids_raw.npy")
        n, c = len(emb), self.cfg.assign_chunk
        path = self.work / "assign.npy"
        done = int(st.get("assign_chunks", 0))
        if done == 0 or not path.exists():
            done = 0
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(n,))
        else:
            out = np.load(path, mmap_mode="r+")
        bar = self.p.bar("assign", total=n, initial=min(n, done * c))
        t0 = time.perf_counter()

        def on_chunk(i: int) -> None:
            out.flush()
            st["assign_chunks"] = i + 1
            self._commit("assign", i)

        try:
            assign_all(emb, centroids, out, chunk=c, start_chunk=done, on_chunk=on_chunk, progress=bar)
        finally:
            bar.close()
        del out
        self._timed("assign", t0, n - min(n, done * c))
        st["assign_done"] = True
        self._save()

    def _order(self) -> None:
        """Drop empty clusters and counting-sort ids by cluster into work/order.npy."""
        st = self.state
        if st.get("order_done"):
            return
        assign = np.load(self.work / "assign.npy", mmap_mode="r")
        raw = np.load(self.work / "centroids_raw.npy")
        n, k, c = len(assign), len(raw), self.cfg.assign_chunk
        counts = np.zeros(k, dtype=np.int64)
        for lo in range(0, n, c):
            counts += np.bincount(assign[lo:lo + c], minlength=k)
        keep = counts > 0
        remap = np.full(k, -1, dtype=np.int64)
        remap[keep] = np.arange(int(keep.sum()))
        sizes = counts[keep]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        order = np.lib.format.open_memmap(self.work / "order.npy", mode="w+", dtype=np.int64, shape=(n,))
        cursor = offsets[:-1].copy()
        k2 = len(sizes)
        for lo in range(0, n, c):
            lab = remap[np.asarray(assign[lo:lo + c])]
            o = np.argsort(lab, kind="stable")
            sl = lab[o]
            rank = np.arange(len(sl)) - np.searchsorted(sl, sl, side="left")
            order[cursor[sl] + rank] = lo + o
            cursor += np.bincount(lab, minlength=k2)
        order.flush()
        del order
        write_npy_atomic(self.work / "remap.npy", remap)
        write_npy_atomic(self.work / "offsets.npy", offsets)
        write_npy_atomic(self.work / "centroids.npy", raw[keep])
        if k2 < k:
            self.p.log(f"{k - k2} of {k} clusters came out empty and were dropped")
        st["k_final"] = k2
        st["order_done"] = True
        self._commit("order", 0)

    def _write_arrays_original(self) -> None:
        """Sidecar arrays for input order: remapped assignments; members = the sort order."""
        st = self.state
        if st.get("arrays_done"):
            return
        assign = np.load(self.work / "assign.npy", mmap_mode="r")
        remap = np.load(self.work / "remap.npy")
        n, c = len(assign), self.cfg.assign_chunk
        tmp = self.side / f".{ARRAYS[names.ASSIGNMENTS]}.tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n,))
        for lo in range(0, n, c):
            out[lo:lo + c] = remap[np.asarray(assign[lo:lo + c])]
        out.flush()
        del out
        replace_durably(tmp, self.side / ARRAYS[names.ASSIGNMENTS])
        st["arrays_done"] = True
        self._commit("arrays", 0)

    def _write(self) -> None:
        st = self.state
        if st.get("write_done"):
            return
        from streaming import MDSWriter

        from croupier.shards.build.textstore import mds_encoding

        store = self._store()
        n = int(st["n"])
        offsets = np.load(self.work / "offsets.npy")
        order = np.load(self.work / "order.npy", mmap_mode="r")
        types: dict[str, set[str]] = {f: set() for f in self.cfg.keep_fields}
        for p in st["parts"]:
            for f, ts in p["types"].items():
                types[f].update(ts)
        columns = {self.cfg.text_field: "str", **{f: mds_encoding(types[f]) for f in self.cfg.keep_fields}}
        if self.cfg.tokenizer is not None:
            from croupier.tokenizer import TOKEN_COLUMN_ENCODING

            self._tokenizer()  # refuse a tokenizer that cannot load before writing anything
            columns[self.cfg.token_field] = TOKEN_COLUMN_ENCODING
        st["columns"] = columns
        mds_dir = self.work / "mds"
        shutil.rmtree(mds_dir, ignore_errors=True)
        cluster_major = self.cfg.layout == "cluster-major"
        t0 = time.perf_counter()
        bar = self.p.bar("write", total=n)
        c = self.cfg.chunk
        writer = MDSWriter(out=str(mds_dir), columns=columns, compression=self.cfg.compression,
                           hashes=["sha1", "xxh64"], size_limit=self.cfg.shard_size, max_workers=1)
        # token counts by sample id (= write position), written beside the shards
        counts = None if self.cfg.tokenizer is None else np.zeros(n, dtype=np.int32)
        try:
            if cluster_major:
                cbytes = self._cluster_bytes(store, offsets)
                # Shard-aligned read blocks: every cluster starts a fresh shard and each shard
                # holds `block` consecutive samples of one cluster (the last of a cluster fewer),
                # so the sampler's block-local order (layout block_size) reads one shard at a
                # time per cluster. `block` fills three quarters of --shard-size on average, so a
                # block of longer documents rarely spills into a second shard.
                block = st.setdefault(
                    "block_size", max(1, int(0.75 * self.cfg.shard_size * n / max(1.0, float(cbytes.sum())))))
                for k in range(len(offsets) - 1):
                    lo, hi = int(offsets[k]), int(offsets[k + 1])
                    for b0 in range(lo, hi, block):
                        if writer.new_samples:
                            writer.flush_shard()
                            writer._reset_cache()
                        b1 = min(hi, b0 + block)
                        for a in range(b0, b1, c):
                            ids = np.asarray(order[a:min(b1, a + c)])
                            got = self._write_docs(writer, store, ids, bar)
                            if counts is not None:
                                counts[a:a + len(ids)] = got
            else:
                for a in range(0, n, c):
                    got = self._write_docs(writer, store, np.arange(a, min(n, a + c)), bar)
                    if counts is not None:
                        counts[a:a + len(got)] = got
            writer.finish()
        except BaseException:
            writer.cancel_future_jobs()
            raise
        finally:
            writer.executor.shutdown(wait=True)
            bar.close()
        self._timed("write", t0, n)
        if counts is not None:
            write_npy_atomic(self.work / TOKEN_COUNTS_WORK, counts)
        if cluster_major:
            self._write_arrays_cluster_major(order, offsets)
        else:
            self._write_arrays_original()
        st["write_done"] = True
        self._commit("write", 0)

    def _write_docs(self, writer: Any, store: Any, ids: np.ndarray, bar: Any) -> np.ndarray | None:
        """Writes these documents (in this order) as the next samples; returns their token
        counts with --tokenizer, else None."""
        tf = self.cfg.text_field
        texts = store.texts(ids)
        extras = store.extras(ids) if self.cfg.keep_fields else [{}] * len(texts)
        counts = None
        if self.cfg.tokenizer is not None:
            from croupier.tokenizer import encode

            tokens = encode(self._tokenizer(), texts)
            counts = np.fromiter((len(t) for t in tokens), dtype=np.int32, count=len(tokens))
            extras = [{**extra, self.cfg.token_field: t} for extra, t in zip(extras, tokens)]
        for text, extra in zip(texts, extras):
            writer.write({tf: text, **extra})
        bar.update(len(ids))
        return counts

    def _cluster_bytes(self, store: Any, offsets: np.ndarray) -> np.ndarray:
        assign = np.load(self.work / "assign.npy", mmap_mode="r")
        remap = np.load(self.work / "remap.npy")
        k2 = len(offsets) - 1
        out = np.zeros(k2, dtype=np.float64)
        c = self.cfg.assign_chunk
        for lo in range(0, len(assign), c):
            hi = min(len(assign), lo + c)
            # per-sample MDS overhead: 4-byte offset + 4-byte length per variable column
            w = store.nbytes(lo, hi) + 4 * (1 + len(self.cfg.keep_fields) + 1)
            if self.cfg.tokenizer is not None:
                w = 2 * w  # int32 token ids take about as many bytes as the text
            out += np.bincount(remap[np.asarray(assign[lo:hi])], weights=w, minlength=k2)
        return out

    def _write_arrays_cluster_major(self, order: np.ndarray, offsets: np.ndarray) -> None:
        """Assignments are ranges; embeddings are gathered into the new id order."""
        n = len(order)
        k2 = len(offsets) - 1
        tmp = self.side / f".{ARRAYS[names.ASSIGNMENTS]}.tmp"
        a = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n,))
        for k in range(k2):
            a[offsets[k]:offsets[k + 1]] = k
        a.flush()
        del a
        replace_durably(tmp, self.side / ARRAYS[names.ASSIGNMENTS])
        emb = np.load(self.work / "embeddings.npy", mmap_mode="r")
        tmp = self.side / f".{ARRAYS[names.EMBEDDINGS]}.tmp"
        e = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=emb.shape)
        c = self.cfg.assign_chunk
        for lo in range(0, n, c):
            e[lo:lo + c] = emb[np.asarray(order[lo:lo + c])]
        e.flush()
        del e
        replace_durably(tmp, self.side / ARRAYS[names.EMBEDDINGS])

    def _finalize(self) -> str:
        st = self.state
        t0 = time.perf_counter()
        cluster_major = self.cfg.layout == "cluster-major"
        if self.cfg.adopt is None:
            mds_dir = self.work / "mds"
            if (mds_dir / INDEX_BASENAME).exists():  # not yet moved (a resumed finalize skips this)
                index = MDSIndex.read(mds_dir)
                for entry in index.shards:
                    for info in (entry.raw, entry.zip):
                        if info and (mds_dir / info.basename).exists():
                            replace_durably(mds_dir / info.basename, self.out / info.basename)
                replace_durably(mds_dir / INDEX_BASENAME, self.out / INDEX_BASENAME)  # the index last
            index_bytes = (self.out / INDEX_BASENAME).read_bytes()
        else:
            index_bytes = self._source().index_bytes
            if not self.in_place and not (self.out / INDEX_BASENAME).exists():
                write_bytes_atomic(self.out / INDEX_BASENAME, index_bytes)
        moves = [("offsets.npy", names.OFFSETS), ("centroids.npy", names.CENTROIDS)]
        if not cluster_major:
            moves += [("embeddings.npy", names.EMBEDDINGS), ("order.npy", names.MEMBERS)]
        for work_name, role in moves:
            if (self.work / work_name).exists():
                replace_durably(self.work / work_name, self.side / ARRAYS[role])
        fp = index_fingerprint(index_bytes)
        offsets = np.load(self.side / ARRAYS[names.OFFSETS])
        centroids = np.load(self.side / ARRAYS[names.CENTROIDS])
        assignments = np.load(self.side / ARRAYS[names.ASSIGNMENTS], mmap_mode="r")
        members = None if cluster_major else np.load(self.side / ARRAYS[names.MEMBERS], mmap_mode="r")
        extra: dict[str, Any] = {
            "embedder": st["embedder"],
            "metric": "cosine",
            "seed": self.cfg.seed,
            "kmeans": {**self._kcfg().to_dict(), "objective": st.get("objective"), "gpu": num_gpus() > 0},
            "requested_clusters": int(st["clusters"]),
            "text_field": self.cfg.text_field,
            "columns": st.get("columns", {}),
            "source": ({"adopted": self.cfg.adopt} if self.cfg.adopt is not None
                       else {"inputs": [str(Path(x).resolve()) for x in self.cfg.inputs]}),
            "remote": (None if self.in_place or self.cfg.adopt is None
                       else (self.cfg.adopt if "://" in self.cfg.adopt else str(Path(self.cfg.adopt).resolve()))),
            "skipped_records": int(st.get("skipped", 0)),
            "block_size": int(st.get("block_size", 1)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "croupier_version": __version__,
            "scores": {},
            "selections": {},
        }
        if "embed_cache" in st:
            extra["embed_cache"] = st["embed_cache"]
        if self.cfg.tokenizer is not None:
            extra[names.TOKEN_COUNTS] = self._token_counts()
        if self.cfg.group_by is not None:
            from croupier.shards.build.grouping import finish

            extra["grouping"] = finish(self.work, self.side, self.cfg.grouping(),
                                       np.load(self.work / "order.npy", mmap_mode="r") if cluster_major else None)
        write_sidecar(self.out, fingerprint=fp, layout=self.cfg.layout, assignments=assignments,
                      offsets=offsets, members=members, centroids=centroids, extra=extra)
        del assignments, members
        shutil.rmtree(self.work, ignore_errors=True)
        self._timed("final", t0, int(st["n"]))
        self.p.log(f"wrote {st['n']} documents in {len(offsets) - 1} clusters ({self.cfg.layout}) to {self.out} [{fp}]")
        return fp


    def _token_counts(self) -> dict[str, Any]:
        """With --tokenizer: moves the counts into the sidecar and returns their manifest entry.
        The write stage counted the tokens it wrote; an adopted dataset is counted here, from
        its token column when it has one, else by tokenizing its text."""
        from croupier.format.sidecar import token_counts_array, token_counts_entry

        target = self.side / names.TOKEN_COUNTS_FILE
        work = self.work / TOKEN_COUNTS_WORK
        if self.cfg.adopt is not None and not work.exists():
            from croupier.shards.build.token_counts import check_token_column, count_source

            source = self._source()
            field = self.cfg.token_field if self.cfg.token_field in source.columns else None
            if field is not None:
                encodings = source.index.shards[0].info.get("column_encodings", [])
                check_token_column(dict(zip(source.columns, encodings)), field, f"dataset {self.cfg.adopt!r}")
            counts = count_source(source, tokenizer=None if field else self._tokenizer(),
                                  text_field=None if field else self.cfg.text_field, token_field=field)
            write_npy_atomic(work, counts)
            source_field, how = (field, "token column") if field else (self.cfg.text_field, "text")
        else:
            source_field, how = self.cfg.token_field, "token column"
        if work.exists():
            replace_durably(work, target)
        counts = token_counts_array(np.load(target, mmap_mode="r"), int(self.state["n"]))
        return token_counts_entry(counts, {"tokenizer": self.cfg.tokenizer, "field": source_field, "from": how})


def _has_progress(state: dict[str, Any]) -> bool:
    """Whether an unfinished build got far enough to be worth keeping (else it is replaced)."""
    return bool(state.get("parts") or state.get("embed_chunks"))


def build(cfg: BuildConfig, hook: Hook | None = None) -> BuildResult:
    """Run or resume a build. `hook(stage, chunk)` runs after every committed chunk."""
    return Builder(cfg, hook).run()
