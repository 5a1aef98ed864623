"""Datasets on an S3-compatible object store: a real S3 server on loopback (moto's standalone
server, spoken to over HTTP by boto3 inside mosaicml-streaming), no mocked client library.

Build to s3://, serve from s3:// (the sidecar is fetched from the bucket), one rank reads through
the client (shards downloaded from the bucket by Streaming): the decoded samples are the inputs.
A corrupted object in the bucket is refused naming the shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cases.s3 import BUCKET
from croupier.cli import main
from croupier.errors import ConfigError, DatasetError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig
from croupier.shards.build.synthetic import generate_corpus, write_jsonl
from workers.harness import terminate


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return generate_corpus(600, 5, seed=3)


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


def _build_args(src: Path, out: str, *extra: str) -> list[str]:
    return ["shards", "build", str(src), "--out", out, "--embedder", "hashing", "--clusters", "5",
            "--shard-size", "16KiB", "--quiet", *extra]


def test_object_store_out_needs_a_work_dir():
    with pytest.raises(ConfigError, match="--work-dir"):
        BuildConfig(out="s3://bucket/ds", inputs=("x.jsonl",))


def test_build_to_s3_serve_from_s3_and_a_rank_reads_the_inputs(s3, tmp_path, corpus, capsys):
    src = tmp_path / "docs.jsonl"
    write_jsonl(src, corpus)
    url = f"s3://{BUCKET}/runs/ds"
    assert main(_build_args(src, url, "--work-dir", str(tmp_path / "work"), "--keep-fields", "topic")) == 0
    out = capsys.readouterr().out
    assert url in out and f"tail check: skipped (the dataset was published to {url};" in out
    keys = _keys(s3["client"], "runs/ds/")
    index = json.loads(s3["client"].get_object(Bucket=BUCKET, Key="runs/ds/index.json")["Body"].read())
    shards = [s["zip_data"]["basename"] for s in index["shards"]]
    assert len(shards) > 3 and set(shards) <= keys
    assert {"croupier/manifest.json", "croupier/offsets.npy", "croupier/assignments.npy",
            "croupier/embeddings.npy"} <= keys
    assert not (tmp_path / "work" / "dataset").exists()  # the staging copy is gone once published
    # the same build into a local folder is the same dataset (same index bytes)
    assert main(_build_args(src, str(tmp_path / "local"), "--keep-fields", "topic")) == 0
    assert "tail check by 'topic': 5 groups" in capsys.readouterr().out
    local = Sidecar.open(tmp_path / "local")
    assert (tmp_path / "local" / "index.json").read_bytes() == \
        s3["client"].get_object(Bucket=BUCKET, Key="runs/ds/index.json")["Body"].read()
    # a second build into the same URL is refused
    assert main(_build_args(src, url, "--work-dir", str(tmp_path / "work2"))) == 2
    assert "already holds an MDS dataset" in capsys.readouterr().err

    proc = subprocess.Popen([sys.executable, "-m", "croupier", "serve", url, "--state-dir", str(tmp_path / "state"),
                             "--port", "0", "--policy", "uniform", "--global-batch", "8", "--seed", "1",
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            proc.wait(30)
            pytest.fail(f"croupier serve exited {proc.returncode}: {proc.stderr.read()}")
        info = json.loads(line)
        from croupier.client.dataset import ID_KEY, CroupierIterableDataset
        from croupier.topology import Topology

        ds = CroupierIterableDataset(f"127.0.0.1:{info['port']}", job="default", cache_dir=tmp_path / "cache",
                                     steps=10, topology=Topology(rank=0, world=1))
        items = list(ds)
    finally:
        terminate(proc, 60)
    assert len(items) == 80
    # every sample the rank decoded is the input document with that id in the built dataset
    texts = _texts_by_id(tmp_path / "local")
    inputs = {d["text"] for d in corpus}
    for item in items:
        assert item["text"] == texts[int(item[ID_KEY])] and item["text"] in inputs
    assert sorted(texts) == sorted(inputs) and local.num_samples == len(corpus)
    # the server named the bucket as the remote, and the shards came from there
    assert list((tmp_path / "cache").rglob("shard.*.mds"))


def _texts_by_id(dataset: Path) -> list[str]:
    from croupier.client.readers.shard_cache import ShardStore

    with ShardStore(dataset, dataset.parent / "verify-cache") as store:
        return [s["text"] for s in store.get(np.arange(store.num_samples))]


def test_a_corrupted_object_is_refused_naming_the_shard(s3, tmp_path, corpus):
    from croupier.client.readers.shard_cache import ShardStore

    src = tmp_path / "docs.jsonl"
    write_jsonl(src, corpus)
    url = f"s3://{BUCKET}/corrupt/ds"
    assert main(_build_args(src, url, "--work-dir", str(tmp_path / "work"))) == 0
    index = json.loads(s3["client"].get_object(Bucket=BUCKET, Key="corrupt/ds/index.json")["Body"].read())
    name = index["shards"][1]["zip_data"]["basename"]
    first_of_shard = index["shards"][0]["samples"]
    key = f"corrupt/ds/{name}"
    data = bytearray(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with ShardStore(url, tmp_path / "cache", download_attempts=1) as store:
        assert len(store.get([0])) == 1  # an intact shard still reads
        with pytest.raises(DatasetError, match=rf"shard file {name} from {url} is corrupt"):
            store.get([first_of_shard])
    # a dataset whose sidecar was not uploaded is refused by serve, naming the URL
    s3["client"].delete_object(Bucket=BUCKET, Key="corrupt/ds/croupier/manifest.json")
    from croupier.format.remote import fetch_sidecar

    with pytest.raises(DatasetError, match=rf"sidecar manifest {url}/croupier/manifest.json does not exist"):
        fetch_sidecar(url, tmp_path / "sidecars")


def test_a_mixture_source_on_the_object_store_reads_its_sidecar_from_the_bucket(s3, tmp_path, corpus):
    from croupier.mixture import load_mix
    from croupier.server.sampling.mixture import mixture_sampler

    src = tmp_path / "docs.jsonl"
    write_jsonl(src, corpus[:200])
    url = f"s3://{BUCKET}/mix/web"
    assert main(_build_args(src, url, "--work-dir", str(tmp_path / "work"))) == 0
    assert main(_build_args(src, str(tmp_path / "books"))) == 0
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.web]\ndataset = "{url}"\nweight = 2\npolicy = "clusterclip"\nclip = 2\n'
                   f'[sources.books]\ndataset = "{tmp_path / "books"}"\nweight = 1\npolicy = "uniform"\n')
    m = load_mix(mix, tmp_path / "sidecars")
    local = Sidecar.open(tmp_path / "books")
    assert [i.remote for i in m.infos] == [url, str(tmp_path / "books")]
    assert m.infos[0].fingerprint == local.fingerprint  # same inputs, same dataset, read from the bucket
    assert m.infos[1].offset == m.infos[0].size == 200
    out = subprocess.run([sys.executable, "-m", "croupier", "simulate", "--mix", str(mix), "--global-batch", "12",
                          "--steps", "4", "--format", "jsonl"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ref = mixture_sampler(m, 12, 0)
    assert [json.loads(x)["indices"] for x in out.stdout.splitlines()] == [ref.next_batch().tolist() for _ in range(4)]


def test_simulate_opens_a_dataset_on_the_object_store_like_serve(s3, tmp_path, corpus, capsys):
    """`simulate --dataset s3://...` deals what the same dataset built locally deals."""
    from croupier.datasets import open_dataset
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.sampler import Sampler

    src = tmp_path / "docs.jsonl"
    write_jsonl(src, corpus[:200])
    url = f"s3://{BUCKET}/sim/ds"
    assert main(_build_args(src, url, "--work-dir", str(tmp_path / "work"))) == 0
    assert main(_build_args(src, str(tmp_path / "local"))) == 0
    capsys.readouterr()
    assert main(["simulate", "--dataset", url, "--policy", "clusterclip", "--clip", "2", "--global-batch", "10",
                 "--steps", "5", "--format", "jsonl"]) == 0
    got = [json.loads(x)["indices"] for x in capsys.readouterr().out.splitlines()]
    local = open_dataset(str(tmp_path / "local"))
    assert open_dataset(url).fingerprint == local.fingerprint
    ref = Sampler(local.layout(), PolicyConfig(policy="clusterclip", clip=2), 10, 0)
    assert got == [ref.next_batch().tolist() for _ in range(5)]
