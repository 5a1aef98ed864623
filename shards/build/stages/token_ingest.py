"""The ingest stage of a build from token corpora (both engines' plan; it runs on the driver).

The documents of the Megatron / OLMo-style inputs (`croupier.shards.build.token_corpus`) are
copied, in input order, into the work folder's `TokenStore` (int32 ids end to end, plus
offsets): the write stage reads them from there in the cluster order. One unit: a build
killed inside it copies again.
"""

from __future__ import annotations

import time

from croupier.errors import DatasetError
from croupier.shards.build.context import BuildContext

CORPORA_KEY = "token_corpora"
"""State entry: the description of every token input (kind, path, dtype, documents)."""


class TokenIngest:
    """Every document of the token inputs into the work folder's `TokenStore`."""

    name = "ingest"

    def run(self, ctx: BuildContext) -> int:
        from croupier.shards.build.token_corpus import ingest_corpora

        cfg, st = ctx.cfg, ctx.state
        t0 = time.perf_counter()
        ctx.work.mkdir(parents=True, exist_ok=True)
        n, described = ingest_corpora(list(cfg.inputs), ctx.work, cfg.eos_id, cfg.token_dtype)
        if n == 0:
            raise DatasetError("the token inputs hold no documents")
        st.update(parts=[], skipped=0, bad_examples=[], n=n)
        st[CORPORA_KEY] = described
        ctx.progress.log(f"{n} documents from {len(described)} token corpora")
        ctx.timed(self.name, t0, n)
        return 0
