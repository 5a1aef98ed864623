"""The limits the code really has, checked where a value comes in: one place for every bound.

Command-line flags and config values (mixture files) are checked here before anything is
started or written, so a value past a limit is a one-line `ConfigError` naming the rule, the
flag and the bad value, instead of a traceback or a misbehaviour later:

- int64: steps, clip thresholds, seeds and cluster sizes travel as int64 (numpy arrays, the
  proto's int64 fields); a cluster layout's offsets are int64 sums of its sizes, so the
  sizes' total must fit too.
- int32: world sizes, ranks and lookaheads travel as the proto's int32 fields.
- Memory: a step's global batch is materialized as int64 id arrays; a batch whose ids alone
  exceed `MAX_STEP_ID_BYTES` is refused at the door (`MAX_GLOBAL_BATCH`).
- The gRPC message: a rank's slice of a step travels whole in one message of at most
  `MAX_MESSAGE_BYTES` (8 bytes per id), sharing it with up to `MAX_IDS_PER_MESSAGE` ids of
  other steps (the server packs steps into one message until it holds that many). A rank of
  world 1 (a trainer, or `croupier client dump`) gets the whole global batch, and the
  server cannot know the world before ranks join, so `serve` refuses a global batch above
  `MAX_RANK_BATCH`, naming the limit and that largest batch.
- Ports are 1..65535 (0 where it means "pick one"); durations are finite and positive.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from croupier.errors import ConfigError
from croupier.grpc_options import MAX_MESSAGE_BYTES

__all__ = ["INT32_MAX", "INT64_MAX", "INT64_MIN", "MAX_DURATION_S", "MAX_GLOBAL_BATCH", "MAX_IDS_PER_MESSAGE",
           "MAX_RANK_BATCH", "MAX_STEP_ID_BYTES", "address", "cluster_sizes", "duration", "global_batch",
           "int_range", "int64", "port", "served_global_batch", "wire_int64"]

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
INT32_MAX = (1 << 31) - 1
ID_BYTES = 8
"""Bytes of one sample id (int64) in memory and on the wire (packed ids)."""
MAX_STEP_ID_BYTES = 1 << 30
"""The most memory one step's id arrays may take (1 GiB): the sampler builds a step's global
batch as int64 arrays, several at once while it shuffles and slices them."""
MAX_GLOBAL_BATCH = MAX_STEP_ID_BYTES // ID_BYTES
"""Largest global batch (134,217,728 samples): its ids fill MAX_STEP_ID_BYTES."""
MAX_IDS_PER_MESSAGE = 1 << 20
"""Sample ids the server packs into one stream message before it sends it (the server's
`flow.MAX_IDS_PER_MESSAGE`; a slice is never split, so one more slice may follow them)."""
MESSAGE_OVERHEAD_BYTES = 64 << 10
"""Room left in a message for everything but the ids (slice headers, steps, kinds)."""
MAX_RANK_BATCH = (MAX_MESSAGE_BYTES - MESSAGE_OVERHEAD_BYTES) // ID_BYTES - MAX_IDS_PER_MESSAGE
"""Largest per-rank batch whose slice fits the gRPC message limit beside the ids already
packed (1,040,384 samples at 16 MiB)."""
MAX_DURATION_S = 365 * 24 * 3600.0
"""Longest duration a flag takes (a year): a longer one is a typo, and timers overflow."""


def int_range(flag: str, value: int, low: int, high: int, rule: str = "") -> int:
    """`value` when low <= value <= high; else a ConfigError naming the flag, the range and `rule`."""
    if not low <= value <= high:
        why = f" ({rule})" if rule else ""
        raise ConfigError(f"{flag} must be in [{low}, {high}]{why}, got {value}")
    return value


def int64(flag: str, value: int, low: int = 0) -> int:
    """A value that travels as int64 (steps, clip thresholds, seeds), at least `low`."""
    return int_range(flag, value, low, INT64_MAX, "a 64-bit integer")


def wire_int64(flag: str, value: int) -> int:
    """A value a request carries as int64 for the server to judge: anything an int64 holds
    (the server refuses what its rules refuse, e.g. a negative step, by name)."""
    return int_range(flag, value, INT64_MIN, INT64_MAX, "a 64-bit integer")


def duration(flag: str, value: float, *, zero_ok: bool = False, high: float = MAX_DURATION_S) -> float:
    """A finite number of seconds > 0 (>= 0 when `zero_ok`, where 0 means off), at most `high`."""
    low_ok = value >= 0 if zero_ok else value > 0
    if not (math.isfinite(value) and low_ok and value <= high):
        low = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{flag} must be a finite number of seconds {low} and <= {high:g}, got {value}")
    return float(value)


def port(flag: str, value: int, *, zero: str | None = "picks a free port") -> int:
    """A TCP port: 1..65535, or 0 where it means something (`zero`: what; None: 0 is refused)."""
    low = 0 if zero else 1
    return int_range(flag, value, low, 65535, f"0 {zero}" if zero else "a TCP port")


def cluster_sizes(what: str, sizes: Iterable[int]) -> list[int]:
    """Cluster sizes >= 1 whose total fits int64 (a layout's offsets are their running sums)."""
    out = [int(s) for s in sizes]
    if not out:
        raise ConfigError(f"{what}: give at least one cluster size")
    total = 0
    for i, s in enumerate(out):
        if s < 1:
            raise ConfigError(f"{what}: cluster sizes must be >= 1; cluster {i} has size {s}")
        if s > INT64_MAX:
            raise ConfigError(f"{what}: cluster sizes must be <= {INT64_MAX} (a 64-bit integer); cluster {i} has "
                              f"size {s}")
        total += s
        if total > INT64_MAX:
            raise ConfigError(f"{what}: the clusters' total size must fit a 64-bit integer ({INT64_MAX}); "
                              f"clusters 0..{i} already sum to {total}")
    return out


def global_batch(flag: str, value: int) -> int:
    """A global batch whose ids fit the step memory limit (`MAX_GLOBAL_BATCH`)."""
    if value < 1:
        raise ConfigError(f"{flag} must be >= 1, got {value}")
    if value > MAX_GLOBAL_BATCH:
        raise ConfigError(f"{flag} {value} is over {MAX_GLOBAL_BATCH:,}: a step's ids (8 bytes each) may take at "
                          f"most {MAX_STEP_ID_BYTES >> 20} MiB of memory")
    return value


def served_global_batch(flag: str, value: int) -> int:
    """A global batch the server can deal: within memory, and a world-1 rank's slice (the whole
    batch) fits one gRPC message (`MAX_RANK_BATCH`)."""
    global_batch(flag, value)
    if value > MAX_RANK_BATCH:
        raise ConfigError(f"{flag} {value} is over {MAX_RANK_BATCH:,}, the largest per-rank batch whose slice fits "
                          f"the {MAX_MESSAGE_BYTES >> 20} MiB gRPC message limit (a rank of world 1, e.g. "
                          "`croupier client dump`, gets the whole batch)")
    return value


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.\-]+)):(?P<port>[0-9]{1,5})$")
_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
"""gRPC target schemes taken as they are (gRPC reads them)."""


def address(flag: str, text: str) -> str:
    """A server address: HOST:PORT or [IPv6]:PORT with a port in 1..65535 (or a gRPC target
    with a scheme such as dns:/// or unix:)."""
    if text.startswith(_SCHEMES):
        return text
    m = _HOST_PORT.match(text)
    if m is None:
        raise ConfigError(f"{flag} must be HOST:PORT (or [IPv6]:PORT), got {text!r}")
    port(f"{flag} {text!r}: the port", int(m.group("port")), zero=None)
    return text
