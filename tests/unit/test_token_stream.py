"""The token stream: every step holds exactly G tokens (per its schedule), ranks' parts
partition it, the concatenation of steps is the document order's stream (tokens + EOS), and
the dealer's state resumes at the token."""

from __future__ import annotations

import numpy as np
import pytest

from croupier.errors import ConfigError, EndOfData, FingerprintMismatch
from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.token_stream import TokenDealer, TokenSchedule

SIZES = [400, 120, 30, 8]
COUNTS = np.random.default_rng(5).integers(0, 90, sum(SIZES))
CONFIG = PolicyConfig("clusterclip", clip=3, on_exhausted="random")


def dealer(schedule: str = "0:256", chunk: int = 7, seed: int = 2) -> TokenDealer:
    layout = ClusterLayout.from_sizes(SIZES)
    return TokenDealer(lambda: Sampler(layout, CONFIG, chunk, seed), [(0, COUNTS)], TokenSchedule.parse(schedule),
                       chunk)


def stream_of(steps) -> list[tuple[int, int]]:
    """(document, stream token index) of every token the steps cover, in order."""
    out = []
    for st in steps:
        sl = st.part(0, 1)
        for doc, (a, b) in zip(sl.ids.tolist(), sl.ranges()):
            out.extend((doc, i) for i in range(a, b))
    return out


def test_steps_hold_exactly_their_tokens_and_concatenate_to_the_document_stream() -> None:
    d = dealer("0:256,10:512,20:1024")
    steps = [d.next_step() for _ in range(30)]
    assert [s.tokens for s in steps] == [256] * 10 + [512] * 10 + [1024] * 10
    assert all(s.part(0, 1).tokens == s.tokens for s in steps)
    got = stream_of(steps)
    docs = Sampler(ClusterLayout.from_sizes(SIZES), CONFIG, 7, 2)
    want: list[tuple[int, int]] = []
    while len(want) < len(got):
        for doc in docs.next_batch().tolist():
            want.extend((doc, i) for i in range(int(COUNTS[doc]) + 1))
    assert got == want[:len(got)]
    assert TokenSchedule.parse("0:256,10:512,20:1024").offset(30) == len(got)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ranks_parts_partition_every_step_in_order(world: int) -> None:
    for st in [dealer().next_step() for _ in range(1)] + [dealer("0:1024").next_step()]:
        whole = stream_of([st])
        parts = []
        for r in range(world):
            sl = st.part(r, world)
            assert sl.tokens == st.tokens // world
            parts.extend((doc, i) for doc, (a, b) in zip(sl.ids.tolist(), sl.ranges()) for i in range(a, b))
        assert parts == whole


def test_the_state_resumes_at_the_token_at_every_step() -> None:
    ref = dealer()
    steps = [ref.next_step() for _ in range(40)]
    for k in (0, 1, 5, 17, 39):
        d = dealer()
        for _ in range(k):
            d.next_step()
        state = d.state()
        again = dealer()
        again.load_state(type(state).from_bytes(state.to_bytes()))
        rest = [again.next_step() for _ in range(40 - k)]
        assert stream_of(rest) == stream_of(steps[k:]), k
    with pytest.raises(FingerprintMismatch):
        dealer(seed=3).load_state(ref.state())
    assert dealer("0:256").fingerprint != dealer("0:512").fingerprint != dealer(chunk=8).fingerprint


def test_bad_schedules_and_uneven_splits_are_refused() -> None:
    for text in ("5:100", "0:100,0:200", "0:0", "x", "0:100,3"):
        with pytest.raises(ConfigError):
            TokenSchedule.parse(text)
    with pytest.raises(ConfigError, match="not divisible"):
        TokenSchedule.parse("0:256,9:300").check_world(8)
    with pytest.raises(ConfigError, match="not divisible"):
        dealer("0:250").next_step().part(0, 4)


def test_the_end_of_data_ends_the_stream() -> None:
    layout = ClusterLayout.from_sizes([5, 3])
    d = TokenDealer(lambda: Sampler(layout, PolicyConfig("clusterclip", clip=1), 2, 0), [(0, np.full(8, 9))],
                    TokenSchedule.constant(30), 2)
    assert [d.next_step().tokens for _ in range(2)] == [30, 30]  # 8 documents of 10 stream tokens: 80
    with pytest.raises(EndOfData):
        d.next_step()
