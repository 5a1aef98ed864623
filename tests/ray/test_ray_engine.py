"""`croupier shards build --engine ray`: a real local Ray cluster (2 CPUs) builds the same
dataset as the local engine (ids, clusters, index.json, decoded shards), with shards written
by more than one Ray worker process; an interrupted Ray build resumes per stage; a bad record
is named by file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cases.shards_build import read_back
from croupier.cli import main
from croupier.errors import DatasetError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.ray_builder import build_ray, write_runs
from croupier.shards.build.synthetic import generate_corpus, write_jsonl

pytestmark = pytest.mark.slow


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return generate_corpus(3000, 8, seed=11)


def _inputs(folder: Path, docs: list[dict]) -> tuple[str, ...]:
    """Three JSON lines files and a Parquet file, in that order."""
    folder.mkdir(parents=True, exist_ok=True)
    q = len(docs) // 4
    names = []
    for i in range(3):
        write_jsonl(folder / f"p{i}.jsonl", docs[i * q:(i + 1) * q])
        names.append(str(folder / f"p{i}.jsonl"))
    pq.write_table(pa.table({"text": [d["text"] for d in docs[3 * q:]], "topic": [d["topic"] for d in docs[3 * q:]]}),
                   folder / "p3.parquet")
    return (*names, str(folder / "p3.parquet"))


def _read_back(dataset: Path, cache: Path) -> list[dict]:
    """Every sample, in id order, with column values as plain Python values."""
    return [{k: _plain(v) for k, v in sample.items()} for sample in read_back(dataset, cache)]


def _plain(value):
    """A decoded column value as a plain Python value (token arrays as lists), for comparing."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if hasattr(value, "item") else value


def _assert_same_dataset(a: Path, b: Path, tmp: Path) -> None:
    assert (a / "index.json").read_bytes() == (b / "index.json").read_bytes()
    sa, sb = Sidecar.open(a), Sidecar.open(b)
    assert sa.fingerprint == sb.fingerprint and sa.layout_kind == sb.layout_kind
    np.testing.assert_array_equal(sa.offsets(), sb.offsets())
    np.testing.assert_array_equal(np.asarray(sa.assignments()), np.asarray(sb.assignments()))
    np.testing.assert_array_equal(np.asarray(sa.embeddings()), np.asarray(sb.embeddings()))
    np.testing.assert_array_equal(sa.centroids(), sb.centroids())
    if sa.layout_kind == "original":
        np.testing.assert_array_equal(np.asarray(sa.members()), np.asarray(sb.members()))
    ca, cb = sa.token_counts(), sb.token_counts()
    assert (ca is None) == (cb is None)
    if ca is not None:
        np.testing.assert_array_equal(ca, cb)
    assert _read_back(a, tmp / "ca") == _read_back(b, tmp / "cb")


def test_write_runs_cut_whole_blocks_in_order():
    blocks = [(0, 5), (5, 10), (10, 12), (12, 30), (30, 31)]
    runs = write_runs(blocks, 3)
    assert runs[0][0] == 0 and runs[-1][1] == len(blocks)
    assert all(r[1] == s[0] for r, s in zip(runs, runs[1:])) and all(r[1] > r[0] for r in runs)
    assert len(runs) <= 3
    assert write_runs([(0, 4)], 8) == [(0, 1)]


def test_ray_build_equals_local_and_shards_come_from_several_workers(tmp_path, ray_cluster, corpus, capsys,
                                                                    tiny_tokenizer):
    inputs = _inputs(tmp_path / "in", corpus)
    common = dict(inputs=inputs, embedder="hashing", clusters=8, shard_size=1 << 15, chunk=500,
                  assign_chunk=700, keep_fields=("topic",), tokenizer=str(tiny_tokenizer), progress=False)
    build(BuildConfig(out=str(tmp_path / "local"), **common))
    res = build_ray(BuildConfig(out=str(tmp_path / "ray"), **common))
    assert res.num_samples == len(corpus) and res.workers == 2
    _assert_same_dataset(tmp_path / "local", tmp_path / "ray", tmp_path)
    # every shard has a recorded writer, and the writers were Ray worker processes, at least two
    index = json.loads((tmp_path / "ray" / "index.json").read_text())
    stored = {(s.get("zip_data") or s["raw_data"])["basename"] for s in index["shards"]}
    assert set(res.shard_writers) == stored and len(stored) >= 8
    import os

    pids = set(res.shard_writers.values())
    assert len(pids) >= 2 and os.getpid() not in pids
    # the decoded samples are the inputs, each once
    got = _read_back(tmp_path / "ray", tmp_path / "c3")
    assert sorted((s["text"], s["topic"]) for s in got) == sorted((d["text"], d["topic"]) for d in corpus)
    # the token counts the writer tasks recorded are those of the samples at their ids
    np.testing.assert_array_equal(Sidecar.open(tmp_path / "ray").token_counts(), [len(s["tokens"]) for s in got])
    # the contract: simulate prints the same sequence on both datasets
    printed = []
    for name in ("local", "ray"):
        capsys.readouterr()
        assert main(["simulate", "--dataset", str(tmp_path / name), "--policy", "clusterclip", "--clip", "2",
                     "--global-batch", "16", "--seed", "3", "--steps", "20", "--format", "jsonl"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and len(printed[0].splitlines()) == 20


def test_ray_original_layout_equals_local(tmp_path, ray_cluster, corpus):
    docs = corpus[:1200]
    inputs = _inputs(tmp_path / "in", docs)
    common = dict(inputs=inputs, embedder="hashing", clusters=5, layout="original", shard_size=1 << 14,
                  chunk=300, progress=False)
    build(BuildConfig(out=str(tmp_path / "local"), **common))
    build_ray(BuildConfig(out=str(tmp_path / "ray"), **common))
    _assert_same_dataset(tmp_path / "local", tmp_path / "ray", tmp_path)


def test_interrupted_ray_build_resumes_per_stage(tmp_path, ray_cluster, corpus):
    docs = corpus[:1600]
    inputs = _inputs(tmp_path / "in", docs)
    common = dict(inputs=inputs, embedder="hashing", clusters=6, shard_size=1 << 14, chunk=200,
                  assign_chunk=300, progress=False)
    build(BuildConfig(out=str(tmp_path / "local"), **common))
    out = str(tmp_path / "ray")
    calls: list[tuple[str, int]] = []
    for stop_at in ("ingest", "embed", "assign", "write"):
        seen: list[int] = []

        def hook(stage: str, chunk: int, stop_at=stop_at, seen=seen) -> None:
            calls.append((stage, chunk))
            if stage == stop_at:
                seen.append(chunk)
                if len(seen) == 2:  # after the second committed unit of that stage
                    raise Interrupt(stop_at)

        with pytest.raises(Interrupt):
            build_ray(BuildConfig(out=out, **common), hook=hook)
        assert not (Path(out) / "croupier" / "manifest.json").exists()
    res = build_ray(BuildConfig(out=out, **common), hook=lambda s, c: calls.append((s, c)))
    assert res.resumed
    _assert_same_dataset(tmp_path / "local", Path(out), tmp_path)
    # no embedding chunk or assignment chunk was committed twice across the runs
    for stage, units in (("embed", 8), ("assign", 6)):
        got = [c for s, c in calls if s == stage]
        assert sorted(got) == list(range(units)), (stage, got)
    # a local build does not resume a Ray build's work folder
    with pytest.raises(DatasetError, match="already holds"):
        build(BuildConfig(out=out, **common))


def test_ray_build_killed_with_sigkill_resumes_after_its_last_stage(tmp_path, ray_cluster, corpus):
    """The driver, a `croupier shards build --engine ray` process on the test's Ray cluster, is
    killed (SIGKILL to its process group) once ingest is committed; the rerun does not ingest
    again and ends with the local dataset."""
    import os
    import signal
    import subprocess
    import sys
    import time

    docs = corpus[:800]
    inputs = _inputs(tmp_path / "in", docs)
    common = dict(inputs=inputs, embedder="hashing", clusters=6, shard_size=1 << 14, chunk=200, progress=False)
    build(BuildConfig(out=str(tmp_path / "local"), **common))
    out = tmp_path / "ray"
    state = out / "croupier" / "work" / "state.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "croupier", "shards", "build", *inputs, "--out", str(out),
                             "--embedder", "hashing", "--clusters", "6", "--shard-size", "16KiB", "--chunk", "200",
                             "--engine", "ray", "--ray-address", ray_cluster.get_runtime_context().gcs_address,
                             "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text()).get("ingest_done"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (out / "croupier" / "manifest.json").exists()
    calls: list[tuple[str, int]] = []
    res = build_ray(BuildConfig(out=str(out), **common), hook=lambda s, c: calls.append((s, c)))
    assert res.resumed and not [c for s, c in calls if s == "ingest"]
    _assert_same_dataset(tmp_path / "local", out, tmp_path)


def test_bad_record_is_named_by_file_and_line(tmp_path, ray_cluster, capsys):
    good = [json.dumps({"text": f"document number {i} about telescopes and stars"}) for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(good[:20]) + "\n")
    bad = tmp_path / "b.jsonl"
    bad.write_text("\n".join(good[20:27] + ['{"text": "broken'] + good[27:]) + "\n")
    out = tmp_path / "ds"
    args = ["shards", "build", str(tmp_path / "a.jsonl"), str(bad), "--out", str(out), "--embedder", "hashing",
            "--clusters", "2", "--engine", "ray", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:8: malformed JSON" in err and "--skip-bad" in err
    assert main([*args, "--skip-bad"]) == 0
    assert "1 bad records skipped" in capsys.readouterr().out
    side = Sidecar.open(out)
    assert side.num_samples == 40 and side.manifest["skipped_records"] == 1


def test_ray_density_scores_equal_local_exactly(tmp_path, ray_cluster, corpus, capsys):
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, corpus[:1500])
    out = tmp_path / "ds"
    build(BuildConfig(out=str(out), inputs=(str(src),), embedder="hashing", clusters=6, progress=False))
    common = ["--by", "density", "--rows", "96", "--buckets", "512", "--bandwidth", "0.8", "--seed", "5",
              "--chunk-size", "200", "--no-progress"]
    assert main(["shards", "score", str(out), *common, "--name", "dl"]) == 0
    assert main(["shards", "score", str(out), *common, "--name", "dr", "--engine", "ray"]) == 0
    side = Sidecar.open(out)
    local, remote = side.scores("dl"), side.scores("dr")
    assert len(np.unique(local)) > 10  # a real spread of densities, not a constant
    np.testing.assert_array_equal(local, remote)
    assert main(["shards", "score", str(out), *common, "--name", "dw", "--engine", "ray", "--ray-workers", "2"]) == 2
    assert "--ray-workers sizes the askllm/perplexity actor pool" in capsys.readouterr().err
    assert main(["shards", "score", str(out), *common, "--name", "dw", "--ray-address", "ray://x:1"]) == 2
    assert "--ray-address and --ray-workers apply to --engine ray only" in capsys.readouterr().err


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc): this test's own Ray cluster, no other."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _writer_worker() -> int | None:
    """A Ray worker of this test's cluster running a shard-writing task now, if any."""
    for p in sorted(_descendants(os.getpid())):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::_write_run"):
            return p
    return None


def test_a_ray_worker_killed_mid_write_is_retried_and_the_dataset_is_the_same(tmp_path, ray_cluster, corpus):
    """A Ray worker process is SIGKILLed while it writes shards (after the first write task has
    committed, while others run). Ray retries the lost task (max_retries) in a new worker; the
    build finishes in the same call with the same index.json bytes and sidecar as the local
    engine."""
    import signal
    import time

    docs = corpus[:1600]
    inputs = _inputs(tmp_path / "in", docs)
    common = dict(inputs=inputs, embedder="hashing", clusters=6, shard_size=1 << 13, chunk=100, progress=False)
    build(BuildConfig(out=str(tmp_path / "local"), **common))
    killed: list[int] = []

    def hook(stage: str, chunk: int) -> None:
        if stage != "write" or killed:
            return
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            pid = _writer_worker()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            else:
                time.sleep(0.005)

    res = build_ray(BuildConfig(out=str(tmp_path / "ray"), **common), hook=hook)
    assert killed, "no Ray worker was writing shards after the first write task committed"
    assert not res.resumed
    _assert_same_dataset(tmp_path / "local", tmp_path / "ray", tmp_path)


def test_ray_build_straight_to_s3(tmp_path, ray_cluster, s3, corpus):
    """`--engine ray --out s3://...` on the loopback S3 server: the bucket holds the same
    index.json bytes and sidecar as a local-engine build of the same inputs."""
    from test_s3 import BUCKET, _keys

    docs = corpus[:600]
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, docs)
    args = ["shards", "build", str(src), "--embedder", "hashing", "--clusters", "5", "--shard-size", "16KiB",
            "--quiet"]
    url = f"s3://{BUCKET}/ray/ds"
    assert main([*args, "--out", url, "--work-dir", str(tmp_path / "work"), "--engine", "ray"]) == 0
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    client = s3["client"]
    keys = _keys(client, "ray/ds/")
    assert client.get_object(Bucket=BUCKET, Key="ray/ds/index.json")["Body"].read() == \
        (tmp_path / "local" / "index.json").read_bytes()
    local_files = {str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*") if p.is_file()
                   and p.name != ".lock"}
    assert local_files <= keys | {"croupier/.lock"}, local_files - keys
    for name in ("croupier/offsets.npy", "croupier/assignments.npy"):
        assert client.get_object(Bucket=BUCKET, Key=f"ray/ds/{name}")["Body"].read() == \
            (tmp_path / "local" / name).read_bytes()
    assert not (tmp_path / "work" / "dataset").exists()  # the staging copy is gone once published


@pytest.mark.parametrize("rule", [{}, {"cluster_size": 200, "min_cluster_size": 50}], ids=["one-per-group", "kmeans"])
def test_ray_grouped_build_equals_local(tmp_path, ray_cluster, corpus, rule, capsys):
    """`--group-by` on Ray: ingest, embed and write on the cluster, the grouping on the driver;
    the same dataset, sidecar and groups as the local engine."""
    inputs = _inputs(tmp_path / "in", corpus)
    common = dict(inputs=inputs, embedder="hashing", shard_size=1 << 15, chunk=500, assign_chunk=700,
                  group_by="topic", progress=False, **rule)
    build(BuildConfig(out=str(tmp_path / "local"), **common))
    if rule:
        res = build_ray(BuildConfig(out=str(tmp_path / "ray"), **common))
        assert res.num_clusters == Sidecar.open(tmp_path / "ray").num_clusters
    else:  # as a user runs it: the command line, with the tail check of the group field
        assert main(["shards", "build", *inputs, "--out", str(tmp_path / "ray"), "--embedder", "hashing",
                     "--shard-size", "32KiB", "--chunk", "500", "--group-by", "topic", "--engine", "ray",
                     "--quiet"]) == 0
        assert "tail check by 'topic': 8 groups" in capsys.readouterr().out
    _assert_same_dataset(tmp_path / "local", tmp_path / "ray", tmp_path)
    side = tmp_path / "local" / "croupier", tmp_path / "ray" / "croupier"
    assert (side[0] / "groups.npy").read_bytes() == (side[1] / "groups.npy").read_bytes()
    grouping = [json.loads((s / "manifest.json").read_text())["grouping"] for s in side]
    assert grouping[0] == grouping[1] and grouping[0]["field"] == "topic"
