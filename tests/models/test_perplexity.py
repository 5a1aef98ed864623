"""Perplexity scores: mean token NLL of a tiny causal LM, batched = unbatched, end to end."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest

from croupier.cli import main
from croupier.errors import ConfigError
from croupier.format.sidecar import Sidecar
from croupier.shards.scoring.askllm import ModelLoadError
from croupier.shards.scoring.lm_scores import ShardTextReader
from croupier.shards.scoring.perplexity import PerplexityScorer
from croupier.shards.scoring.scorers import UNSCORABLE

os.environ.setdefault("HF_HUB_OFFLINE", "1")


TEXTS = ["The orchestra rehearses a symphony.", "", "word " * 300, "A judge overturns the verdict on appeal.",
         "hi"]


@pytest.mark.slow
def test_mean_token_nll_matches_a_plain_forward_pass(tiny_lms):
    import torch

    s = PerplexityScorer(str(tiny_lms["gpt2"]), batch_size=2, max_length=64)
    got = s.score(TEXTS)
    tok, model = s.lm.tokenizer, s.lm.model
    for text, g in zip(TEXTS, got):
        ids = [tok.cls_token_id] + tok(text, add_special_tokens=False)["input_ids"][:63]
        if len(ids) < 2:
            assert math.isnan(g)
            continue
        t = torch.tensor([ids])
        with torch.no_grad():
            want = model(t, labels=t).loss.item()  # HF's mean next-token cross-entropy
        assert math.isclose(float(g), want, rel_tol=1e-4), (text, g, want)
    assert np.isnan(got[1]) and np.isfinite(np.delete(got, 1)).all()
    assert got[0] > 5  # random weights over a 30k vocabulary: about ln(30522) = 10.3 nats
    assert s.params()["unit"] == "nats/token"


def test_perplexity_needs_a_causal_model(tiny_lms, tmp_path):
    with pytest.raises(ConfigError, match="needs a causal LM"):
        PerplexityScorer(str(tiny_lms["t5"]))
    with pytest.raises(ModelLoadError, match="does not exist"):
        PerplexityScorer(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="max length"):
        PerplexityScorer(str(tiny_lms["gpt2"]), max_length=1)


@pytest.mark.slow
def test_perplexity_end_to_end_and_lowest_k(tiny_lms, build_dataset, tmp_path, capsys):
    ds = build_dataset(tmp_path / "b", num_docs=60, topics=2)
    assert main(["shards", "score", str(ds), "--by", "perplexity", "--model", str(tiny_lms["gpt2"]),
                 "--max-length", "48", "--chunk-size", "25", "--no-progress"]) == 0
    side = Sidecar.open(ds)
    v = np.asarray(side.scores("perplexity"))
    with ShardTextReader(ds) as r:
        texts = r.texts(0, side.num_samples)
    ref = PerplexityScorer(str(tiny_lms["gpt2"]), max_length=48).score(texts)
    np.testing.assert_allclose(v, np.where(np.isfinite(ref), ref, UNSCORABLE), rtol=1e-4)
    p = side.score_params("perplexity")
    assert p["scorer"] == "perplexity" and p["max_length"] == 48 and p["unscorable"] == 0
    assert main(["shards", "select", str(ds), "--by", "perplexity", "--keep", "0.2"]) == 0
    kept = np.asarray(side.selection("perplexity-0.2"))
    assert len(kept) == 12 and v[kept].max() <= np.sort(v)[11]
    assert main(["shards", "score", str(ds), "--by", "perplexity", "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "--endpoint is for askllm only" in capsys.readouterr().err
    shutil.rmtree(ds)
