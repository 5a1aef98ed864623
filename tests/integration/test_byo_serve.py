"""A dataset built from given embeddings and a cluster field, filtered with --where and cut by an
external score, served by `croupier serve --selection`: the served batches equal the sampler's own
sequence on that selection (what `croupier simulate --selection` runs), every id inside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from cases.select import selection_sampler
from croupier.cli import main
from croupier.format.sidecar import Sidecar
from croupier.proto import slice_ids
from croupier.server.sampling.policy import PolicyConfig
from croupier.shards.build.synthetic import generate_corpus, write_jsonl
from workers.harness import terminate


def test_a_byo_dataset_and_selection_serve_the_simulated_sequence(tmp_path: Path):
    from croupier.grpc_options import channel_options
    from croupier.proto import pb2, pb2_grpc

    n = 300
    docs = generate_corpus(n, 4, seed=9)
    for i, d in enumerate(docs):
        d.update(source=f"s{i % 5}", quality=float((i * 37) % n) / n, lang="en" if i % 3 else "fr")
    write_jsonl(tmp_path / "in.jsonl", docs)
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32))
    ds = tmp_path / "ds"
    assert main(["shards", "build", str(tmp_path / "in.jsonl"), "--out", str(ds), "--embeddings",
                 str(tmp_path / "emb.npy"), "--group-by", "source", "--keep-fields", "quality,lang", "--quiet",
                 "--no-tail-check"]) == 0
    assert main(["shards", "score", str(ds), "--from-field", "quality"]) == 0
    assert main(["shards", "select", str(ds), "--where", "lang == 'en'", "--by", "quality", "--keep", "0.5",
                 "--name", "en-top"]) == 0
    side = Sidecar.open(ds)
    assert side.num_clusters == 5 and len(side.selection("en-top")) == 100  # 200 'en' records, the best half
    chosen = set(np.asarray(side.selection("en-top")).tolist())
    ref = selection_sampler(ds, "en-top", PolicyConfig("uniform"), batch=8)
    expected = [ref.next_batch() for _ in range(12)]
    cmd = [sys.executable, "-m", "croupier", "serve", str(ds), "--selection", "en-top", "--policy", "uniform",
           "--global-batch", "8", "--seed", "0", "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ch = None
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, "server exited before serving"
        ch = grpc.insecure_channel(json.loads(line)["address"], options=channel_options())
        stub = pb2_grpc.SamplerStub(ch)
        stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
        for t in range(12):
            got = slice_ids(stub.GetSlice(pb2.GetSliceRequest(rank=0, world_size=1, step=t), timeout=20).slice)
            stub.Ack(pb2.AckRequest(rank=0, world_size=1, next_step=t + 1), timeout=20)
            assert np.array_equal(got, expected[t]), t
            assert set(got.tolist()) <= chosen
    finally:
        if ch is not None:
            ch.close()
        assert terminate(proc, 20)[0] == 0
        proc.stdout.close()  # type: ignore[union-attr]
