"""One reusable resume check for every stateful piece (sampler, server, client).

`assert_resume_exact(make, advance, save, load, k, tail)`: run a fresh object k steps,
save its state, run `tail` more steps recording outputs; then build a second fresh object,
load the saved state and run `tail` steps: the outputs must be identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def assert_resume_exact(make: Callable[[], T], advance: Callable[[T], Any], save: Callable[[T], Any],
                        load: Callable[[T, Any], None], k: int, tail: int) -> list[Any]:
    """Checks that restoring the state saved at step k replays the tail exactly; returns it."""
    first = make()
    for _ in range(k):
        advance(first)
    saved = save(first)
    expected = [advance(first) for _ in range(tail)]
    second = make()
    load(second, saved)
    got = [advance(second) for _ in range(tail)]
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(expected, got)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"step {k + i} differs after resume"
    return expected
