"""The cluster sidecar: everything croupier knows about an MDS dataset, kept next to it.

A sidecar lives in a `croupier/` folder beside the dataset's `index.json`; its file names
and the manifest's `files` map are fixed in `croupier.format.sidecar_layout`, and array
files are looked up through that map.

The manifest's `fingerprint` is `index_fingerprint(index.json bytes)`: a sidecar whose
shards were rewritten is refused with `FingerprintMismatch`. An adopted remote dataset
keeps a verbatim copy of its `index.json` here and names the remote in `manifest["remote"]`.

Layout fingerprints (what sampler states bind to) are `"{dataset}+clu:{h}"` for the whole
dataset and `"{dataset}+sel:{name}:{h}"` for a selection, where `h` hashes the clustering
(and the selected ids): the dataset fingerprint is always the part before the first "+".
Optional per-sample token counts (`token_counts`) are bound to neither: adding them, or
building with them, leaves every fingerprint and the sampler's sequence unchanged.

Every write (arrays and manifest) goes to a temporary file, is fsync'ed and then renamed
over the target, under an exclusive lock on `croupier/.lock`, so concurrent score writers
and a crash never leave a half-written manifest.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError, FingerprintMismatch
from croupier.format import sidecar_layout as names
from croupier.format.atomic import write_json_atomic, write_npy_atomic
from croupier.format.fingerprint import index_fingerprint
from croupier.format.mds_index import INDEX_BASENAME
from croupier.format.sidecar_layout import FORMAT, LAYOUTS, MANIFEST, SIDECAR_DIR, VERSION, validate_name
from croupier.layout import ClusterLayout

__all__ = ["LAYOUTS", "MANIFEST", "SIDECAR_DIR", "Sidecar", "short_hash", "token_counts_array", "token_counts_entry",
           "validate_name", "write_sidecar"]


@contextlib.contextmanager
def _locked(side_dir: Path) -> Iterator[None]:
    side_dir.mkdir(parents=True, exist_ok=True)
    with open(side_dir / names.LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def short_hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def _ids_digest(ids: np.ndarray, chunk: int = 1 << 22) -> bytes:
    """Digest of a (possibly memory-mapped) int64 array, read in bounded chunks."""
    h = hashlib.sha256()
    for i in range(0, len(ids), chunk):
        h.update(np.ascontiguousarray(ids[i:i + chunk], dtype="<i8").tobytes())
    return h.digest()


class Sidecar:
    """A read/write handle on a dataset's cluster sidecar. Open with `Sidecar.open(dir)`."""

    def __init__(self, root: Path, manifest: dict[str, Any], fingerprint: str) -> None:
        self.root = Path(root)
        self.dir = self.root / SIDECAR_DIR
        self.manifest = manifest
        self.fingerprint = fingerprint

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, dataset_dir: str | os.PathLike[str]) -> Sidecar:
        """Open and verify the sidecar of the MDS dataset in `dataset_dir`.

        Raises DatasetError when index.json or the manifest is missing, unreadable or of an
        unknown format/version, and FingerprintMismatch when index.json is not the one the
        sidecar was built for.
        """
        root = Path(dataset_dir)
        index = root / INDEX_BASENAME
        man_path = root / SIDECAR_DIR / MANIFEST
        # Read first, diagnose on failure: a mixture opens a sidecar per source, and each file
        # system call counts before its first batch.
        try:
            index_bytes = index.read_bytes()
        except OSError:
            if not root.is_dir():
                raise DatasetError(f"dataset folder {str(root)!r} does not exist") from None
            if not index.is_file():
                raise DatasetError(f"{str(root)!r} holds no MDS index.json: not an MDS dataset") from None
            raise
        try:
            listing = frozenset(os.listdir(root / SIDECAR_DIR))
        except (FileNotFoundError, NotADirectoryError):
            listing = frozenset()
        if MANIFEST not in listing:
            raise DatasetError(
                f"{str(root)!r} has no cluster sidecar ({SIDECAR_DIR}/{MANIFEST} missing): "
                "run `croupier shards build` (or `--adopt`) first, or it was interrupted before finishing"
            )
        manifest = cls._read_manifest(man_path)
        got = index_fingerprint(index_bytes)
        expected = manifest["fingerprint"]
        if got != expected:
            raise FingerprintMismatch("sidecar", expected=expected, got=got)
        side = cls(root, manifest, got)
        side._check_files(listing)
        return side

    @classmethod
    def open_deferred(cls, dataset_dir: str | os.PathLike[str]) -> Sidecar:
        """Open by the manifest alone: its fingerprint is taken as the dataset's, unchecked here.

        For a reader of many datasets (a mixture's sources): whoever reads a dataset's shards
        checks their index against this fingerprint when it opens them (the shard store does),
        and arrays are refused, by name, when they are loaded. A sidecar whose manifest cannot
        be read is opened with `open`, which says what is missing.
        """
        root = Path(dataset_dir)
        try:
            text = (root / SIDECAR_DIR / MANIFEST).read_text()
        except (OSError, UnicodeDecodeError):
            return cls.open(root)
        manifest = cls._parse_manifest(text, root / SIDECAR_DIR / MANIFEST)
        return cls(root, manifest, str(manifest["fingerprint"]))

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"sidecar manifest {str(path)!r} is unreadable: {exc}") from exc
        return Sidecar._parse_manifest(text, path)

    @staticmethod
    def _parse_manifest(text: str, path: Path) -> dict[str, Any]:
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"sidecar manifest {str(path)!r} is unreadable: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DatasetError(f"{str(path)!r} is not a croupier sidecar manifest (format != {FORMAT!r})")
        if manifest.get("version") != VERSION:
            raise DatasetError(
                f"sidecar manifest {str(path)!r} has version {manifest.get('version')!r}; "
                f"this croupier reads version {VERSION}"
            )
        for key in ("fingerprint", "num_samples", "num_clusters", "layout", "sizes", "files"):
            if key not in manifest:
                raise DatasetError(f"sidecar manifest {str(path)!r} lacks the field {key!r}")
        if manifest["layout"] not in LAYOUTS:
            raise DatasetError(f"sidecar manifest {str(path)!r} has unknown layout {manifest['layout']!r}")
        return manifest

    def _check_files(self, listing: frozenset[str]) -> None:
        """Refuses a sidecar whose required arrays are missing (`listing`: its folder's names)."""
        for role in names.required_roles(self.manifest["layout"]):
            name = self._file(role)
            path = self.dir / name
            if not (name in listing if "/" not in name else path.is_file()):
                raise DatasetError(f"sidecar file {str(path)!r} is missing")

    def _file(self, role: str) -> str:
        try:
            return names.array_file(self.manifest, role)
        except DatasetError as exc:
            raise DatasetError(f"{str(self.dir / MANIFEST)!r}: {exc}") from None

    def reload(self) -> None:
        """Re-read the manifest (after another process added scores or selections)."""
        self.manifest = self._read_manifest(self.dir / MANIFEST)

    # -- basic facts -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def num_clusters(self) -> int:
        return int(self.manifest["num_clusters"])

    @property
    def sizes(self) -> np.ndarray:
        return np.asarray(self.manifest["sizes"], dtype=np.int64)

    @property
    def layout_kind(self) -> str:
        """"cluster-major" (clusters are contiguous id ranges) or "original" (input order)."""
        return str(self.manifest["layout"])

    @property
    def remote(self) -> str | None:
        """Where the shards live when they are not next to the sidecar (adopted remote dataset)."""
        return self.manifest.get("remote")

    def _load(self, name: str, mmap: bool = True) -> np.ndarray:
        path = self.dir / names.checked_relative(name)
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError as exc:
            raise DatasetError(f"sidecar file {str(path)!r} is missing") from exc
        except (OSError, ValueError) as exc:
            raise DatasetError(f"sidecar file {str(path)!r} is unreadable: {exc}") from exc

    def offsets(self) -> np.ndarray:
        """int64 (K+1,) CSR offsets into the cluster-sorted positions.

        Read into memory, not mapped: one small array that every layout reads whole, and a
        mapping costs several times a read (a mixture opens one per source before its first batch).
        """
        return np.asarray(self._load(self._file(names.OFFSETS), mmap=False), dtype=np.int64)

    def members(self) -> np.ndarray | None:
        """int64 (N,) sample ids grouped by cluster (memmap), or None for cluster-major data."""
        if self.layout_kind == "cluster-major":
            return None
        return self._load(self._file(names.MEMBERS))

    def assignments(self) -> np.ndarray:
        """int32 (N,) cluster id of every sample id (memmap)."""
        return self._load(self._file(names.ASSIGNMENTS))

    def embeddings(self) -> np.ndarray:
        """float16 (N, d) embedding of every sample id (memmap)."""
        return self._load(self._file(names.EMBEDDINGS))

    def centroids(self) -> np.ndarray:
        """float32 (K, d) unit-norm centroids."""
        return np.asarray(self._load(self._file(names.CENTROIDS)), dtype=np.float32)

    # -- layouts -----------------------------------------------------------------------------
    @property
    def clustering_hash(self) -> str:
        return str(self.manifest.get("clustering_hash", ""))

    @property
    def block_size(self) -> int:
        """Samples per shard-aligned read block (cluster-major builds); 1 = no blocks."""
        return int(self.manifest.get("block_size", 1))

    def layout(self, selection: str | None = None) -> ClusterLayout:
        """The sampler's view: the whole dataset, or only the ids of a named selection.

        Clusters left empty by a selection are dropped, so layout cluster j is sidecar
        cluster `layout_clusters(selection)[j]`.
        """
        offsets = self._manifest_offsets() if selection is None else None
        if offsets is None:
            offsets = self.offsets()
        if selection is None:
            fp = f"{self.fingerprint}+clu:{self.clustering_hash}"
            return ClusterLayout(offsets=offsets, members=self.members(), num_samples=self.num_samples,
                                 fingerprint=fp, block_size=self.block_size)
        ids = self.selection(selection)
        labels = self._labels_of(ids, offsets)
        counts = np.bincount(labels, minlength=self.num_clusters).astype(np.int64)
        kept = counts[counts > 0]
        sel_offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        order = np.argsort(labels, kind="stable")
        members = np.asarray(ids[order], dtype=np.int64)
        h = short_hash(self.clustering_hash.encode(), _ids_digest(np.asarray(ids)))
        fp = f"{self.fingerprint}+sel:{selection}:{h}"
        return ClusterLayout(offsets=sel_offsets, members=members, num_samples=self.num_samples,
                             fingerprint=fp, block_size=self.block_size)

    def _manifest_offsets(self) -> np.ndarray | None:
        """The offsets of a cluster-major sidecar from its manifest's sizes, when they hash to its
        clustering hash (the offsets it was built from, without opening their file); else None."""
        if self.layout_kind != "cluster-major":
            return None
        try:
            sizes = self.sizes
        except (TypeError, ValueError):  # not a list of integers: the file says what the offsets are
            return None
        if sizes.ndim != 1:
            return None
        offsets = np.zeros(sizes.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        if short_hash(offsets.astype("<i8").tobytes(), self.layout_kind.encode()) != self.clustering_hash:
            return None
        return offsets

    def layout_clusters(self, selection: str | None = None) -> np.ndarray:
        """Sidecar cluster id of each layout cluster (identity without a selection)."""
        if selection is None:
            return np.arange(self.num_clusters, dtype=np.int64)
        labels = self._labels_of(self.selection(selection), self.offsets())
        return np.flatnonzero(np.bincount(labels, minlength=self.num_clusters) > 0).astype(np.int64)

    def _labels_of(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        if self.layout_kind == "cluster-major":
            return (np.searchsorted(offsets, ids, side="right") - 1).astype(np.int64)
        return np.asarray(self.assignments()[ids], dtype=np.int64)

    # -- scores ------------------------------------------------------------------------------
    def score_names(self) -> list[str]:
        return sorted(self.manifest.get("scores", {}))

    def score_params(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self._entry("scores", "score", name)["params"])

    def scores(self, name: str) -> np.ndarray:
        """float32 (N,) score column `name` (memmap)."""
        entry = self._entry("scores", "score", name)
        return self._load(entry["file"])

    def write_scores(self, name: str, values: np.ndarray, params: dict[str, Any]) -> None:
        """Store (or replace) a per-sample score column; `params` records how it was made."""
        validate_name("score", name)
        values = np.asarray(values)
        if values.ndim != 1 or len(values) != self.num_samples:
            raise ConfigError(
                f"score {name!r} must have one value per sample ({self.num_samples}), got shape {values.shape}"
            )
        values = values.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise ConfigError(f"score {name!r} has a non-finite value {values[bad]} at sample {bad}")
        rel = names.score_file(name)
        self._write_entry("scores", name, rel, values, {
            "params": _jsonable(params), "dtype": "float32", "length": int(len(values)),
        })

    # -- token counts ------------------------------------------------------------------------
    def token_counts(self) -> np.ndarray | None:
        """int32 (N,) number of tokens of every sample id (memmap), or None when the sidecar has
        no counts (built without --tokenizer and never given `croupier shards tokens`)."""
        entry = self.manifest.get(names.TOKEN_COUNTS)
        if entry is None:
            self.reload()  # another process may have added them
            entry = self.manifest.get(names.TOKEN_COUNTS)
        if entry is None:
            return None
        counts = self._load(entry["file"])
        if counts.ndim != 1 or len(counts) != self.num_samples or counts.dtype.kind not in "iu":
            raise DatasetError(f"sidecar file {str(self.dir / entry['file'])!r} holds {counts.dtype} {counts.shape}, "
                               f"not one integer token count per sample ({self.num_samples})")
        return counts

    def token_counts_params(self) -> dict[str, Any] | None:
        """How the token counts were made (tokenizer, field, total), or None without counts."""
        entry = self.manifest.get(names.TOKEN_COUNTS)
        return None if entry is None else copy.deepcopy({k: v for k, v in entry.items() if k not in ("file", "sha256")})

    def write_token_counts(self, counts: np.ndarray, params: dict[str, Any]) -> None:
        """Store (or replace) the per-sample token counts; `params` records how they were made.
        Counts bind to nothing the sampler reads: the fingerprints and the sequence stay as they are."""
        counts = token_counts_array(counts, self.num_samples)
        with _locked(self.dir):
            manifest = self._read_manifest(self.dir / MANIFEST)
            if manifest["fingerprint"] != self.fingerprint:
                raise FingerprintMismatch("sidecar", expected=self.fingerprint, got=manifest["fingerprint"])
            write_npy_atomic(self.dir / names.TOKEN_COUNTS_FILE, counts)
            manifest[names.TOKEN_COUNTS] = token_counts_entry(counts, params)
            write_json_atomic(self.dir / MANIFEST, manifest)
            self.manifest = manifest

    # -- selections --------------------------------------------------------------------------
    def selection_names(self) -> list[str]:
        return sorted(self.manifest.get("selections", {}))

    def selection_params(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self._entry("selections", "selection", name)["params"])

    def selection(self, name: str) -> np.ndarray:
        """int64 sorted ids of selection `name` (memmap)."""
        entry = self._entry("selections", "selection", name)
        return self._load(entry["file"])

    def write_selection(self, name: str, ids: np.ndarray, params: dict[str, Any]) -> None:
        """Store (or replace) a named subset: sorted, unique sample ids in [0, N)."""
        validate_name("selection", name)
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) == 0:
            raise ConfigError(f"selection {name!r} must be a non-empty 1-D array of sample ids, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"selection {name!r} ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        if ids[0] < 0 or ids[-1] >= self.num_samples:
            raise ConfigError(f"selection {name!r} ids must lie in [0, {self.num_samples}), "
                              f"got range [{int(ids.min())}, {int(ids.max())}]")
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ConfigError(f"selection {name!r} ids must be sorted and unique")
        rel = names.selection_file(name)
        self._write_entry("selections", name, rel, ids, {
            "params": _jsonable(params), "count": int(len(ids)),
        })

    # -- internals ---------------------------------------------------------------------------
    def _entry(self, section: str, kind: str, name: str) -> dict[str, Any]:
        entries = self.manifest.get(section, {})
        if name not in entries:
            self.reload()
            entries = self.manifest.get(section, {})
        if name not in entries:
            have = ", ".join(sorted(entries)) or "none"
            raise ConfigError(f"unknown {kind} {name!r}; this sidecar has: {have}")
        return entries[name]

    def _write_entry(self, section: str, name: str, rel: str, array: np.ndarray,
                     entry: dict[str, Any]) -> None:
        with _locked(self.dir):
            manifest = self._read_manifest(self.dir / MANIFEST)
            if manifest["fingerprint"] != self.fingerprint:
                raise FingerprintMismatch("sidecar", expected=self.fingerprint, got=manifest["fingerprint"])
            write_npy_atomic(self.dir / rel, array)
            entry = dict(entry, file=rel, sha256=short_hash(np.ascontiguousarray(array).tobytes()))
            manifest.setdefault(section, {})[name] = entry
            write_json_atomic(self.dir / MANIFEST, manifest)
            self.manifest = manifest


def token_counts_array(counts: np.ndarray, num_samples: int) -> np.ndarray:
    """Validated int32 token counts, one per sample id."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or len(counts) != num_samples:
        raise ConfigError(f"token counts must have one value per sample ({num_samples}), got shape {counts.shape}")
    if counts.dtype.kind not in "iu":
        raise ConfigError(f"token counts must be integers, got dtype {counts.dtype}")
    if len(counts) and (int(counts.min()) < 0 or int(counts.max()) >= 2**31):
        raise ConfigError(f"token counts must lie in [0, 2**31), got range [{int(counts.min())}, {int(counts.max())}]")
    return counts.astype(np.int32, copy=False)


def token_counts_entry(counts: np.ndarray, params: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `token_counts` entry for counts stored in `token_counts.npy`."""
    return {**_jsonable(params), "file": names.TOKEN_COUNTS_FILE, "dtype": "int32", "length": int(len(counts)),
            "total": int(np.asarray(counts, dtype=np.int64).sum()),
            "sha256": short_hash(np.ascontiguousarray(counts, dtype="<i4").tobytes())}


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise ConfigError(f"params must be a dict, got {type(params).__name__}")
    try:
        return json.loads(json.dumps(params, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"params must be JSON-serializable: {exc}") from exc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def write_sidecar(root: Path, *, fingerprint: str, layout: str, assignments: np.ndarray,
                  offsets: np.ndarray, members: np.ndarray | None, centroids: np.ndarray,
                  extra: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest of a sidecar whose array files are already in `root/croupier/`.

    `assignments`, `offsets` and `members` are only read to derive sizes and the clustering
    hash. The manifest is written last, atomically: until it exists the sidecar is not
    a finished one, and `Sidecar.open` refuses it.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    parts = [offsets.astype("<i8").tobytes(), layout.encode()]
    if members is not None:
        parts.append(_ids_digest(members))
    clustering_hash = short_hash(*parts)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "layout": layout,
        "num_samples": int(len(assignments)),
        "num_clusters": int(len(sizes)),
        "sizes": sizes.tolist(),
        "dim": int(centroids.shape[1]),
        "clustering_hash": clustering_hash,
        "files": names.files_map(has_members=members is not None),
        "scores": {},
        "selections": {},
    }
    manifest.update(_jsonable(extra))
    side_dir = Path(root) / SIDECAR_DIR
    with _locked(side_dir):
        write_json_atomic(side_dir / MANIFEST, manifest)
    return manifest
