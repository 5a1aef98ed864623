"""Keyed pseudo-random permutations computed on the fly, vectorized over many domains.

`permute(x, n, key)` maps each position x in [0, n) to a position in [0, n), and for a fixed
(n, key) the map is a bijection: a Feistel network over a mixed-radix domain just above n,
with cycle walking to stay inside [0, n). No permutation is ever stored, so the
in-cluster order of a cluster of a billion samples costs nothing to keep.

Keys are derived by hashing tuples (`derive_keys(base, a, b)`), never by adding integers,
so (cluster 1, pass 2) and (cluster 2, pass 1) get unrelated orders.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

_U64 = np.uint64
_C1 = _U64(0xBF58476D1CE4E5B9)
_C2 = _U64(0x94D049BB133111EB)
_C3 = _U64(0x9E3779B97F4A7C15)
_ROUND_TAGS = tuple(_U64(t) for t in (0xA0761D6478BD642F, 0xE7037ED1A0B428DB,
                                      0x8EBC6AF09C88C6E3, 0x589965CC75374CC3))
_ROUNDS = len(_ROUND_TAGS)
_TAGS = np.array(_ROUND_TAGS, dtype=np.uint64)


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijective 64-bit mixer with full avalanche (uint64 arrays)."""
    return _mix64_in_place(np.array(z, dtype=np.uint64))  # a copy: the input stays as it is


def _mix64_in_place(z: np.ndarray) -> np.ndarray:
    """`mix64` of a uint64 array the caller owns, written over it (and returned)."""
    z ^= z >> _U64(30)
    z *= _C1
    z ^= z >> _U64(27)
    z *= _C2
    z ^= z >> _U64(31)
    return z


def seed_key(seed: int, tag: int) -> np.uint64:
    """A 64-bit base key for a (seed, purpose tag) pair, via numpy's SeedSequence."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.SeedSequence([int(seed), int(tag)]).generate_state(1, np.uint64)[0]


def derive_keys(base: np.uint64, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hash of the tuple (base, a, b) for each element pair: chained xor-then-mix."""
    h = np.array(a, dtype=np.uint64)  # a copy (an array even for one value): the steps below work in place
    h ^= _mixed_base(int(base))
    _mix64_in_place(h)
    h ^= np.asarray(b, dtype=np.uint64)
    h ^= _C1
    return _mix64_in_place(h)


@functools.lru_cache(maxsize=64)
def _mixed_base(base: int) -> np.uint64:
    """mix64(base ^ _C3): the part of `derive_keys` that every element of one base key shares."""
    return mix64(np.array([base], dtype=np.uint64) ^ _C3)[0]


def _round(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    t = v ^ k
    t *= _C1
    t ^= t >> _U64(31)
    t *= _C2
    t >>= _U64(32)
    return t


def permute(x: np.ndarray, n: np.ndarray | int, key: np.ndarray | np.uint64) -> np.ndarray:
    """Position of each `x` under the keyed bijection of [0, n) (all arguments broadcast).

    A four-round Feistel network over the mixed-radix domain Z_a x Z_b (a = floor(sqrt(n)),
    b = ceil(n / a), so a * b - n < a): rounds add a keyed hash modulo a and b. Values that
    land in [n, a * b) cycle-walk; at most one in sqrt(n) does, so the walk is short.
    Every x must lie in [0, n) and n must be < 2**52. Returns int64.
    """
    return _cycle_walk(x, n, key, _feistel)


def unpermute(y: np.ndarray, n: np.ndarray | int, key: np.ndarray | np.uint64) -> np.ndarray:
    """Inverse of `permute`: the x with permute(x, n, key) == y (arguments broadcast)."""
    return _cycle_walk(y, n, key, _feistel_inverse)


def _cycle_walk(x: np.ndarray, n: np.ndarray | int, key: np.ndarray | np.uint64,
                network: Callable[..., np.ndarray]) -> np.ndarray:
    """Applies `network` (a bijection of [0, a * b)) until every value lies in [0, n)."""
    x = np.asarray(x, dtype=np.uint64)
    n = _shaped(n, x.shape)
    key = _shaped(key, x.shape)
    a = np.sqrt(n.astype(np.float64)).astype(np.uint64)
    np.maximum(a, _U64(1), out=a)
    b = n + a
    b -= _U64(1)
    b //= a
    # The key is already a well-mixed 64-bit hash; distinct tags give each round its own function.
    round_keys = key[np.newaxis] ^ _TAGS.reshape((_ROUNDS,) + (1,) * x.ndim)  # row r: the key of round r
    out = network(x, a, b, round_keys)
    idx = np.flatnonzero(out >= n)
    if idx.size:  # the few values outside [0, n) walk on, each with its own domain and keys
        cur, n, a, b, round_keys = out[idx], n[idx], a[idx], b[idx], round_keys[:, idx]
        while True:
            cur = network(cur, a, b, round_keys)
            out[idx] = cur
            still = cur >= n
            if not still.any():
                break
            idx, cur, n, a, b, round_keys = idx[still], cur[still], n[still], a[still], b[still], round_keys[:, still]
    return out.astype(np.int64)


def _shaped(v: np.ndarray | int | np.uint64, shape: tuple[int, ...]) -> np.ndarray:
    """`v` as uint64 of `shape` (broadcast only when it is not that shape already)."""
    v = np.asarray(v, dtype=np.uint64)
    return v if v.shape == shape else np.broadcast_to(v, shape)


def _feistel(v: np.ndarray, a: np.ndarray, b: np.ndarray, round_keys: np.ndarray) -> np.ndarray:
    """One pass of the Feistel network over [0, a * b) (round r keyed by round_keys[r])."""
    left, right = np.divmod(v, b)
    for i in range(0, _ROUNDS, 2):
        left += _round(right, round_keys[i])
        left %= a
        right += _round(left, round_keys[i + 1])
        right %= b
    left *= b
    left += right
    return left



def _feistel_inverse(v: np.ndarray, a: np.ndarray, b: np.ndarray, round_keys: np.ndarray) -> np.ndarray:
    """The rounds of `_feistel` undone in reverse order."""
    left, right = np.divmod(v, b)
    for i in range(_ROUNDS - 2, -1, -2):
        right = (right + b - _round(left, round_keys[i + 1]) % b) % b
        left = (left + a - _round(right, round_keys[i]) % a) % a
    return left * b + right
