"""The tokens stage of an --adopt build with --tokenizer: the adopted dataset's token counts.

A build from inputs counts the tokens it writes (the write stage); an adopted dataset is
counted here, from its token column when it has one (`--token-field`), else by tokenizing
its text. The counts wait in the work folder until the sidecar is written; the state
records where they came from, for the manifest.
"""

from __future__ import annotations

from croupier.format.atomic import write_npy_atomic
from croupier.shards.build import work_files
from croupier.shards.build.context import BuildContext

SOURCE_KEY = "token_source"
"""State entry: {"field": ..., "from": "token column" | "text"}, what the counts were read from."""


class CountTokens:
    """Token count of every sample of the adopted dataset, into `work/token_counts.npy`."""

    name = "tokens"

    def run(self, ctx: BuildContext) -> int:
        from croupier.shards.build.token_counts import check_token_column, count_source

        cfg = ctx.cfg
        source = ctx.source()
        field = cfg.token_field if cfg.token_field in source.columns else None
        if field is not None:
            encodings = source.index.shards[0].info.get("column_encodings", [])
            check_token_column(dict(zip(source.columns, encodings)), field, f"dataset {cfg.adopt!r}")
        counts = count_source(source, tokenizer=None if field else ctx.tokenizer(),
                              text_field=None if field else cfg.text_field, token_field=field)
        write_npy_atomic(ctx.work / work_files.TOKEN_COUNTS, counts)
        ctx.state[SOURCE_KEY] = ({"field": field, "from": "token column"} if field
                                 else {"field": cfg.text_field, "from": "text"})
        return 0
