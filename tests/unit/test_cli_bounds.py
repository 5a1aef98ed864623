"""Bounds at the door: every numeric flag of the croupier commands, given a random value past
its limit, is a one-line refusal with exit code 2 before anything is connected, started or
written (property-based, in-process: `croupier.cli.main` with stderr captured).

Each limit is the one the code really has (`croupier.bounds`): int64 steps, int32 worlds,
the step memory cap, the gRPC message limit, TCP ports, finite positive durations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from croupier import bounds
from croupier.cli import main
from workers.harness import free_port

I64 = bounds.INT64_MAX
I32 = bounds.INT32_MAX
YEAR = bounds.MAX_DURATION_S

SERVE = ["serve", "--cluster-sizes", "30,20", "--clip", "2", "--global-batch", "4"]
SIMULATE = ["simulate", "--cluster-sizes", "30,20", "--clip", "2", "--global-batch", "4", "--steps", "3"]
NOWHERE = "127.0.0.1:{port}"  # a port nobody serves: a command that connected would wait, not refuse

INT_FLAGS = [
    # (command line, flag, lowest valid, highest valid)
    (SERVE, "--global-batch", 1, bounds.MAX_RANK_BATCH),
    (SERVE, "--seed", 0, I64),
    (SERVE, "--port", 0, 65535),
    (SERVE, "--metrics-port", 0, 65535),
    (SERVE, "--max-lag", 1, I32),
    (SERVE, "--lookahead", 1, I32),
    (SERVE, "--checkpoint-every", 0, I64),
    (SERVE, "--keep-checkpoints", 1, I32),
    (SERVE, "--max-workers", 1, 1024),
    (SERVE, "--streams-per-peer", 1, I32),
    (SERVE, "--calls-per-peer", 1, I32),
    (SERVE, "--adapt-every", 1, I64),
    (SERVE, "--budget-steps", 1, I64),
    (SERVE, "--block-size", 1, I64),
    (SERVE, "--clip", 1, I64),
    (SIMULATE, "--global-batch", 1, bounds.MAX_GLOBAL_BATCH),
    (SIMULATE, "--seed", 0, I64),
    (SIMULATE, "--block-size", 1, I64),
    (SIMULATE, "--clip", 1, I64),
    (["status", "--server", NOWHERE], "--top", 0, I32),
    (["checkpoint", "--server", NOWHERE], "--step", bounds.INT64_MIN, I64),
    (["update", "--server", NOWHERE, "--clip", "2"], "--step", bounds.INT64_MIN, I64),
    (["update", "--server", NOWHERE, "--step", "5"], "--clip", bounds.INT64_MIN, I64),
    (["update", "--server", NOWHERE, "--step", "5"], "--global-tokens", 0, 2**40 - 1),
    (["client", "dump", "--server", NOWHERE], "--steps", 1, I64),
    (["client", "dump", "--server", NOWHERE], "--start-step", 0, I64 - 4),
    (["client", "dump", "--server", NOWHERE], "--world", 1, I32),
    (["client", "dump", "--server", NOWHERE, "--world", "8"], "--rank", 0, 7),
    (["client", "dump", "--server", NOWHERE], "--max-ids", 0, I64),
    (["agent", "--server", NOWHERE, "--runtime-dir", "{tmp}/run", "--cache-dir", "{tmp}/cache"], "--local-ranks",
     0, I32),
]

FLOAT_FLAGS = [
    # (command line, flag, 0 allowed, highest valid)
    (SERVE, "--grace", True, YEAR),
    (SERVE, "--rank-timeout", False, YEAR),
    (["status", "--server", NOWHERE], "--timeout", False, 24 * 3600.0),
    (["checkpoint", "--server", NOWHERE, "--step", "1"], "--timeout", False, 24 * 3600.0),
    (["client", "dump", "--server", NOWHERE], "--connect-timeout", False, 24 * 3600.0),
    (["agent", "--server", NOWHERE, "--runtime-dir", "{tmp}/run", "--cache-dir", "{tmp}/cache"],
     "--exit-when-idle", True, YEAR),
]

HUGE = 10**40


def outside(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(min_value=-HUGE, max_value=low - 1), st.integers(min_value=high + 1, max_value=HUGE))


def bad_seconds(zero_ok: bool, high: float) -> st.SearchStrategy[float]:
    below = st.floats(max_value=-1e-9, allow_nan=False) if zero_ok else st.floats(max_value=0.0, allow_nan=False)
    return st.one_of(below, st.floats(min_value=high * 1.0001, allow_nan=False), st.just(math.nan),
                     st.just(math.inf))


def command(line: list[str], tmp: Path, port: int) -> list[str]:
    out = [x.format(port=port, tmp=tmp) for x in line]
    if out[0] == "serve" and "--state-dir" not in out:
        out += ["--state-dir", str(tmp / "state")]
    return out


def refused(argv: list[str], capsys, tmp: Path) -> str:
    """Runs the command; asserts a one-line refusal, exit 2, nothing written; returns the line."""
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.endswith("\n"), (argv, err)
    assert err.startswith(f"croupier {argv[0]}: error: ") and "Traceback" not in err, (argv, err)
    assert not (tmp / "state").exists() and not (tmp / "run").exists(), argv  # a refused start writes nothing
    return err


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize(("line", "flag", "low", "high"), INT_FLAGS, ids=[f"{x[0][0]}{x[1]}" for x in INT_FLAGS])
@SETTINGS
@given(data=st.data())
def test_an_integer_flag_past_its_limit_is_one_line(line, flag, low, high, data, tmp_path, capsys) -> None:
    value = data.draw(outside(low, high))
    err = refused([*command(line, tmp_path, free_port()), f"{flag}={value}"], capsys, tmp_path)
    assert flag.lstrip("-").replace("-", " ") in err.replace("-", " ") or str(value) in err, err


@pytest.mark.parametrize(("line", "flag", "zero_ok", "high"), FLOAT_FLAGS, ids=[f"{x[0][0]}{x[1]}" for x in FLOAT_FLAGS])
@SETTINGS
@given(data=st.data())
def test_a_duration_past_its_limit_is_one_line(line, flag, zero_ok, high, data, tmp_path, capsys) -> None:
    value = data.draw(bad_seconds(zero_ok, high))
    err = refused([*command(line, tmp_path, free_port()), f"{flag}={value!r}"], capsys, tmp_path)
    assert flag in err, err


@SETTINGS
@given(sizes=st.lists(st.integers(min_value=1, max_value=HUGE), min_size=1, max_size=5).filter(
    lambda xs: sum(xs) > I64))
def test_cluster_sizes_whose_total_overflows_int64_are_one_line(sizes, tmp_path, capsys) -> None:
    text = ",".join(map(str, sizes))
    for line in (["serve", "--clip", "2", "--global-batch", "4"], ["simulate", "--clip", "2", "--global-batch", "4",
                                                                   "--steps", "1"]):
        argv = [*line, f"--cluster-sizes={text}"] + (["--state-dir", str(tmp_path / "state")] if line[0] == "serve"
                                                     else [])
        err = refused(argv, capsys, tmp_path)
        assert ("--cluster-sizes: cluster sizes must be <=" in err
                or "--cluster-sizes: the clusters' total size must fit a 64-bit integer" in err), err


@SETTINGS
@given(weight=st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.just(math.nan), st.just(math.inf)))
def test_a_source_weight_that_is_not_finite_and_positive_is_one_line(weight, tmp_path, capsys) -> None:
    argv = ["update", "--server", f"127.0.0.1:{free_port()}", "--step", "5", "--source", "a", f"--weight={weight!r}"]
    assert "--weight must be a finite number >= 0" in refused(argv, capsys, tmp_path)


@pytest.mark.parametrize(("argv", "words"), [
    (SERVE + ["--global-batch", str(10**18)], "--global-batch 1000000000000000000 is over 134,217,728: a step's ids"),
    (SERVE + ["--global-batch", "4000000"], "--global-batch 4000000 is over 1,040,384, the largest per-rank batch "
                                            "whose slice fits the 16 MiB gRPC message limit"),
    (SERVE + ["--cluster-sizes", f"{2**62},{2**62}"], "the clusters' total size must fit a 64-bit integer"),
    (SERVE + ["--cluster-sizes", str(10**19)], f"cluster sizes must be <= {I64} (a 64-bit integer); cluster 0 has "
                                               f"size {10**19}"),
    (SERVE + ["--port", "70000"], "--port must be in [0, 65535] (0 picks a free port), got 70000"),
    (SERVE + ["--port", "-1"], "--port must be in [0, 65535] (0 picks a free port), got -1"),
    (SERVE + ["--grace", "-1"], "--grace must be a finite number of seconds >= 0"),
    (SERVE + ["--lease-ttl", "0"], "--lease-ttl must be in [1, 300] seconds, got 0.0"),
    (SERVE + ["--lease-ttl", "nan"], "--lease-ttl must be in [1, 300] seconds, got nan"),
    (SERVE + ["--state-cache", "{tmp}/cache"], "--state-cache is for a --state-dir on an object store (s3://...)"),
    (SERVE + ["--state-dir", "gs://bucket/job"], "--state-dir on an object store must be s3://BUCKET[/PREFIX], "
                                                 "got 'gs://bucket/job'"),
    (SERVE + ["--global-batch", "-1"], "--global-batch must be >= 1, got -1"),
    (SERVE + ["--max-workers", "0"], "--max-workers must be in [1, 1024] (threads), got 0"),
    (SERVE + ["--streams-per-peer", "0"], "--streams-per-peer must be in [1, 2147483647] (streams), got 0"),
    (SERVE + ["--log-level", "LOUD"], "--log-level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (SIMULATE + ["--global-batch", str(10**18)], "--global-batch 1000000000000000000 is over 134,217,728"),
    (["update", "--server", "127.0.0.1:1", "--step", "5", "--clip", str(2**63)],
     f"--clip must be in [{-(2**63)}, {I64}] (a 64-bit integer), got {2**63}"),
    (["update", "--server", "127.0.0.1:1", "--step", str(10**20), "--clip", "2"],
     f"--step must be in [{-(2**63)}, {I64}] (a 64-bit integer), got {10**20}"),
    (["checkpoint", "--server", "127.0.0.1:1", "--step", str(2**63)], f"got {2**63}"),
    (["update", "--server", "127.0.0.1:1", "--step", "5", "--weights", "1,inf"], "weights must be finite numbers"),
    (["agent", "--server", "127.0.0.1:1", "--runtime-dir", "{tmp}/run", "--cache-dir", "{tmp}/cache",
      "--cache-limit", "99999999999999999999GiB"], "is over 9223372036854775807 bytes"),
    (["agent", "--server", "127.0.0.1:99999", "--runtime-dir", "{tmp}/run", "--cache-dir", "{tmp}/cache"],
     "the port must be in [1, 65535]"),
])
def test_the_issue_probes_are_refused_by_name(argv, words, tmp_path, capsys) -> None:
    err = refused(command(argv, tmp_path, 1), capsys, tmp_path)
    assert words in err, err
