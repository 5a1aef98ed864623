"""Ask-LLM through an OpenAI-compatible completions endpoint (vLLM, TGI, llama.cpp...).

Large proxy models live on another machine; this backend sends the paper's prompt
(`askllm.build_prompt`) to `POST {endpoint}/v1/completions` with `max_tokens=1`,
`temperature=0` and `logprobs=N`, and scores each example by the probability the server
reports for the answer token "yes" (spelled "yes", " yes", "▁yes" or "Ġyes"), i.e. the
exp of its log-probability among the top N. When "yes" is not among the top N the score
is 0.0 (its probability is below the smallest reported one).

Without a tokenizer on this side, long examples are truncated by characters (`max_chars`,
head kept) inside the prompt, so the closing "###" and the question always survive.

Failures: connection errors, timeouts, HTTP 408/429/5xx are retried with exponential
backoff; after `retries` retries, or at once for any other HTTP error, an `EndpointError`
names the URL, the attempts and the last failure. Batches go out `concurrency` at a time.
"""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from croupier.errors import ConfigError, CroupierError
from croupier.shards.scoring.askllm import build_prompt

_YES = frozenset({"yes", " yes", "\u2581yes", "\u0120yes"})
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class EndpointError(CroupierError):
    """The scoring endpoint failed (after retries where retrying makes sense)."""


def completions_url(endpoint: str) -> str:
    """`http://host:8000` -> `http://host:8000/v1/completions` (full URLs kept as given)."""
    e = endpoint.rstrip("/")
    if not e.startswith(("http://", "https://")):
        raise ConfigError(f"endpoint must be an http(s) URL, got {endpoint!r}")
    if e.endswith("/completions"):
        return e
    if e.endswith("/v1"):
        return e + "/completions"
    return e + "/v1/completions"


def truncate_chars(example: str, max_chars: int) -> str:
    """Head of the example, at most max_chars characters."""
    return example if len(example) <= max_chars else example[:max_chars]


def yes_probability(top_logprobs: dict | list) -> float:
    """P("yes") from one position's top log-probabilities (0.0 when "yes" is absent).

    Accepts the completions format ({token: logprob}) and the chat format
    ([{"token": ..., "logprob": ...}, ...]).
    """
    if isinstance(top_logprobs, list):
        top_logprobs = {d["token"]: d["logprob"] for d in top_logprobs}
    return float(sum(math.exp(lp) for tok, lp in top_logprobs.items()
                     if tok in _YES and lp is not None))


class HTTPAskLLM:
    """Ask-LLM scorer backed by an OpenAI-compatible `/v1/completions` endpoint."""

    def __init__(self, endpoint: str, model: str | None = None, *, batch_size: int = 16,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 top_logprobs: int = 20, max_chars: int = 12000, api_key: str | None = None,
                 concurrency: int = 4) -> None:
        self.url = completions_url(endpoint)
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ConfigError(f"retries must be >= 0, got {retries}")
        if not 1 <= top_logprobs <= 20:
            raise ConfigError(f"top logprobs must be in [1, 20], got {top_logprobs}")
        if max_chars < 1:
            raise ConfigError(f"max chars must be >= 1, got {max_chars}")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        self.batch_size = int(batch_size)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.top_logprobs = int(top_logprobs)
        self.max_chars = int(max_chars)
        self.api_key = api_key
        self.concurrency = int(concurrency)
        self.model = model or self._first_model()

    def params(self) -> dict:
        return {"backend": "http", "endpoint": self.url, "model": self.model,
                "max_chars": self.max_chars, "top_logprobs": self.top_logprobs,
                "prompt": "arXiv:2402.09668"}

    # -- HTTP ------------------------------------------------------------------------------
    def _request(self, url: str, body: dict | None) -> dict:
        """One JSON request with retries; returns the decoded reply."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace").strip()
                exc.close()
                last = f"HTTP {exc.code} {exc.reason}: {detail}"
                if exc.code not in _RETRY_STATUS:
                    raise EndpointError(f"endpoint {url} refused the request: {last}") from None
            except TimeoutError as exc:
                last = f"timed out after {self.timeout:g} s ({exc})"
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last = f"timed out after {self.timeout:g} s"
                else:
                    last = f"connection failed: {reason}"
            except (ConnectionError, json.JSONDecodeError) as exc:
                last = f"{type(exc).__name__}: {exc}"
        raise EndpointError(f"endpoint {url} failed after {self.retries + 1} attempts: {last}")

    def _first_model(self) -> str:
        url = self.url.rsplit("/completions", 1)[0] + "/models"
        reply = self._request(url, None)
        try:
            return str(reply["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"endpoint {url} lists no model; pass --endpoint-model") from None

    def _score_batch(self, texts: Sequence[str]) -> np.ndarray:
        prompts = [build_prompt(truncate_chars(t, self.max_chars)) for t in texts]
        reply = self._request(self.url, {"model": self.model, "prompt": prompts, "max_tokens": 1,
                                         "temperature": 0.0, "logprobs": self.top_logprobs})
        try:
            choices = sorted(reply["choices"], key=lambda c: int(c.get("index", 0)))
            if len(choices) != len(prompts):
                raise ValueError(f"{len(choices)} choices for {len(prompts)} prompts")
            return np.array([yes_probability(c["logprobs"]["top_logprobs"][0]) for c in choices],
                            dtype=np.float32)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise EndpointError(f"endpoint {self.url} sent a reply without per-token "
                                f"logprobs ({type(exc).__name__}: {exc})") from None

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P("yes") for every text, float32, in input order."""
        texts = list(texts)
        batches = [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        if not batches:
            return np.empty(0, dtype=np.float32)
        if self.concurrency == 1 or len(batches) == 1:
            parts = [self._score_batch(b) for b in batches]
        else:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                parts = list(pool.map(self._score_batch, batches))
        return np.concatenate(parts)
