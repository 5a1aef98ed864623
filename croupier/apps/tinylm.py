"""A tiny decoder-only byte-level language model, for the demo and the training comparison.

It is small enough to train for a few hundred steps on two CPU cores in seconds (2 layers,
width 64, a context of 64 bytes), deterministic for a fixed seed, and it measures what the
sampler changes: per-example loss, so held-out loss can be broken down by cluster.

Every example is the first `context + 1` UTF-8 bytes of one document, padded with `PAD`
(masked out of the loss). The same document therefore always yields the same example, so
repeated draws of a sample are exact repeats, which is what over-fitting on up-sampled rare
clusters looks like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from croupier.errors import ConfigError

PAD = 256
VOCAB = 257


@dataclass(frozen=True)
class TinyLMConfig:
    """Shape of the model; `context` is the number of predicted bytes per example."""

    context: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256

    def __post_init__(self) -> None:
        for name in ("context", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tiny LM {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"tiny LM width {self.d_model} is not divisible by {self.n_heads} heads")

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then a GELU MLP."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Byte-level decoder-only transformer with learned positions and a tied output head."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # scaled residual projections (GPT-2)
            nn.init.normal_(block.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, time, VOCAB) for byte ids of shape (batch, time)."""
        t = inputs.shape[1]
        if t > self.cfg.context:
            raise ConfigError(f"input length {t} exceeds the model context {self.cfg.context}")
        x = self.tok(inputs) + self.pos(torch.arange(t, device=inputs.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T


def build_model(cfg: TinyLMConfig | None = None, seed: int = 0) -> TinyLM:
    """A freshly initialised model; the same seed always gives the same weights."""
    cfg = cfg or TinyLMConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyLM(cfg)


def encode(texts: Sequence[str | bytes], context: int) -> torch.Tensor:
    """Examples of `context + 1` byte ids (first bytes of each text, PAD-filled), int64."""
    out = np.full((len(texts), context + 1), PAD, dtype=np.int64)
    for i, text in enumerate(texts):
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        row = np.frombuffer(raw[: context + 1], dtype=np.uint8)
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def _token_losses(model: TinyLM, examples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (batch, time) and the mask of real (non-PAD) targets."""
    inputs, targets = examples[:, :-1], examples[:, 1:]
    logits = model(inputs)
    losses = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
    mask = (targets != PAD).to(losses.dtype)
    return losses.view(targets.shape) * mask, mask


def loss(model: TinyLM, examples: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) over every real target byte of the batch."""
    losses, mask = _token_losses(model, examples)
    return losses.sum() / mask.sum().clamp(min=1.0)


def make_optimizer(model: nn.Module, lr: float = 3e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with the settings the demo and the comparison use."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, examples: torch.Tensor,
               clip_norm: float = 1.0) -> float:
    """One optimizer step on a batch of encoded examples; returns the batch loss.

    `model` may be a DistributedDataParallel wrapper (gradients are averaged over ranks).
    """
    return train_step_losses(model, optimizer, examples, clip_norm)[0]


def train_step_losses(model: nn.Module, optimizer: torch.optim.Optimizer, examples: torch.Tensor,
                      clip_norm: float = 1.0) -> tuple[float, np.ndarray]:
    """`train_step`, also returning each example's mean training loss (nats per byte) from the
    same forward pass: what a trainer reports to the server (`report_losses`)."""
    inner = model.module if hasattr(model, "module") else model
    model.train()
    optimizer.zero_grad(set_to_none=True)
    inputs, targets = examples[:, :-1], examples[:, 1:]
    logits = model(inputs)
    losses = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
    mask = (targets.reshape(-1) != PAD).to(losses.dtype)
    value = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    value.backward()
    torch.nn.utils.clip_grad_norm_(inner.parameters(), clip_norm)
    optimizer.step()
    with torch.no_grad():
        per = (losses * mask).reshape(len(examples), -1).sum(1) / mask.reshape(len(examples), -1).sum(1).clamp(min=1.0)
    return float(value.detach()), per.double().numpy()


@torch.no_grad()
def example_losses(model: TinyLM, examples: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Mean loss (nats per byte) of each example separately, float64 array of len(examples)."""
    model.eval()
    out = np.empty(len(examples), dtype=np.float64)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        losses, mask = _token_losses(model, chunk)
        out[start:start + len(chunk)] = (losses.sum(1) / mask.sum(1).clamp(min=1.0)).double().numpy()
    return out


def per_cluster_mean(values: np.ndarray, clusters: np.ndarray, num_clusters: int) -> np.ndarray:
    """Mean of `values` within each cluster (NaN for a cluster with no value)."""
    clusters = np.asarray(clusters, dtype=np.int64)
    sums = np.bincount(clusters, weights=values, minlength=num_clusters)
    counts = np.bincount(clusters, minlength=num_clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
