"""The ingest stage: the inputs streamed into text parts, or the size of an adopted dataset.

`IngestInputs` (the local engine) reads the inputs in order with one `InputReader` and
closes a part every `part_docs` documents; each closed part is committed with the position
after its last record, so a resumed ingest skips what the state holds without parsing it.
`AdoptDataset` stands in for ingest with --adopt: the documents are the dataset's samples.
`finish_ingest` is what every engine does once its parts are written.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from croupier.errors import DatasetError
from croupier.shards.build import work_files
from croupier.shards.build.context import BuildContext

MAX_BAD_EXAMPLES = 5


def finish_ingest(ctx: BuildContext) -> int:
    """Report the skipped records, refuse inputs without documents, set the state's `n`."""
    st = ctx.state
    n = sum(p["docs"] for p in st["parts"])
    if st["skipped"]:
        ctx.progress.log(f"skipped {st['skipped']} bad records, e.g. " + "; ".join(st["bad_examples"][:3]))
    if n == 0:
        paths = ctx.paths
        shutil.rmtree(paths.side, ignore_errors=True)
        if paths.out.exists() and not any(paths.out.iterdir()):
            paths.out.rmdir()
        raise DatasetError("the inputs hold no documents" +
                           (f" ({st['skipped']} bad records skipped)" if st["skipped"] else ""))
    st["n"] = n
    return n


class IngestInputs:
    """The local engine's ingest: one reader over all inputs, a part every `part_docs` documents."""

    name = "ingest"

    def run(self, ctx: BuildContext) -> int:
        from croupier.shards.build.inputs import InputReader
        from croupier.shards.build.textstore import PartWriter

        cfg, st = ctx.cfg, ctx.state
        parts: list[dict[str, Any]] = st.setdefault("parts", [])
        start = parts[-1]["end"] if parts else 0
        skipped0 = int(st.get("skipped", 0))
        reader = InputReader(cfg.inputs, cfg.text_field, cfg.keep_fields, cfg.skip_bad)
        folder = ctx.work / work_files.PARTS
        have = sum(p["docs"] for p in parts)
        t0 = time.perf_counter()
        bar = ctx.progress.bar("ingest", total=0, initial=have)
        pw: PartWriter | None = None

        def close_part(writer: PartWriter, end: int) -> None:
            info = writer.close()
            info["end"] = end
            parts.append(info)
            self._count_bad(ctx, skipped0, reader)
            ctx.commit(self.name, len(parts) - 1)

        try:
            for pos, text, kept in reader.records(start=start):
                if pw is None:
                    pw = PartWriter(folder, len(parts), cfg.keep_fields)
                pw.add(text, kept)
                bar.update(1)
                if pw.n >= cfg.part_docs:
                    close_part(pw, pos + 1)
                    pw = None
            if pw is not None:
                close_part(pw, reader.end)
                pw = None
        finally:
            if pw is not None:
                pw.abort()
            bar.close()
        self._count_bad(ctx, skipped0, reader)
        n = finish_ingest(ctx)
        ctx.timed(self.name, t0, n - have)
        return len(parts)

    @staticmethod
    def _count_bad(ctx: BuildContext, skipped0: int, reader: Any) -> None:
        """The records skipped so far and the first few of them, into the state."""
        st = ctx.state
        st["skipped"] = skipped0 + reader.stats.skipped
        st.setdefault("bad_examples", []).extend(reader.stats.examples)
        del st["bad_examples"][MAX_BAD_EXAMPLES:]
        reader.stats.examples.clear()


class AdoptDataset:
    """Ingest with --adopt: nothing to copy, the documents are the adopted dataset's samples."""

    name = "ingest"

    def run(self, ctx: BuildContext) -> None:
        ctx.state["n"] = len(ctx.source())
        return None
