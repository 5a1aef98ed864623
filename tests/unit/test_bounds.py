"""`croupier.bounds` states the limits the code has: they must agree with the code they describe,
and the mixture file reader applies them (int64 sums, UTF-8 text) as one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from croupier import bounds
from croupier.errors import ConfigError
from croupier.grpc_options import MAX_MESSAGE_BYTES
from croupier.mixture import load_mix, parse_mix
from croupier.server.job.flow import MAX_IDS_PER_MESSAGE
from croupier.values import parse_log_level, parse_size, parse_weights


def test_the_stated_limits_are_the_code_s() -> None:
    assert bounds.MAX_IDS_PER_MESSAGE == MAX_IDS_PER_MESSAGE  # the server's packing bound
    # A world-1 slice of the largest served batch, beside the ids already packed, fits one message.
    worst = (bounds.MAX_IDS_PER_MESSAGE + bounds.MAX_RANK_BATCH) * 8 + bounds.MESSAGE_OVERHEAD_BYTES
    assert worst <= MAX_MESSAGE_BYTES < worst + 8
    assert bounds.MAX_RANK_BATCH == 1_040_384 and bounds.MAX_GLOBAL_BATCH == 134_217_728


def test_cluster_sizes_and_their_total_fit_int64() -> None:
    assert bounds.cluster_sizes("s", [bounds.INT64_MAX]) == [bounds.INT64_MAX]
    with pytest.raises(ConfigError, match=r"^s: the clusters' total size must fit a 64-bit integer "
                                          r"\(9223372036854775807\); clusters 0\.\.1 already sum to 9223372036854775808$"):
        bounds.cluster_sizes("s", [2**62, 2**62])
    with pytest.raises(ConfigError, match="^s: cluster sizes must be >= 1; cluster 2 has size 0$"):
        bounds.cluster_sizes("s", [3, 4, 0])


@pytest.mark.parametrize(("text", "ok"), [("127.0.0.1:80", True), ("[::1]:65535", True), ("dns:///h:1", True),
                                          ("unix:/tmp/s", True), ("h:0", False), ("h:65536", False), ("h", False),
                                          (":80", False), ("h:80:1", False), ("h:8x", False)])
def test_addresses(text: str, ok: bool) -> None:
    if ok:
        assert bounds.address("--server", text) == text
    else:
        with pytest.raises(ConfigError, match="--server"):
            bounds.address("--server", text)


def test_a_mixture_file_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "mix.toml"
    path.write_bytes(b'[sources.a]\ncluster_sizes = [10, 5]\nweight = 1.0\npolicy = "uniform"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=f"^mixture file '{path}' is not UTF-8 text \\(TOML is\\): byte 73 is "
                                          r"b'\\xe9'$"):
        load_mix(path)


def test_mixture_cluster_sizes_past_int64_are_refused() -> None:
    one = '[sources.a]\ncluster_sizes = [9223372036854775807, 10]\nweight = 1.0\npolicy = "uniform"\n'
    with pytest.raises(ConfigError, match="source 'a': cluster_sizes: the clusters' total size must fit"):
        parse_mix(one, "m.toml")
    two = "".join(f'[sources.{n}]\ncluster_sizes = [{2**62}]\nweight = 1.0\npolicy = "uniform"\n' for n in "ab")
    with pytest.raises(ConfigError, match="^mixture file m.toml: every source's cluster_sizes together: the "
                                          "clusters' total size must fit"):
        parse_mix(two, "m.toml")
    clip = '[sources.a]\ncluster_sizes = [10]\nweight = 1.0\npolicy = "clusterclip"\nclip = 9223372036854775808\n'
    with pytest.raises(ConfigError, match=r"clip must be an integer in \[1, 9223372036854775807\], "
                                          "got 9223372036854775808"):
        parse_mix(clip, "m.toml")


def test_values_as_written_stay_inside_their_limits() -> None:
    assert parse_size("16MiB") == 16 << 20
    with pytest.raises(ConfigError, match="is over 9223372036854775807 bytes"):
        parse_size("9223372036854775808")
    assert parse_weights("1,2.5") == (1.0, 2.5)
    with pytest.raises(ConfigError, match="^weights must be finite numbers, got nan$"):
        parse_weights("1,nan")
    assert parse_log_level("debug") == "DEBUG"
    with pytest.raises(ConfigError, match="--log-level must be one of"):
        parse_log_level("LOUD")
