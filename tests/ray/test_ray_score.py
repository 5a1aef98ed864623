"""`croupier shards score --by askllm|perplexity --engine ray`: a real local Ray cluster (2 CPUs)
scores with an actor pool of the tiny offline models; the scores equal the local engine's
(rtol 1e-5: same chunks and batches, only thread counts differ), at least two actors score,
a run interrupted on the local engine resumes on Ray, and bad input is refused as locally."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from croupier.cli import main
from croupier.format.sidecar import Sidecar

pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ds(tmp_path_factory, build_dataset) -> Path:
    return build_dataset(tmp_path_factory.mktemp("rayscore"), num_docs=48, topics=2)


@pytest.mark.parametrize("by, model, extra", [
    ("askllm", "t5", ["--max-length", "96"]),
    ("askllm", "gpt2", ["--max-length", "96"]),
    ("perplexity", "gpt2", ["--max-length", "40"]),
])
def test_ray_model_scores_equal_local(ds, tiny_lms, ray_cluster, by, model, extra):
    common = ["shards", "score", str(ds), "--by", by, "--model", str(tiny_lms[model]), *extra,
              "--chunk-size", "4", "--batch-size", "3", "--no-progress"]
    assert main([*common, "--name", f"{by}-{model}-local"]) == 0
    assert main([*common, "--name", f"{by}-{model}-ray", "--engine", "ray"]) == 0
    side = Sidecar.open(ds)
    local = np.asarray(side.scores(f"{by}-{model}-local"))
    remote = np.asarray(side.scores(f"{by}-{model}-ray"))
    assert len(np.unique(local)) > 10  # a real spread of scores, not a constant
    np.testing.assert_allclose(remote, local, rtol=RTOL, atol=ATOL)
    p = side.score_params(f"{by}-{model}-ray")
    assert p["engine"] == "ray" and p["ray_actors"] >= 2 and p["ray_chunks_scored"] == 12
    lp = side.score_params(f"{by}-{model}-local")
    assert {k: v for k, v in p.items() if k not in ("engine", "ray_actors", "ray_chunks_scored", "elapsed_s")} == \
        {k: v for k, v in lp.items() if k != "elapsed_s"}


class Interrupt(Exception):
    pass


def test_a_local_run_interrupted_resumes_on_ray(ds, tiny_lms, ray_cluster):
    """The local engine stops after 3 chunks; `--engine ray` scores only the 9 missing ones."""
    from croupier.shards.scoring.perplexity import PerplexityScorer
    from croupier.shards.scoring.scorers import score_texts

    scorer = PerplexityScorer(str(tiny_lms["gpt2"]), batch_size=3, max_length=40)
    record = {"scorer": "perplexity", **scorer.params(), "text_field": "text"}

    class Stops:
        calls = 0

        def score(self, texts):
            Stops.calls += 1
            if Stops.calls > 3:
                raise Interrupt()
            return scorer.score(texts)

    side = Sidecar.open(ds)
    with pytest.raises(Interrupt):
        score_texts(side, "ppl-resumed", Stops(), record, chunk_size=4, progress=False, label="perplexity")
    assert main(["shards", "score", str(ds), "--by", "perplexity", "--model", str(tiny_lms["gpt2"]),
                 "--max-length", "40", "--chunk-size", "4", "--batch-size", "3", "--no-progress",
                 "--name", "ppl-resumed", "--engine", "ray"]) == 0
    side = Sidecar.open(ds)
    p = side.score_params("ppl-resumed")
    assert p["ray_chunks_scored"] == 9
    from croupier.shards.scoring.lm_scores import ShardTextReader

    with ShardTextReader(ds) as r:
        want = scorer.score(r.texts(0, side.num_samples))
    np.testing.assert_allclose(np.asarray(side.scores("ppl-resumed")), want, rtol=RTOL, atol=ATOL)


def test_bad_input_is_refused_as_locally(ds, tiny_lms, ray_cluster, capsys, tmp_path):
    def both(args: list[str], message: str) -> None:
        for engine in ("local", "ray"):
            assert main(["shards", "score", str(ds), *args, "--no-progress", "--engine", engine]) == 2, engine
            err = capsys.readouterr().err
            assert message in err, (engine, err)

    both(["--by", "askllm", "--model", str(tmp_path / "nope")], "does not exist")
    both(["--by", "perplexity", "--model", str(tiny_lms["t5"])], "needs a causal LM")
    both(["--by", "perplexity", "--model", str(tiny_lms["gpt2"]), "--max-length", "1"],
         "max length must be >= 2 tokens, got 1")
    both(["--by", "askllm", "--model", str(tiny_lms["gpt2"]), "--text-field", "body"], "no column 'body'")
    both(["--by", "askllm"], "exactly one of --model")
    both(["--by", "perplexity", "--endpoint", "http://127.0.0.1:9"], "--endpoint is for askllm only")
    for args, message in ((["--by", "askllm", "--endpoint", "http://127.0.0.1:9"], "an --endpoint is already a server"),
                          (["--by", "askllm", "--model", str(tiny_lms["gpt2"]), "--ray-workers", "0"],
                           "--ray-workers must be >= 1, got 0")):
        assert main(["shards", "score", str(ds), *args, "--engine", "ray", "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert not {n for n in Sidecar.open(ds).score_names() if n in ("askllm", "perplexity")}
