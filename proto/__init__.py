"""croupier.proto: the versioned gRPC contract and its generated Python modules.

    from croupier.proto import pb2, pb2_grpc, API_VERSION

`pb2` holds the messages of croupier/v1/croupier.proto, `pb2_grpc` the `SamplerStub` and the
servicer base. The generated files are checked in and reproduced by proto/generate.sh.
`pack_ids` / `slice_ids` convert between a numpy id array and a Slice's packed bytes.
"""

import numpy as np

from croupier.proto.croupier.v1 import croupier_pb2 as pb2
from croupier.proto.croupier.v1 import croupier_pb2_grpc as pb2_grpc

API_VERSION = "croupier.v1"
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Sampler"].full_name

IDS_DTYPE = np.dtype("<i8")
"""Wire type of packed sample ids: little-endian int64."""


def pack_ids(ids: np.ndarray) -> bytes:
    """The wire bytes of `ids` (one copy, no per-id work)."""
    return np.ascontiguousarray(ids, dtype=IDS_DTYPE).tobytes()


def slice_ids(sl: "pb2.Slice") -> np.ndarray:
    """A Slice's ids as a read-only int64 array: `packed_ids` when set, else the legacy `ids`."""
    if sl.packed_ids:
        if len(sl.packed_ids) % IDS_DTYPE.itemsize:
            raise ValueError(f"slice of step {sl.step} carries {len(sl.packed_ids)} packed bytes, "
                             f"not a multiple of {IDS_DTYPE.itemsize}")
        return np.frombuffer(sl.packed_ids, dtype=IDS_DTYPE)
    return np.asarray(sl.ids, dtype=np.int64)


def slice_spans(sl: "pb2.Slice", n: int) -> list[tuple[int, int, int]] | None:
    """A Slice's (start, end, length) stream-token spans per id (steps in tokens), else None."""
    if not sl.packed_token_spans:
        return None
    arr = np.frombuffer(sl.packed_token_spans, dtype="<i8")
    if arr.size != 3 * n:
        raise ValueError(f"slice of step {sl.step} carries {arr.size} token span values for {n} ids "
                         f"(expected {3 * n})")
    return [(int(a), int(b), int(c)) for a, b, c in arr.reshape(n, 3)]


__all__ = ["pb2", "pb2_grpc", "API_VERSION", "SERVICE_NAME", "IDS_DTYPE", "pack_ids", "slice_ids", "slice_spans"]
