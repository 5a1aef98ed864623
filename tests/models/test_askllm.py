"""Ask-LLM: the paper's prompt byte for byte, P(yes) from tiny local models (causal and seq2seq),
truncation that keeps the question, offline load errors, and the OpenAI-compatible HTTP backend
against a real local server (retries, timeouts, partial scores kept and resumed)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from croupier.cli import main
from croupier.format.sidecar import Sidecar
from croupier.shards.scoring.askllm import PROMPT_TEMPLATE, AskLLMScorer, ModelLoadError, build_prompt, load_model
from croupier.shards.scoring.askllm_http import EndpointError, HTTPAskLLM, completions_url, yes_probability
from croupier.shards.scoring.lm_scores import ShardTextReader

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The prompt of arXiv 2402.09668 (Ask-LLM), with "EXAMPLE" in the example's place.
PAPER_PROMPT = (
    b"###\n"
    b"EXAMPLE\n"
    b"###\n"
    b"Does the previous paragraph demarcated within ### and ### contain informative signal for "
    b"pre-training a large-language model? An informative datapoint should be well-formatted, contain "
    b"some usable knowledge of the world, and strictly NOT have any harmful, racist, sexist, etc. content.\n"
    b"OPTIONS:\n"
    b"- yes\n"
    b"- no"
)
PAPER_PROMPT_SHA256 = "8f78ecdce7f570d5222abdabe9337cfd9fa243c2b668ae8810898be060fd5fbd"


def test_prompt_is_the_papers_byte_for_byte():
    got = build_prompt("EXAMPLE").encode("utf-8")
    assert got == PAPER_PROMPT
    assert hashlib.sha256(got).hexdigest() == PAPER_PROMPT_SHA256
    assert PROMPT_TEMPLATE.replace("{example}", "EXAMPLE").encode() == PAPER_PROMPT
    assert build_prompt("{x} {}") == PROMPT_TEMPLATE.replace("{example}", "{x} {}")  # braces are text


TEXTS = ["The telescope observes a distant galaxy.", "x", "Cooking: the sauce simmers " * 8,
         "Braces {like} these and ### marks", "A court rules on the appeal."]


@pytest.mark.slow
def test_causal_score_is_p_yes_after_the_prompt(tiny_lms):
    import torch

    s = AskLLMScorer(str(tiny_lms["gpt2"]), batch_size=2, max_length=256)
    got = s.score(TEXTS)
    tok, model = s.lm.tokenizer, s.lm.model
    yes = tok.convert_tokens_to_ids("yes")
    assert s.yes_ids == [yes]
    for text, g in zip(TEXTS, got):
        ids = [tok.cls_token_id] + tok(build_prompt(text), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        want = torch.softmax(logits, -1)[yes].item()
        assert math.isclose(float(g), want, rel_tol=1e-4), (text, g, want)
    assert got.dtype == np.float32 and ((got > 0) & (got < 1)).all()
    assert s.params()["seq2seq"] is False


@pytest.mark.slow
def test_seq2seq_score_is_p_yes_at_the_first_decoder_step(tiny_lms):
    import torch

    s = AskLLMScorer(str(tiny_lms["t5"]), batch_size=3, max_length=256)
    got = s.score(TEXTS)
    tok, model = s.lm.tokenizer, s.lm.model
    yes = tok.convert_tokens_to_ids("yes")
    for text, g in zip(TEXTS, got):
        enc = torch.tensor([tok(build_prompt(text))["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=enc, decoder_input_ids=torch.tensor([[tok.pad_token_id]])).logits[0, 0]
        want = torch.softmax(logits, -1)[yes].item()
        assert math.isclose(float(g), want, rel_tol=1e-4), (text, g, want)
    assert s.params()["seq2seq"] is True


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_long_examples_are_cut_and_the_question_kept(tiny_lms, kind):
    s = AskLLMScorer(str(tiny_lms[kind]), max_length=120)
    long = " ".join(f"word{i}" for i in range(3000))
    enc = s.encode([long, "short one"])
    tok = s.lm.tokenizer
    # a prompt that fits is not cut: the causal model's sees [CLS] first, the seq2seq's [CLS] ... [SEP]
    short = (([tok.cls_token_id] + tok(build_prompt("short one"), add_special_tokens=False)["input_ids"])
             if kind == "gpt2" else tok(build_prompt("short one"))["input_ids"])
    assert len(enc[0]) == 120 and enc[1] == short and len(short) < 120
    text = tok.decode(enc[0], skip_special_tokens=True)
    assert text.startswith("# # # word0 word1")
    assert text.endswith("# # # does the previous paragraph demarcated within # # # and # # # contain "
                         "informative signal for pre - training a large - language model? an informative "
                         "datapoint should be well - formatted, contain some usable knowledge of the world, "
                         "and strictly not have any harmful, racist, sexist, etc. content. options : - yes - no")
    assert np.isfinite(s.score([long])).all()


def test_models_that_cannot_load_offline_name_what_is_missing(tmp_path, tiny_lms, capsys):
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny_lms["gpt2"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"lacks model weights .*tokenizer files"):
        load_model(str(only_config))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_lms["gpt2"].iterdir():
        if f.name != "model.safetensors":
            (no_weights / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match=r"lacks model weights \(model.safetensors or pytorch_model.bin\)"):
        load_model(str(no_weights))
    with pytest.raises(ModelLoadError, match=r"neither a local folder nor a model in the Hugging Face cache"):
        load_model("croupier-test-org/no-such-model")
    with pytest.raises(ModelLoadError, match=r"folder .*missing-dir does not exist"):
        load_model(str(tmp_path / "missing-dir"))


# -- a small OpenAI-compatible server --------------------------------------------------------------
def fake_p_yes(prompt: str) -> float:
    return (sum(prompt.encode()) % 89 + 5) / 100.0


class FakeServer:
    """Speaks `/v1/models` and `/v1/completions` (logprobs) like vLLM; misbehaves on request."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.requests = 0
        self.fail_first = 0        # answer the first N completions with `fail_status`
        self.fail_after: int | None = None  # answer completions after the first N with `fail_status`
        self.fail_status = 503
        self.hold = False          # keep each completion request unanswered until `release` is set
        self.release = threading.Event()
        self.held = 0              # completion requests held and never answered
        self.lock = threading.Condition()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests += 1
                    n = owner.requests
                if owner.hold:
                    with owner.lock:
                        owner.held += 1
                        owner.lock.notify_all()
                    owner.release.wait(60)  # bounds a hang if the client never gives up
                    return  # the connection closes with no reply
                if n <= owner.fail_first or (owner.fail_after is not None and n > owner.fail_after):
                    self._send(owner.fail_status, {"error": {"message": "server busy"}})
                    return
                if self.path != "/v1/completions" or body.get("model") != "fake-model" \
                        or body.get("max_tokens") != 1 or not body.get("logprobs"):
                    self._send(400, {"error": {"message": f"bad request {body}"}})
                    return
                prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
                with owner.lock:
                    owner.prompts.extend(prompts)
                choices = []
                for i, p in enumerate(prompts):
                    y = fake_p_yes(p)
                    choices.append({"index": i, "text": " yes", "finish_reason": "length", "logprobs": {
                        "tokens": [" yes"], "token_logprobs": [math.log(y)],
                        "top_logprobs": [{" yes": math.log(y), " no": math.log(1 - y)}]}})
                choices.reverse()  # order comes from "index", not position
                self._send(200, {"id": "cmpl", "object": "text_completion", "model": "fake-model",
                                 "choices": choices})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_held(self, n: int) -> int:
        """The number of held requests once it reaches n (or after a minute, whatever it is then)."""
        with self.lock:
            self.lock.wait_for(lambda: self.held >= n, timeout=60)
            return self.held

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


def test_completions_url():
    assert completions_url("http://h:8000") == "http://h:8000/v1/completions"
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"
    assert completions_url("https://h/x/v1/completions") == "https://h/x/v1/completions"


def test_yes_probability_reads_both_logprob_formats():
    assert yes_probability({" yes": math.log(0.25), " no": math.log(0.5), "yes": math.log(0.125)}) == 0.375
    assert yes_probability([{"token": " yes", "logprob": math.log(0.5)}, {"token": "No", "logprob": -1.0}]) == 0.5
    assert yes_probability({" no": -0.1, " Yes": -1.0}) == 0.0


def test_http_backend_scores_with_the_papers_prompt(server):
    texts = ["alpha " * 3, "beta", "gamma {braces}", "x" * 50, "delta"]
    s = HTTPAskLLM(server.url, batch_size=2, max_chars=20, concurrency=2, backoff=0)
    assert s.model == "fake-model"
    got = s.score(texts)
    sent = [build_prompt(t[:20]) for t in texts]
    np.testing.assert_allclose(got, [fake_p_yes(p) for p in sent], rtol=1e-6)
    assert sorted(server.prompts) == sorted(sent)
    assert s.params()["endpoint"] == server.url + "/v1/completions"


def test_http_retries_then_succeeds_or_fails_clearly(server):
    server.fail_first = 2
    s = HTTPAskLLM(server.url, model="fake-model", retries=3, backoff=0)
    assert np.isfinite(s.score(["one"])).all() and server.requests == 3
    server.requests, server.fail_first = 0, 5
    s = HTTPAskLLM(server.url, model="fake-model", retries=1, backoff=0)
    with pytest.raises(EndpointError, match=r"failed after 2 attempts: HTTP 503"):
        s.score(["one"])
    assert server.requests == 2
    server.requests, server.fail_first, server.fail_status = 0, 5, 400
    with pytest.raises(EndpointError, match=r"refused the request: HTTP 400"):
        s.score(["one"])
    assert server.requests == 1  # a client error is not retried


def test_http_timeout_is_retried_then_reported(server):
    server.hold = True  # no reply ever comes while the client waits: only its timeout ends an attempt
    s = HTTPAskLLM(server.url, model="fake-model", timeout=0.2, retries=1, backoff=0)
    with pytest.raises(EndpointError, match=r"failed after 2 attempts: timed out after 0.2 s"):
        s.score(["one"])
    # the server answered nothing and dropped nothing (the held requests are released below): the
    # client's own timeout ended each of its two attempts, and it made no third
    assert server.wait_held(2) == 2 and server.requests == 2
    server.release.set()


def test_unreachable_endpoint_is_a_clear_error():
    with pytest.raises(EndpointError, match=r"connection failed"):
        HTTPAskLLM("http://127.0.0.1:9", model="m", retries=0).score(["x"])


# -- end to end through `croupier shards score` ---------------------------------------------------
@pytest.fixture(scope="module")
def small_ds(tmp_path_factory, build_dataset) -> Path:
    return build_dataset(tmp_path_factory.mktemp("askds"), num_docs=120, topics=3)


@pytest.fixture()
def ds(small_ds, tmp_path) -> Path:
    import shutil
    dst = tmp_path / "ds"
    shutil.copytree(small_ds, dst)
    return dst


def test_endpoint_outage_keeps_partial_scores_and_the_run_resumes(ds, server, capsys):
    server.fail_after = 2  # two good requests (one chunk of 40 = 2 batches of 20), then 503s
    args = ["shards", "score", str(ds), "--by", "askllm", "--endpoint", server.url, "--chunk-size", "40",
            "--batch-size", "20", "--concurrency", "1", "--retries", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "endpoint http://127.0.0.1:" in err and "failed after 2 attempts: HTTP 503" in err
    work = ds / "croupier" / "scoring" / "askllm"
    assert np.fromfile(work / "done.u8", dtype=np.uint8).tolist() == [1, 0, 0]
    assert "askllm" not in Sidecar.open(ds).score_names()
    first = len(server.prompts)
    assert first == 40
    server.fail_after = None
    assert main(args) == 0
    assert len(server.prompts) == 120  # only the 80 missing samples were asked again
    side = Sidecar.open(ds)
    with ShardTextReader(ds) as r:
        texts = r.texts(0, side.num_samples)
    want = np.array([fake_p_yes(build_prompt(t[:12000])) for t in texts], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(side.scores("askllm")), want, rtol=1e-6)
    p = side.score_params("askllm")
    assert p["backend"] == "http" and p["model"] == "fake-model" and p["scorer"] == "askllm"
    assert not work.exists()
    assert main(["shards", "select", str(ds), "--by", "askllm", "--keep", "0.25"]) == 0
    top = np.sort(np.argsort(-want, kind="stable")[:30])
    assert np.array_equal(side.selection("askllm-0.25"), top)


@pytest.mark.slow
def test_local_model_end_to_end(ds, tiny_lms, capsys):
    assert main(["shards", "score", str(ds), "--by", "askllm", "--model", str(tiny_lms["t5"]), "--name", "ask-t5",
                 "--max-length", "96", "--chunk-size", "64", "--batch-size", "32", "--no-progress"]) == 0
    side = Sidecar.open(ds)
    v = np.asarray(side.scores("ask-t5"))
    assert v.shape == (side.num_samples,) and ((v > 0) & (v < 1)).all()
    p = side.score_params("ask-t5")
    assert p["model"] == str(tiny_lms["t5"]) and p["seq2seq"] is True and p["max_length"] == 96
    with ShardTextReader(ds) as r:
        few = r.texts(0, 3)
    ref = AskLLMScorer(str(tiny_lms["t5"]), max_length=96).score(few)
    np.testing.assert_allclose(v[:3], ref, rtol=1e-4)
    assert main(["shards", "select", str(ds), "--by", "askllm", "--scores", "ask-t5", "--keep", "0.5",
                 "--per-cluster"]) == 0
    assert len(side.selection("askllm-0.5-per-cluster")) == round(0.5 * side.num_samples)
    assert main(["shards", "score", str(ds), "--by", "askllm", "--model", str(ds / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["shards", "score", str(ds), "--by", "askllm"]) == 2
    assert "exactly one of --model" in capsys.readouterr().err


def test_a_cached_model_with_missing_files_is_named(tmp_path, tiny_lms, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((tiny_lms["gpt2"] / "config.json").read_text())
    (snap / "tokenizer.json").write_text((tiny_lms["gpt2"] / "tokenizer.json").read_text())
    from croupier.shards.scoring.askllm import diagnose_model_path
    msg = diagnose_model_path("acme/tiny")
    assert "cache holds 'acme/tiny'" in msg and "model weights" in msg and "missing" in msg
