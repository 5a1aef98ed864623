"""The output folder of a build: start afresh, resume an unfinished build, or refuse.

A build resumes only when the folder holds the work of an unfinished build with the same
resume key: the settings (`BuildConfig.key`), the input files (path, size, mtime) or the
adopted index's fingerprint, and the engine. Anything else is refused with the reason and
`--overwrite` as the way out: a finished dataset, a foreign MDS dataset, another build's
unfinished work, a folder of unrelated files (never deleted, even with --overwrite). An
`--adopt` build only ever replaces its own sidecar, never the shards. The state is small,
versioned and strict on load: an unreadable or other-version state is refused too.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from croupier.errors import DatasetError
from croupier.format.fingerprint import index_fingerprint
from croupier.format.mds_index import INDEX_BASENAME
from croupier.format.sidecar_layout import MANIFEST, SIDECAR_DIR
from croupier.shards.build.context import BuildContext

STATE_VERSION = 1


def resume_key(ctx: BuildContext, engine: dict[str, Any]) -> dict[str, Any]:
    """What a resumed build must share with the interrupted one; `engine`: the engine's own entries."""
    from croupier.shards.build.inputs import input_signature

    key = ctx.cfg.key()
    if ctx.cfg.adopt is None:
        key["input_files"] = input_signature(ctx.cfg.inputs)
    else:
        key["adopt_index"] = index_fingerprint(ctx.source().index_bytes)
    return {**key, **engine}


def open_workspace(ctx: BuildContext, key: dict[str, Any]) -> bool:
    """Make the output folder ready and load or start the state; returns True when resuming."""
    cfg, paths = ctx.cfg, ctx.paths
    out = paths.out
    if out.exists() and not out.is_dir():
        raise DatasetError(f"output {str(out)!r} exists and is not a folder")
    finished = (paths.side / MANIFEST).exists()
    has_state = paths.state.exists()
    if cfg.adopt is not None:
        if _resumable_adopt(ctx, key, finished, has_state):
            return True
    else:
        has_index = (out / INDEX_BASENAME).exists()
        if has_state and not finished:
            state = read_state(ctx)
            if state.get("key") == key and not cfg.overwrite:
                ctx.state = state
                return True
            if not cfg.overwrite and has_progress(state):
                raise DatasetError(
                    f"output folder {str(out)!r} holds an unfinished build with other settings or changed "
                    "inputs; pass --overwrite to discard it and start over")
            shutil.rmtree(out)
        elif finished or has_index:
            what = "a finished croupier dataset" if finished else "an MDS dataset (index.json)"
            if not cfg.overwrite:
                raise DatasetError(f"output folder {str(out)!r} already holds {what}; "
                                   "pass --overwrite to replace it")
            shutil.rmtree(out)
        elif out.exists() and any(out.iterdir()):
            raise DatasetError(f"output folder {str(out)!r} is not empty and holds no dataset; "
                               "choose an empty or new folder")
    ctx.state = {"version": STATE_VERSION, "key": key}
    paths.work.mkdir(parents=True, exist_ok=True)
    ctx.save()
    return False


def _resumable_adopt(ctx: BuildContext, key: dict[str, Any], finished: bool, has_state: bool) -> bool:
    """An --adopt build's folder: True to resume (state loaded); else its old sidecar is cleared."""
    cfg, paths = ctx.cfg, ctx.paths
    out = paths.out
    src_index = ctx.source().index_bytes
    if not paths.in_place and (out / INDEX_BASENAME).exists() and (out / INDEX_BASENAME).read_bytes() != src_index:
        if not cfg.overwrite:
            raise DatasetError(f"output folder {str(out)!r} already holds another dataset (index.json); "
                               "pass --overwrite to replace it")
        (out / INDEX_BASENAME).unlink()
        shutil.rmtree(paths.side, ignore_errors=True)
    elif not paths.in_place and out.exists() and not (out / INDEX_BASENAME).exists() \
            and any(p.name != SIDECAR_DIR for p in out.iterdir()):
        raise DatasetError(f"output folder {str(out)!r} is not empty and holds no dataset; "
                           "choose an empty or new folder")
    if has_state and not finished:
        state = read_state(ctx)
        if state.get("key") == key and not cfg.overwrite:
            ctx.state = state
            return True
        if not cfg.overwrite and has_progress(state):
            raise DatasetError(f"{str(paths.side)!r} holds an unfinished sidecar build with other settings; "
                               "pass --overwrite to start over")
    elif finished and not cfg.overwrite:
        raise DatasetError(f"{str(out)!r} already has a croupier sidecar; pass --overwrite to replace it "
                           "(the shards are never touched)")
    shutil.rmtree(paths.side, ignore_errors=True)  # only our sidecar, never the shards
    return False


def read_state(ctx: BuildContext) -> dict[str, Any]:
    """The saved build state; refuses one that cannot be read or has another version."""
    path = ctx.paths.state
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"build state {str(path)!r} is unreadable ({exc}); "
                           "pass --overwrite to start over") from exc
    if state.get("version") != STATE_VERSION:
        raise DatasetError(f"build state {str(path)!r} has version {state.get('version')!r}; "
                           "pass --overwrite to start over")
    return state


def has_progress(state: dict[str, Any]) -> bool:
    """Whether an unfinished build got far enough to be worth keeping (else it is replaced)."""
    return bool(state.get("parts") or state.get("embed_chunks"))
