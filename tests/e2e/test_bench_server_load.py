"""bench_server_load's loads run end to end, against croupier's server and the transport floor."""

from __future__ import annotations

import pytest

from bench.benchmarks import bench_server_load as bsl


@pytest.mark.parametrize("floor", [False, True], ids=["croupier", "floor"])
def test_a_small_load_delivers_every_step_without_reopening(floor: bool) -> None:
    r = bsl.one_load(6, 8, 10.0, 2, floor=floor)
    assert r["retries"] == {}  # no stream re-opened, no failed acknowledgement
    assert r["batch"] == 6 * bsl.PER_RANK
    assert r["cpu_per_m"] > 0.0
    assert r["threads"] >= 1
