"""Perplexity scores: mean token negative log-likelihood under a small causal LM.

The classic quality-filtering baseline of arXiv 2402.09668: score every example by the
mean NLL (nats per token) a small causal LM assigns to it, and keep the lowest. Examples
are truncated to `max_length` tokens (head kept); a leading BOS is added when the
tokenizer adds one, so the first real token is scored too. An example with fewer than two
tokens in all has no predicted token and scores NaN (selection ranks NaN last).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from croupier.errors import ConfigError
from croupier.shards.scoring.askllm import LoadedModel, length_batches, load_model, pad_batch, pad_id_of, special_tokens


class PerplexityScorer:
    """`score(texts)` -> float32 mean token NLL per text, under a local causal LM."""

    def __init__(self, model: str | LoadedModel, *, batch_size: int = 8, max_length: int = 512,
                 device: str | None = None, dtype: str = "auto") -> None:
        if max_length < 2:
            raise ConfigError(f"max length must be >= 2 tokens, got {max_length}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.lm = (model if isinstance(model, LoadedModel)
                   else load_model(model, causal_only=True, device=device, dtype=dtype))
        if self.lm.seq2seq:
            raise ConfigError(f"model {self.lm.name!r} is an encoder-decoder; perplexity needs a causal LM")
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self._prefix, _ = special_tokens(self.lm.tokenizer)
        self._pad = pad_id_of(self.lm.tokenizer)

    def params(self) -> dict:
        return {"backend": "local", "model": str(self.lm.name), "max_length": self.max_length,
                "dtype": self.lm.dtype, "unit": "nats/token"}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        room = self.max_length - len(self._prefix)
        return [list(self._prefix) + list(ids[:room]) for ids in enc]

    def score_encoded(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        out = np.full(len(encoded), np.nan, dtype=np.float32)
        lengths = [len(e) for e in encoded]
        usable = [i for i, n in enumerate(lengths) if n >= 2]
        dev = self.lm.device
        with torch.inference_mode():
            for sub in length_batches([lengths[i] for i in usable], self.batch_size):
                batch = np.asarray(usable, dtype=np.int64)[sub]
                ids, mask = pad_batch([encoded[i] for i in batch], self._pad, left=False)
                t_ids = torch.from_numpy(ids).to(dev)
                t_mask = torch.from_numpy(mask).to(dev)
                logits = self.lm.model(input_ids=t_ids, attention_mask=t_mask).logits[:, :-1, :]
                target = t_ids[:, 1:]
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                      target.reshape(-1), reduction="none").view_as(target)
                m = t_mask[:, 1:].to(nll.dtype)
                mean = (nll * m).sum(-1) / m.sum(-1)
                out[batch] = mean.cpu().numpy()
        return out

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.empty(0, dtype=np.float32)
        return self.score_encoded(self.encode(texts))
