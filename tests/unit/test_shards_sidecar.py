"""The cluster sidecar: fingerprint binding, scores and selections, layouts, and the
commands that read it (`croupier simulate --dataset`, `shards inspect`, `shards plot`)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from croupier.cli import main
from croupier.errors import ConfigError, DatasetError, FingerprintMismatch
from croupier.format.sidecar import Sidecar
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.synthetic import generate_corpus, write_jsonl


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sidecar")
    write_jsonl(root / "in.jsonl", generate_corpus(1500, 6, seed=3))
    out = {}
    for layout in ("cluster-major", "original"):
        out[layout] = root / layout
        build(BuildConfig(out=str(out[layout]), inputs=(str(root / "in.jsonl"),), embedder="hashing",
                          clusters=6, layout=layout, shard_size=1 << 15, progress=False))
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_sidecar_refuses_other_shards_and_broken_manifests(datasets, tmp_path, capsys):
    d = _copy(datasets["cluster-major"], tmp_path)
    side = Sidecar.open(d)
    assert side.fingerprint.startswith("mds:") and side.manifest["format"] == "croupier.sidecar"
    index = json.loads((d / "index.json").read_text())
    index["shards"][0]["samples"] += 0
    (d / "index.json").write_text(json.dumps(index, indent=2))  # same content, other bytes
    with pytest.raises(FingerprintMismatch) as err:
        Sidecar.open(d)
    assert err.value.expected == side.fingerprint
    shutil.copy(datasets["cluster-major"] / "index.json", d / "index.json")
    manifest = json.loads((d / "croupier" / "manifest.json").read_text())
    (d / "croupier" / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DatasetError, match="version 99"):
        Sidecar.open(d)
    (d / "croupier" / "manifest.json").write_text("{oops")
    with pytest.raises(DatasetError, match="unreadable"):
        Sidecar.open(d)
    (d / "croupier" / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="no cluster sidecar"):
        Sidecar.open(d)
    with pytest.raises(DatasetError, match="does not exist"):
        Sidecar.open(tmp_path / "nowhere")
    # the sampler CLI refuses the stale sidecar with a clear message and exit code 2
    manifest["fingerprint"] = "mds:000000000000000000000000"
    (d / "croupier" / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["simulate", "--dataset", str(d), "--policy", "uniform", "--global-batch", "8", "--steps", "1"]) == 2
    assert (f"sidecar fingerprint mismatch: expected mds:000000000000000000000000, got {side.fingerprint}"
            in capsys.readouterr().err)


def test_scores_round_trip_and_validation(datasets, tmp_path):
    d = _copy(datasets["original"], tmp_path)
    a, b = Sidecar.open(d), Sidecar.open(d)
    n = a.num_samples
    a.write_scores("density", np.linspace(0, 1, n), {"rows": np.int64(20), "buckets": 128})
    b.write_scores("askllm.flan-t5-small", np.ones(n, dtype=np.float32), {"model": "x"})
    fresh = Sidecar.open(d)  # both writers' columns survive (manifest updated under a lock)
    assert fresh.score_names() == ["askllm.flan-t5-small", "density"]
    np.testing.assert_allclose(fresh.scores("density"), np.linspace(0, 1, n).astype(np.float32))
    assert fresh.score_params("density") == {"rows": 20, "buckets": 128}
    assert fresh.scores("density").dtype == np.float32
    for bad_name in ("Density", "", "a/b", ".hidden", "x" * 65):
        with pytest.raises(ConfigError, match="name"):
            a.write_scores(bad_name, np.zeros(n), {})
    with pytest.raises(ConfigError, match="one value per sample"):
        a.write_scores("short", np.zeros(n - 1), {})
    with pytest.raises(ConfigError, match="non-finite"):
        a.write_scores("nan", np.full(n, np.nan), {})
    with pytest.raises(ConfigError, match="unknown score 'nope'.*density"):
        a.scores("nope")
    assert not list((d / "croupier").rglob("*.tmp"))


@pytest.mark.parametrize("layout", ["cluster-major", "original"])
def test_selection_layout_drops_emptied_clusters(datasets, tmp_path, layout):
    d = _copy(datasets[layout], tmp_path)
    side = Sidecar.open(d)
    full = side.layout()
    assert full.fingerprint.startswith(side.fingerprint + "+clu:")
    assert np.array_equal(full.sizes, side.sizes)
    labels = np.asarray(side.assignments())
    # keep every third sample, but nothing from cluster 2
    ids = np.arange(0, side.num_samples, 3)
    ids = ids[labels[ids] != 2]
    side.write_selection("third", ids, {"rule": "every third"})
    sel = Sidecar.open(d).layout("third")
    assert sel.num_clusters == side.num_clusters - 1
    kept = Sidecar.open(d).layout_clusters("third")
    assert 2 not in kept.tolist() and len(kept) == sel.num_clusters
    assert np.array_equal(np.sort(np.asarray(sel.members)), ids)
    for j in range(sel.num_clusters):
        members = sel.members[sel.offsets[j]:sel.offsets[j + 1]]
        assert (labels[members] == kept[j]).all()
    assert sel.fingerprint.startswith(f"{side.fingerprint}+sel:third:")
    side.write_selection("third", ids[:-1], {})
    assert Sidecar.open(d).layout("third").fingerprint != sel.fingerprint
    for bad in (ids[::-1], np.array([1, 1, 2]), np.array([0, side.num_samples]), np.array([], dtype=np.int64)):
        with pytest.raises(ConfigError, match="selection"):
            side.write_selection("bad", bad, {})
    # the sampler draws only selected ids from the selection layout
    s = Sampler(sel, PolicyConfig(policy="uniform"), global_batch=16, seed=0)
    drawn = np.concatenate([s.next_batch() for _ in range(10)])
    assert np.isin(drawn, ids).all()


@pytest.mark.slow
def test_sidecar_drives_croupier_simulate(datasets, capsys):
    d = datasets["cluster-major"]
    side = Sidecar.open(d)
    sizes = side.sizes
    clip, batch, steps = 2, 32, 40
    rc = main(["simulate", "--dataset", str(d), "--policy", "clusterclip", "--clip", str(clip),
               "--global-batch", str(batch), "--steps", str(steps), "--format", "jsonl"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    ids = np.concatenate([r["indices"] for r in rows])
    assert len(rows) == steps and len(ids) == steps * batch
    assert ids.min() >= 0 and ids.max() < side.num_samples
    assert max(Counter(ids.tolist()).values()) <= clip
    # cluster-balanced: every cluster drawn about equally often, unlike its share of the data
    per_cluster = np.bincount(np.asarray(side.assignments())[ids], minlength=side.num_clusters)
    assert per_cluster.max() / per_cluster.min() < 1.6 < sizes.max() / sizes.min()
    rc = main(["simulate", "--dataset", str(d), "--policy", "clusterclip", "--clip", "2",
               "--global-batch", "32", "--steps", "10"])
    assert rc == 0
    text = capsys.readouterr().out
    n = side.num_samples
    assert f"policy clusterclip  clusters {side.num_clusters}  samples {n}  global batch 32  steps 10" in text
    assert [line.split() for line in text.splitlines() if line.strip().startswith("total")] == \
        [["total", str(n), "320"]]


def test_inspect_and_plot(datasets, tmp_path, capsys):
    d = datasets["original"]
    assert main(["shards", "inspect", str(d), "--examples", "2", "--clusters", "1"]) == 0
    text = capsys.readouterr().out
    assert "clusters     6" in text and "quantiles" in text and "p50" in text
    assert text.count("\ncluster ") == 2 and text.count("  - ") == 4
    assert main(["shards", "inspect", str(d), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    sizes = Sidecar.open(d).sizes
    assert summary["sizes"]["largest"] == sizes.max() and summary["sizes"]["smallest"] == sizes.min()
    assert summary["samples"] == 1500 and summary["embedder"]["name"] == "hashing"
    png = tmp_path / "clusters.png"
    assert main(["shards", "plot", str(d), "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert main(["shards", "inspect", str(tmp_path)]) == 2
