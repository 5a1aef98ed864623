"""How a build reports progress on stderr: one bar per stage and short lines, both off with --quiet."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """Progress bars (tqdm) and `croupier shards: ...` lines on stderr, unless disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, desc: str, total: int, initial: int = 0) -> Any:
        """A bar counting documents; `total=0` for a stage that does not know its total.

        Disabled, it is a `_NoBar`: even a disabled tqdm bar starts tqdm's monitor thread,
        which then runs for the rest of the process.
        """
        if not self.enabled:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=f"{desc:>7}", unit="doc", unit_scale=True,
                    file=sys.stderr, mininterval=0.5, smoothing=0.1)

    def log(self, msg: str) -> None:
        if self.enabled:
            print(f"croupier shards: {msg}", file=sys.stderr, flush=True)

    @staticmethod
    def warn(msg: str) -> None:
        """A warning is printed whatever --quiet says."""
        print(f"croupier shards: warning: {msg}", file=sys.stderr, flush=True)


class _NoBar:
    """What `Progress.bar` returns with progress off: counts nothing, shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
