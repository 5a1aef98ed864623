"""Ask-LLM quality scores with a local Hugging Face model (causal or seq2seq).

*How to Train Data-Efficient LLMs* (arXiv 2402.09668) asks an instruction-tuned proxy LM
whether each example is worth pre-training on, with the prompt in `PROMPT_TEMPLATE`
(verbatim from the paper, line breaks included), and scores the example by the softmax
probability of the token "yes" at the answer position:

- seq2seq models (the paper's Flan-T5): the encoder reads the prompt, the score is the
  first decoder step's distribution;
- causal models: the distribution of the token that follows the prompt.

The probability is the full-vocabulary softmax, summed over the single-token spellings
"yes" and " yes" (one id for SentencePiece vocabularies, two for byte-level BPE), so it is
the same quantity an OpenAI-compatible server reports through log-probabilities
(`askllm_http`).

Long examples are truncated *inside* the prompt: the head of the example is kept and the
closing "###" plus the question always survive, so the model always sees the full
question. Batches are formed from length-sorted examples to limit padding. Models load
offline only (`local_files_only`); a model that cannot be loaded gets a `ModelLoadError`
that names what is missing.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError

PROMPT_PREFIX = "###\n"
PROMPT_SUFFIX = (
    "\n###\n"
    "Does the previous paragraph demarcated within ### and ### contain informative signal for "
    "pre-training a large-language model? An informative datapoint should be well-formatted, "
    "contain some usable knowledge of the world, and strictly NOT have any harmful, racist, "
    "sexist, etc. content.\n"
    "OPTIONS:\n"
    "- yes\n"
    "- no"
)
PROMPT_TEMPLATE = PROMPT_PREFIX + "{example}" + PROMPT_SUFFIX
"""The paper's Ask-LLM prompt; `{example}` marks where the example goes."""

YES_SPELLINGS: tuple[str, ...] = ("yes", " yes")


def build_prompt(example: str) -> str:
    """The Ask-LLM prompt around one example (plain concatenation: braces in text are safe)."""
    return PROMPT_PREFIX + example + PROMPT_SUFFIX


class ModelLoadError(ConfigError):
    """A model or tokenizer cannot be loaded from local files; the message says what is missing."""


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "spiece.model", "tokenizer.model")


def diagnose_model_path(name: str) -> str:
    """What is missing for `name` to load offline ('' when nothing obvious is)."""
    p = Path(name).expanduser()
    if p.is_dir():
        missing = []
        if not (p / "config.json").is_file():
            missing.append("config.json")
        if not any((p / f).is_file() for f in _WEIGHT_FILES):
            missing.append("model weights (model.safetensors or pytorch_model.bin)")
        if not any((p / f).is_file() for f in _TOKENIZER_FILES):
            missing.append("tokenizer files (tokenizer.json, tokenizer_config.json, vocab.txt "
                           "or spiece.model)")
        return f"folder {p} lacks {', '.join(missing)}" if missing else ""
    if p.exists():
        return f"{p} is a file, not a model folder"
    if p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        return f"folder {p} does not exist"
    try:
        from huggingface_hub import constants
        cache = constants.HF_HUB_CACHE
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        cache = "the Hugging Face cache"
    cached = Path(cache) / ("models--" + name.replace("/", "--")) / "snapshots"
    snapshots = sorted(cached.glob("*"), key=lambda q: q.stat().st_mtime) if cached.is_dir() else []
    if snapshots:
        inner = diagnose_model_path(str(snapshots[-1]))
        return (f"the Hugging Face cache holds {name!r} at {snapshots[-1]}, but "
                f"{inner.split(' lacks ', 1)[1] if ' lacks ' in inner else 'its files are unreadable'}"
                + (" are missing" if " lacks " in inner else ""))
    return (f"{name!r} is neither a local folder nor a model in the Hugging Face cache at {cache} "
            f"(downloads are off); fetch it where there is network (`huggingface-cli download "
            f"{name}`) or pass a folder holding config.json, weights and tokenizer files")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@dataclass
class LoadedModel:
    """A model, its tokenizer, and how to feed it."""

    model: Any
    tokenizer: Any
    seq2seq: bool
    device: str
    dtype: str
    name: str


def resolve_device(device: str | None) -> str:
    import torch
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        # bfloat16 on GPUs that have it; float32 otherwise (T5-family models overflow in fp16).
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return "bfloat16", torch.bfloat16
        return "float32", torch.float32
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(table)}")
    return dtype, table[dtype]


def load_model(name: str, *, causal_only: bool = False, device: str | None = None,
               dtype: str = "auto") -> LoadedModel:
    """Load a model and tokenizer from local files only (a folder or the HF cache).

    causal_only refuses encoder-decoder models (perplexity needs a causal LM).
    Raises ModelLoadError naming what is missing when loading fails.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    dev = resolve_device(device)
    dtype_name, torch_dtype = _resolve_dtype(dtype, dev)
    hint = diagnose_model_path(name)
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name!r} offline: "
                             f"{hint or 'its config cannot be read'} ({_first_line(exc)})") from exc
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if seq2seq and causal_only:
        raise ConfigError(f"model {name!r} is an encoder-decoder ({config.model_type}); "
                          f"perplexity needs a causal LM")
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r} offline: "
                             f"{hint or 'tokenizer files are missing or unreadable'} "
                             f"({_first_line(exc)})") from exc
    try:
        model = auto.from_pretrained(name, local_files_only=True, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the weights of {name!r} offline: "
                             f"{hint or 'weights are missing or unreadable'} "
                             f"({_first_line(exc)})") from exc
    model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, seq2seq=seq2seq, device=dev,
                       dtype=dtype_name, name=name)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text (e.g. BOS; CLS/SEP; </s>)."""
    probe = "yes"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


def yes_token_ids(tokenizer) -> list[int]:
    """Ids of the single-token spellings of "yes"; ConfigError if the vocabulary has none."""
    ids: list[int] = []
    for word in YES_SPELLINGS:
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(toks) == 1 and toks[0] not in ids:
            ids.append(int(toks[0]))
    if not ids:
        raise ConfigError(f"the tokenizer {type(tokenizer).__name__} has no single token for "
                          f"'yes'; Ask-LLM needs one to read P(yes)")
    return ids


def encode_prompts(tokenizer, examples: Sequence[str], max_length: int, *,
                   prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = ()) -> list[list[int]]:
    """Token ids of each example's Ask-LLM prompt, at most max_length tokens in all.

    When a prompt is too long the example is cut at a token boundary (its head kept) and the
    tokens of the closing "###" and the question are kept whole. `prefix_ids` / `suffix_ids`
    are special tokens to wrap every prompt in (BOS, </s>...).
    """
    prompts = [build_prompt(e) for e in examples]
    wrap = len(prefix_ids) + len(suffix_ids)
    all_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    long = [i for i, ids in enumerate(all_ids) if len(ids) + wrap > max_length]
    offsets: dict[int, Any] = {}
    if long and getattr(tokenizer, "is_fast", False):  # offsets only where a cut is needed
        enc = tokenizer([prompts[i] for i in long], add_special_tokens=False,
                        return_offsets_mapping=True)
        offsets = dict(zip(long, enc["offset_mapping"]))
    out: list[list[int]] = []
    for i, ids in enumerate(all_ids):
        ids = list(ids)
        if len(ids) + wrap > max_length:
            tail_start_char = len(PROMPT_PREFIX) + len(examples[i])
            if i in offsets:
                offs = offsets[i]
                # first token that reaches into the suffix (closing ### and question)
                t = next((j for j, (a, b) in enumerate(offs) if b > tail_start_char), len(ids))
            else:
                t = len(ids) - len(tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
            tail = ids[t:]
            room = max_length - wrap - len(tail)
            if room < 1:
                raise ConfigError(f"max length {max_length} is too small for the Ask-LLM prompt "
                                  f"(the question alone takes {len(tail) + wrap} tokens)")
            ids = ids[:min(room, t)] + tail
        out.append(list(prefix_ids) + ids + list(suffix_ids))
    return out


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of at most batch_size, longest first, so padding stays small."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, left: bool):
    """(ids, attention_mask) int64 arrays, padded to the longest sequence."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s):] = s
            mask[i, width - len(s):] = 1
        else:
            ids[i, :len(s)] = s
            mask[i, :len(s)] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if v is not None:
            return int(v)
    return 0


class AskLLMScorer:
    """Ask-LLM with a local model: `score(texts)` -> float32 P("yes") per text."""

    def __init__(self, model: str | LoadedModel, *, batch_size: int = 16, max_length: int = 512,
                 device: str | None = None, dtype: str = "auto") -> None:
        if max_length < 8:
            raise ConfigError(f"max length must be >= 8 tokens, got {max_length}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        tok = self.lm.tokenizer
        self.yes_ids = yes_token_ids(tok)
        pre, post = special_tokens(tok)
        # A causal LM answers right after the prompt: trailing specials (SEP, EOS) would move
        # the answer position, so only leading ones (BOS) are kept.
        self._prefix, self._suffix = (pre, post) if self.lm.seq2seq else (pre, [])
        self._pad = pad_id_of(tok)
        fwd = inspect.signature(self.lm.model.forward).parameters
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in fwd), None)
        self._pos_ids = "position_ids" in fwd
        if not self.lm.seq2seq:
            start = None
        else:
            start = getattr(self.lm.model.config, "decoder_start_token_id", None)
            if start is None:
                start = self._pad
        self._decoder_start = start

    def params(self) -> dict:
        """Scorer parameters recorded in the manifest."""
        return {"backend": "local", "model": str(self.lm.name), "seq2seq": self.lm.seq2seq,
                "max_length": self.max_length, "dtype": self.lm.dtype,
                "yes_token_ids": self.yes_ids, "prompt": "arXiv:2402.09668"}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.lm.tokenizer, texts, self.max_length,
                              prefix_ids=self._prefix, suffix_ids=self._suffix)

    def answer_logits(self, ids: np.ndarray, mask: np.ndarray):
        """Next-token logits at the answer position for a padded batch: torch (B, V)."""
        import torch
        m = self.lm.model
        dev = self.lm.device
        t_ids = torch.from_numpy(ids).to(dev)
        t_mask = torch.from_numpy(mask).to(dev)
        if self.lm.seq2seq:
            dec = torch.full((len(ids), 1), int(self._decoder_start), dtype=torch.long, device=dev)
            return m(input_ids=t_ids, attention_mask=t_mask, decoder_input_ids=dec).logits[:, -1, :]
        kw: dict[str, Any] = {"input_ids": t_ids, "attention_mask": t_mask}
        if self._pos_ids:  # left padding: positions count real tokens only
            kw["position_ids"] = (t_mask.cumsum(-1) - 1).clamp(min=0)
        if self._keep_kw:
            kw[self._keep_kw] = 1
        return m(**kw).logits[:, -1, :]

    def score_encoded(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        import torch
        out = np.empty(len(encoded), dtype=np.float32)
        with torch.inference_mode():
            for batch in length_batches([len(e) for e in encoded], self.batch_size):
                ids, mask = pad_batch([encoded[i] for i in batch], self._pad,
                                      left=not self.lm.seq2seq)
                logits = self.answer_logits(ids, mask).float()
                probs = torch.softmax(logits, dim=-1)[:, self.yes_ids].sum(-1)
                out[batch] = probs.cpu().numpy()
        return out

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P("yes") for every text, float32, in input order."""
        if len(texts) == 0:
            return np.empty(0, dtype=np.float32)
        return self.score_encoded(self.encode(texts))
