"""The Ray engine with the user's embeddings: the same dataset and sidecar as the local engine; token
corpora are refused on Ray in one line."""

from __future__ import annotations

import numpy as np
import pytest

from croupier.errors import ConfigError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.ray_builder import build_ray
from croupier.shards.build.synthetic import generate_corpus, write_jsonl

pytestmark = pytest.mark.slow


def test_given_embeddings_and_a_field_build_the_same_on_ray(tmp_path):
    import ray

    docs = generate_corpus(400, 4, seed=5)
    for i, d in enumerate(docs):
        d["vec"] = [float(np.sin(i + j)) for j in range(6)]
    write_jsonl(tmp_path / "in.jsonl", docs)
    np.save(tmp_path / "emb.npy", np.random.default_rng(1).standard_normal((400, 6)).astype(np.float32))
    settings = [dict(embeddings=str(tmp_path / "emb.npy"), group_by="topic", clusters_per_group=2),
                dict(embeddings="vec", clusters=5), dict(embedder="none", group_by="topic")]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        for i, kw in enumerate(settings):
            cfg = dict(inputs=(str(tmp_path / "in.jsonl"),), progress=False, **kw)
            a = build(BuildConfig(out=str(tmp_path / f"local{i}"), **cfg))  # type: ignore[arg-type]
            b = build_ray(BuildConfig(out=str(tmp_path / f"ray{i}"), **cfg))  # type: ignore[arg-type]
            sa, sb = Sidecar.open(a.out), Sidecar.open(b.out)
            assert (tmp_path / f"local{i}" / "index.json").read_bytes() == \
                (tmp_path / f"ray{i}" / "index.json").read_bytes()
            np.testing.assert_array_equal(np.asarray(sa.assignments()), np.asarray(sb.assignments()))
            np.testing.assert_array_equal(np.asarray(sa.embeddings()), np.asarray(sb.embeddings()))
            assert sa.manifest["provenance"] == sb.manifest["provenance"]
    finally:
        ray.shutdown()
    (tmp_path / "c.idx").write_bytes(b"")
    (tmp_path / "c.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="token corpora .* run on the local engine"):
        build_ray(BuildConfig(out=str(tmp_path / "t"), inputs=(str(tmp_path / "c.idx"),),
                              embeddings=str(tmp_path / "emb.npy")))
