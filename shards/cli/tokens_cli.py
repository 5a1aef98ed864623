"""`croupier shards tokens DATASET`: add per-sample token counts to a built dataset's sidecar.

    croupier shards tokens DATASET --tokenizer NAME_OR_PATH [--text-field text]
    croupier shards tokens DATASET --token-field tokens [--tokenizer NAME_OR_PATH]

Counts come from tokenizing the text column (the manifest's text field by default) with a
Hugging Face tokenizer that loads offline, or from the lengths of an integer token column.
They are written atomically (array, then manifest) and change no fingerprint: the sampler's
sequence for the dataset stays the same. `croupier shards inspect` then shows tokens per
cluster. A dataset built with `shards build --tokenizer` has them already.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="add per-sample token counts to a dataset's sidecar",
                       description="Count the tokens of every sample and store the counts in the cluster sidecar.")
    p.add_argument("dataset", metavar="DIR", help="dataset folder (index.json + croupier/ sidecar)")
    p.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                   help="Hugging Face tokenizer, a local folder or already cached (never downloaded); "
                        "needed to count a text field")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-field", default=None, help="tokenize this text column (default: the manifest's)")
    src.add_argument("--token-field", default=None, help="count the ids of this integer token column instead")
    p.add_argument("--chunk", type=int, default=1024, help="samples read per batch (default 1024)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_tokens)


def run_tokens(args: argparse.Namespace) -> int:
    from croupier.shards.build.token_counts import add_token_counts

    info = add_token_counts(args.dataset, tokenizer=args.tokenizer, text_field=args.text_field,
                            token_field=args.token_field, chunk=args.chunk, progress=not args.quiet)
    print(f"{info['total']} tokens in {info['length']} samples (from the {info['from']} {info['field']!r}) "
          f"stored in {args.dataset}/croupier/")
    return 0
