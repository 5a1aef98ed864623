"""`croupier shards build`: real inputs in every format, real MDS shards read back with
mosaicml-streaming, planted-topic recovery, cluster-major invariants, resume, adopt, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from sklearn.metrics import normalized_mutual_info_score

from cases.shards_build import read_back, snapshot
from croupier.cli import main
from croupier.errors import ConfigError, DatasetError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.synthetic import generate_corpus, write_jsonl

NMI_BOUND_HASHING = 0.65  # measured ~0.72-0.83 on these corpora with K = number of topics


def write_inputs(folder: Path, docs: list[dict]) -> list[str]:
    """Split docs over plain, gzip and zstd JSON lines and a Parquet file (in that order)."""
    folder.mkdir(parents=True, exist_ok=True)
    q = len(docs) // 4
    parts = [docs[:q], docs[q:2 * q], docs[2 * q:3 * q], docs[3 * q:]]
    write_jsonl(folder / "a.jsonl", parts[0])
    write_jsonl(folder / "b.jsonl.gz", parts[1])
    with open(folder / "c.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(
            "".join(json.dumps(d) + "\n" for d in parts[2]).encode()))
    pq.write_table(pa.table({"text": [d["text"] for d in parts[3]], "topic": [d["topic"] for d in parts[3]]}),
                   folder / "d.parquet")
    return [str(folder / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet")]


def test_hashing_build_cluster_major_reads_back_every_sample_once(tmp_path, corpus):
    inputs = write_inputs(tmp_path / "in", corpus)
    out = tmp_path / "ds"
    rc = main(["shards", "build", *inputs, "--out", str(out), "--embedder", "hashing", "--clusters", "8",
               "--keep-fields", "topic", "--shard-size", "64KiB", "--chunk", "700", "--quiet"])
    assert rc == 0
    side = Sidecar.open(out)
    assert side.layout_kind == "cluster-major" and side.num_samples == len(corpus)
    assert side.manifest["embedder"]["name"] == "hashing" and side.manifest["metric"] == "cosine"
    assert side.manifest["columns"] == {"text": "str", "topic": "int64"}
    samples = read_back(out, tmp_path / "cache")
    # every input document exactly once, with its kept field
    assert sorted((s["text"], int(s["topic"])) for s in samples) == sorted((d["text"], d["topic"]) for d in corpus)
    # cluster-major: assignments are sorted, ranges match offsets and sizes
    a = np.asarray(side.assignments())
    assert (np.diff(a) >= 0).all()
    assert np.array_equal(np.bincount(a), side.sizes)
    layout = side.layout()
    assert layout.members is None and layout.num_positions == len(corpus)
    # embeddings follow the new ids: row i is the embedding of sample i's text
    from croupier.shards.build.embed import HashingEmbedder

    emb = side.embeddings()
    probe = [0, len(corpus) // 2, len(corpus) - 1]
    direct = HashingEmbedder(seed=0).encode([samples[i]["text"] for i in probe])
    np.testing.assert_allclose(np.asarray(emb[probe], dtype=np.float32), direct, atol=2e-3)
    # clusters recover the planted topics
    nmi = normalized_mutual_info_score([int(s["topic"]) for s in samples], a)
    assert nmi > NMI_BOUND_HASHING, nmi
    # shard-aligned read blocks: every cluster and every block of `block_size` samples of a
    # cluster starts a shard, and no shard spans two clusters
    index = json.loads((out / "index.json").read_text())
    starts = np.concatenate([[0], np.cumsum([s["samples"] for s in index["shards"]])])
    offsets = side.offsets()
    block = side.block_size
    assert block > 1 and layout.block_size == block
    block_starts = np.concatenate([np.arange(lo, hi, block) for lo, hi in zip(offsets[:-1], offsets[1:])])
    assert np.isin(block_starts, starts).all()
    shard_cluster_first = np.searchsorted(offsets, starts[:-1], side="right") - 1
    shard_cluster_last = np.searchsorted(offsets, starts[1:] - 1, side="right") - 1
    assert np.array_equal(shard_cluster_first, shard_cluster_last)
    assert len(index["shards"]) > side.num_clusters  # the size limit still applies


def test_original_layout_keeps_input_order_and_member_lists(tmp_path, corpus):
    docs = corpus[:1200]
    write_jsonl(tmp_path / "in.jsonl", docs)
    res = build(BuildConfig(out=str(tmp_path / "ds"), inputs=(str(tmp_path / "in.jsonl"),), embedder="hashing",
                            clusters=6, layout="original", progress=False))
    assert res.num_samples == 1200 and res.num_clusters == 6
    samples = read_back(tmp_path / "ds", tmp_path / "cache")
    assert [s["text"] for s in samples] == [d["text"] for d in docs]
    side = Sidecar.open(tmp_path / "ds")
    layout = side.layout()
    a = np.asarray(side.assignments())
    assert layout.members is not None
    assert np.array_equal(np.sort(np.asarray(layout.members)), np.arange(1200))
    for k in range(layout.num_clusters):
        ids = np.asarray(layout.members[layout.offsets[k]:layout.offsets[k + 1]])
        assert (a[ids] == k).all() and (np.diff(ids) > 0).all()


def test_txt_folder_input(tmp_path):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    docs = generate_corpus(40, 2, seed=1)
    for i, d in enumerate(docs):
        (folder / ("sub" if i % 2 else "") / f"doc{i:03d}.txt").write_text(d["text"])
    out = tmp_path / "ds"
    assert main(["shards", "build", str(folder), "--out", str(out), "--embedder", "hashing", "--clusters", "2",
                 "--keep-fields", "path", "--quiet"]) == 0
    samples = read_back(out, tmp_path / "cache")
    assert sorted(s["text"] for s in samples) == sorted(d["text"] for d in docs)
    assert {s["path"] for s in samples} == {str(p.relative_to(folder)) for p in folder.rglob("*.txt")}


class Interrupt(Exception):
    pass


def test_interrupted_build_resumes_to_the_uninterrupted_result(tmp_path, corpus):
    inputs = write_inputs(tmp_path / "in", corpus)
    common = dict(inputs=tuple(inputs), embedder="hashing", clusters=8, shard_size=1 << 16, chunk=400,
                  assign_chunk=500, part_docs=900, keep_fields=("topic",), progress=False)
    build(BuildConfig(out=str(tmp_path / "ref"), **common))
    ref = snapshot(tmp_path / "ref")

    out = str(tmp_path / "resumed")
    calls: list[tuple[str, int]] = []
    for stop_at in [("ingest", 1), ("embed", 3), ("train", 0), ("assign", 2), ("order", 0), ("write", 0)]:
        def hook(stage: str, chunk: int, stop_at=stop_at) -> None:
            calls.append((stage, chunk))
            if (stage, chunk) == stop_at:
                raise Interrupt(stop_at)

        with pytest.raises(Interrupt):
            build(BuildConfig(out=out, **common), hook=hook)
        assert not (Path(out) / "croupier" / "manifest.json").exists()
        with pytest.raises(DatasetError, match="holds no MDS index.json"):  # published only when finished
            Sidecar.open(out)
    res = build(BuildConfig(out=out, **common), hook=lambda s, c: calls.append((s, c)))
    assert res.resumed
    got = snapshot(Path(out))
    assert got["fp"] == ref["fp"] and got["index"] == ref["index"]
    for key in ("assign", "emb", "centroids"):
        np.testing.assert_array_equal(got[key], ref[key])
    # nothing was redone: each embed chunk and each ingest part ran once across all runs
    embed_chunks = [c for s, c in calls if s == "embed"]
    assert sorted(embed_chunks) == list(range(len(corpus) // 400 + 1))
    # 3,000 documents, 900 a part: parts 0-3, then unit 4 (the part count) with the stage's completion
    assert [c for s, c in calls if s == "ingest"] == [0, 1, 2, 3, 4]
    # an unfinished build does not resume under other settings
    other = str(tmp_path / "other")

    def stop_in_embed(stage: str, chunk: int) -> None:
        if stage == "embed":
            raise Interrupt(stage)

    with pytest.raises(Interrupt):
        build(BuildConfig(out=other, **common), hook=stop_in_embed)
    with pytest.raises(DatasetError, match="other settings"):
        build(BuildConfig(out=other, **{**common, "clusters": 5}))


def _plain_mds(path: Path, docs: list[dict], compression: str | None = "zstd") -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(path), columns={"body": "str", "topic": "int"}, compression=compression,
                   hashes=["sha1"], size_limit=1 << 14) as w:
        for d in docs:
            w.write({"body": d["text"], "topic": d["topic"]})


def test_adopt_existing_mds_in_place_and_into_another_folder(tmp_path, corpus):
    src = tmp_path / "mds"
    _plain_mds(src, corpus[:600])
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert main(["shards", "build", "--adopt", str(src), "--text-field", "body", "--embedder", "hashing",
                 "--clusters", "4", "--quiet"]) == 0
    side = Sidecar.open(src)
    assert side.layout_kind == "original" and side.num_samples == 600 and side.remote is None
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before  # shards untouched
    a = np.asarray(side.assignments())
    assert normalized_mutual_info_score([d["topic"] for d in corpus[:600]], a) > 0.5
    # into another folder: a verbatim index.json copy, the source recorded as remote
    out = tmp_path / "side"
    assert main(["shards", "build", "--adopt", str(src), "--out", str(out), "--text-field", "body",
                 "--embedder", "hashing", "--clusters", "4", "--quiet"]) == 0
    other = Sidecar.open(out)
    assert other.fingerprint == side.fingerprint and other.remote == str(src.resolve())
    np.testing.assert_array_equal(np.asarray(other.assignments()), a)
    # a second adopt refuses to replace the sidecar without --overwrite, never touching shards
    assert main(["shards", "build", "--adopt", str(src), "--text-field", "body", "--embedder", "hashing",
                 "--clusters", "3", "--quiet"]) == 2
    assert main(["shards", "build", "--adopt", str(src), "--text-field", "body", "--embedder", "hashing",
                 "--clusters", "3", "--overwrite", "--quiet"]) == 0
    assert Sidecar.open(src).num_clusters == 3
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before


# -- bad input ----------------------------------------------------------------------------------

def _build_cli(tmp_path, *args: str) -> int:
    return main(["shards", "build", *args, "--embedder", "hashing", "--quiet"])


def test_malformed_json_line_names_file_and_line_and_skip_bad_counts(tmp_path, capsys):
    good = [json.dumps({"text": f"document number {i} about telescopes"}) for i in range(30)]
    lines = good[:10] + ['{"text": "broken'] + good[10:20] + ['{"title": "no text here"}'] + good[20:]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    assert _build_cli(tmp_path, str(path), "--out", str(out), "--clusters", "2") == 2
    err = capsys.readouterr().err
    assert f"{path}:11: malformed JSON" in err and "--skip-bad" in err
    assert not (out / "croupier" / "manifest.json").exists()
    assert _build_cli(tmp_path, str(path), "--out", str(out), "--clusters", "2", "--skip-bad") == 0
    captured = capsys.readouterr()
    assert "2 bad records skipped" in captured.out
    side = Sidecar.open(out)
    assert side.num_samples == 30 and side.manifest["skipped_records"] == 2


def test_missing_text_field_empty_input_and_too_many_clusters(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"body": "x"}])
    assert _build_cli(tmp_path, str(path), "--out", str(tmp_path / "a"), "--clusters", "1") == 2
    assert "missing text field 'text'" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert _build_cli(tmp_path, str(empty), "--out", str(tmp_path / "b"), "--clusters", "1") == 2
    assert "no documents" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    write_jsonl(path, generate_corpus(10, 2))
    assert _build_cli(tmp_path, str(path), "--out", str(tmp_path / "c"), "--clusters", "11") == 2
    assert "--clusters 11 is larger than the number of documents (10)" in capsys.readouterr().err
    assert not (tmp_path / "c" / "croupier" / "manifest.json").exists()
    assert _build_cli(tmp_path, str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "d")) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown layout"):
        BuildConfig(out="x", inputs=("a",), layout="sideways")
    with pytest.raises(ConfigError, match="--adopt keeps"):
        BuildConfig(out=None, adopt="x", layout="cluster-major")


def test_output_folder_with_a_dataset_is_refused_unless_overwrite(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, generate_corpus(50, 2))
    out = tmp_path / "ds"
    assert _build_cli(tmp_path, str(path), "--out", str(out), "--clusters", "2") == 0
    fp = Sidecar.open(out).fingerprint
    assert _build_cli(tmp_path, str(path), "--out", str(out), "--clusters", "3") == 2
    assert "already holds a finished croupier dataset" in capsys.readouterr().err
    assert Sidecar.open(out).fingerprint == fp
    assert _build_cli(tmp_path, str(path), "--out", str(out), "--clusters", "3", "--overwrite") == 0
    assert Sidecar.open(out).num_clusters == 3
    # a folder with a foreign MDS dataset, and one with unrelated files
    foreign = tmp_path / "foreign"
    _plain_mds(foreign, generate_corpus(5, 1))
    assert _build_cli(tmp_path, str(path), "--out", str(foreign), "--clusters", "2") == 2
    assert "already holds an MDS dataset" in capsys.readouterr().err
    misc = tmp_path / "misc"
    misc.mkdir()
    (misc / "notes.txt").write_text("keep me")
    assert _build_cli(tmp_path, str(path), "--out", str(misc), "--clusters", "2", "--overwrite") == 2
    assert (misc / "notes.txt").read_text() == "keep me"


def test_corrupt_or_unreadable_existing_dataset_is_refused(tmp_path, capsys):
    src = tmp_path / "mds"
    _plain_mds(src, generate_corpus(300, 3))
    shard = sorted(src.glob("shard.*.mds.zstd"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    args = ["--text-field", "body", "--clusters", "2"]
    assert _build_cli(tmp_path, "--adopt", str(src), *args) == 2
    assert f"{shard.name} is corrupt: sha1 expected" in capsys.readouterr().err
    assert not (src / "croupier" / "manifest.json").exists()
    shard.unlink()
    assert _build_cli(tmp_path, "--adopt", str(src), *args, "--overwrite") == 2
    assert "is missing" in capsys.readouterr().err
    (src / "index.json").write_text("{not json")
    assert _build_cli(tmp_path, "--adopt", str(src), *args, "--overwrite") == 2
    assert "not a valid MDS index" in capsys.readouterr().err
    assert _build_cli(tmp_path, "--adopt", str(tmp_path / "missing"), *args) == 2
    assert "does not exist" in capsys.readouterr().err
    ok = tmp_path / "ok"
    _plain_mds(ok, generate_corpus(20, 2))
    assert _build_cli(tmp_path, "--adopt", str(ok), "--text-field", "text", "--clusters", "2") == 2
    assert "has no column 'text'" in capsys.readouterr().err


def test_a_remote_dataset_that_cannot_be_read_leaves_no_download_folder(tmp_path, monkeypatch):
    import tempfile

    from croupier.shards.build.mds import MDSSource

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(DatasetError, match="cannot download file:///nowhere/index.json"):
        MDSSource("file:///nowhere")
    assert list(tmp_path.glob("croupier-mds-*")) == []  # the private download folder is gone


def test_kept_fields_get_typed_mds_columns(tmp_path):
    rows = [{"text": "alpha beta gamma", "meta": {"a": 1}, "score": 1, "lang": "en", "n": 3},
            {"text": "delta epsilon", "meta": [1, 2], "score": 2.5, "lang": "fr", "n": 4},
            {"text": "zeta eta theta", "meta": None, "score": 3, "lang": "de", "n": 5}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "ds"
    build(BuildConfig(out=str(out), inputs=(str(tmp_path / "in.jsonl"),), embedder="hashing", clusters=2,
                      layout="original", keep_fields=("meta", "score", "lang", "n"), progress=False))
    assert Sidecar.open(out).manifest["columns"] == {"text": "str", "meta": "json", "score": "float64",
                                                     "lang": "str", "n": "int64"}
    back = read_back(out, tmp_path / "cache")
    assert [(s["meta"], float(s["score"]), s["lang"], int(s["n"])) for s in back] == \
        [(r["meta"], float(r["score"]), r["lang"], r["n"]) for r in rows]


# -- token columns --------------------------------------------------------------------------------

def test_tokenizer_stores_token_ids_as_a_column(tmp_path, corpus, tiny_tokenizer):
    from croupier.tokenizer import load_tokenizer

    write_jsonl(tmp_path / "in.jsonl", corpus[:300])
    out = tmp_path / "ds"
    assert main(["shards", "build", str(tmp_path / "in.jsonl"), "--out", str(out), "--embedder", "hashing",
                 "--clusters", "4", "--tokenizer", str(tiny_tokenizer), "--quiet"]) == 0
    columns = json.loads((out / "index.json").read_text())["shards"][0]["column_names"]
    assert columns == ["text", "tokens"]
    tok = load_tokenizer(str(tiny_tokenizer))
    samples = read_back(out, tmp_path / "cache")
    assert len(samples) == 300
    for s in samples:
        assert s["tokens"].dtype == np.int32
        np.testing.assert_array_equal(s["tokens"], tok(s["text"], add_special_tokens=False)["input_ids"])
    # a tokenizer that cannot be loaded offline is refused before anything is written
    assert main(["shards", "build", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "no"), "--embedder",
                 "hashing", "--clusters", "4", "--tokenizer", str(tmp_path / "missing-tok"), "--quiet"]) == 2


def _token_mds(path: Path, rows: list[np.ndarray], encoding: str) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(path), columns={"tokens": encoding}, compression="zstd", hashes=["sha1"],
                   size_limit=1 << 14) as w:
        for r in rows:
            w.write({"tokens": r.tobytes() if encoding == "bytes" else r})


def test_adopt_a_token_column_dataset_embeds_it_by_decoding(tmp_path, corpus, tiny_tokenizer, capsys):
    """LLM Foundry's concat_tokens layout: int64 token bytes and no text column."""
    from croupier.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer))
    docs = corpus[:400]
    rows = [np.asarray(tok(d["text"], add_special_tokens=False)["input_ids"], np.int64) for d in docs]
    src = tmp_path / "tokens"
    _token_mds(src, rows, "bytes")
    assert main(["shards", "build", "--adopt", str(src), "--embedder", "hashing", "--clusters", "8",
                 "--tokenizer", str(tiny_tokenizer), "--quiet"]) == 0
    side = Sidecar.open(src)
    assert side.num_samples == 400
    # decoded text clusters by topic as the text itself would
    assert normalized_mutual_info_score([d["topic"] for d in docs], np.asarray(side.assignments())) > 0.5
    # without a tokenizer there is no text to embed: the missing column is named
    capsys.readouterr()
    assert main(["shards", "build", "--adopt", str(src), "--out", str(tmp_path / "o"), "--embedder", "hashing",
                 "--clusters", "4", "--quiet"]) == 2
    assert f"MDS dataset {str(src)!r} has no column 'text'; columns: tokens" in capsys.readouterr().err
    bad = tmp_path / "floats"
    _token_mds(bad, [r.astype(np.float32) for r in rows[:20]], "ndarray:float32")
    with pytest.raises(DatasetError, match="token column of sample 0 .* holds float32"):
        build(BuildConfig(out=None, adopt=str(bad), layout="original", embedder="hashing", clusters=2,
                          tokenizer=str(tiny_tokenizer), progress=False))


# -- the stages and their runner ------------------------------------------------------------------

def test_stage_runner_skips_finished_stages_and_reports_their_last_unit(tmp_path):
    """`run_stages` owns the resume bookkeeping: a stage whose `<name>_done` flag the state holds
    is skipped, a finished one is marked done and saved, and its returned unit goes to the hook."""
    from croupier.shards.build.context import BuildContext, BuildPaths
    from croupier.shards.build.stage import finished, run_stages

    ran: list[str] = []

    class Fake:
        def __init__(self, name: str, unit: int | None) -> None:
            self.name, self.unit = name, unit

        def run(self, ctx: BuildContext) -> int | None:
            ran.append(self.name)
            if self.name == "b":
                ctx.commit("b", 0)  # a unit of its own, reported as it goes
            return self.unit

    cfg = BuildConfig(out=str(tmp_path / "ds"), inputs=("x.jsonl",), progress=False)
    calls: list[tuple[str, int]] = []
    ctx = BuildContext(cfg, BuildPaths.of(cfg), hook=lambda s, c: calls.append((s, c)))
    ctx.paths.work.mkdir(parents=True)
    ctx.state = {"a_done": True}
    stages = [Fake("a", 0), Fake("b", None), Fake("c", 3)]
    run_stages(stages, ctx)
    assert ran == ["b", "c"] and calls == [("b", 0), ("c", 3)]
    saved = json.loads(ctx.paths.state.read_text())
    assert saved == {"a_done": True, "b_done": True, "c_done": True}
    assert finished(stages, saved) == ["a", "b", "c"]
    run_stages(stages, ctx)  # all done: nothing runs again
    assert ran == ["b", "c"]


@pytest.mark.parametrize("kw, names, own", [
    ({"clusters": 4}, ["ingest", "choose_k", "embed", "train", "assign", "order", "write", "arrays"],
     ["ingest", "embed", "assign", "write"]),
    ({"group_by": "topic"}, ["ingest", "groups", "embed", "assign", "order", "write", "arrays"],
     ["ingest", "embed", "write"]),
    ({"adopt": "mds", "layout": "original", "tokenizer": "tok"},
     ["ingest", "choose_k", "embed", "train", "assign", "order", "arrays", "tokens"], ["embed", "assign"]),
])
def test_both_engines_plan_the_same_stages(kw, names, own):
    """The local and the Ray engine plan the same stages; only the engine's own ones (ingest,
    embed, assign, write; with --group-by the grouping takes assign's place) differ."""
    from croupier.shards.build.builder import LocalEngine
    from croupier.shards.build.pipeline import plan
    from croupier.shards.build.ray_builder import RayEngine

    inputs = () if "adopt" in kw else ("x.jsonl",)
    cfg = BuildConfig(out="ds", inputs=inputs, progress=False, **kw)
    local, ray = plan(cfg, LocalEngine()), plan(cfg, RayEngine())
    assert [s.name for s in local] == [s.name for s in ray] == names
    assert [a.name for a, b in zip(local, ray) if type(a) is not type(b)] == own
