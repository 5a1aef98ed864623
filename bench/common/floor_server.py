"""The transport floor for bench_server_load: a Session server that only moves the messages.

It speaks enough of croupier.v1 for the benchmark's simulated ranks (Join, Session with one
lane per rank, in-band acknowledgements) and sends exactly the messages croupier's server
sends them: on open, the lane's first `lookahead` slices; on each acknowledgement, the
slices its window now admits, with the acknowledgement's confirmation in the same message.
It holds no job: no sampling, no rank table, no lag bound, no checkpoints, no liveness;
every slice carries the same packed ids. Same grpc.aio server options as `croupier serve`,
one event loop.

What it costs per million ids is what any Python grpc.aio server pays for this message
pattern, whatever it computes: the floor under croupier's server in the same load.

Run: python -m bench.common.floor_server   (prints {"address": ...} on its first line, like serve)
"""

from __future__ import annotations

import asyncio
import json
import signal

import grpc
import numpy as np

from croupier.grpc_options import server_options
from croupier.proto import SERVICE_NAME, pack_ids, pb2


class FloorSampler:
    """Join and Session with nothing behind them but each lane's window."""

    def __init__(self, per_rank: int) -> None:
        self.payload = pack_ids(np.arange(per_rank, dtype=np.int64))

    async def join(self, request: pb2.JoinRequest, context) -> pb2.JoinResponse:
        return pb2.JoinResponse(next_step=0, per_rank_batch=len(self.payload) // 8, max_lookahead=64, max_lag=128)

    async def session(self, requests, context):
        lanes: dict[int, list[int]] = {}  # lane -> [next step to send, stop step, lookahead]
        out: asyncio.Queue = asyncio.Queue()

        def window(resp: pb2.SessionResponse, lane: int, acked: int) -> None:
            st = lanes[lane]
            top = min(acked + st[2], st[1])
            if st[0] < top:
                resp.lanes.add(lane=lane, slices=[pb2.Slice(step=s, packed_ids=self.payload,
                                                            kind=pb2.SLICE_KIND_DATA) for s in range(st[0], top)])
                st[0] = top

        async def read() -> None:
            async for request in requests:
                resp = pb2.SessionResponse()
                for op in request.open:
                    lanes[op.lane] = [op.start_step, op.stop_step, op.lookahead]
                    window(resp, op.lane, op.start_step)
                for a in request.acks:
                    if a.lane in lanes:
                        resp.events.add(lane=a.lane, acked_step=a.next_step)
                        window(resp, a.lane, a.next_step)
                if resp.lanes or resp.events:
                    out.put_nowait(resp)
            out.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                resp = await out.get()
                if resp is None:
                    return
                yield resp
        finally:
            reader.cancel()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Join": grpc.unary_unary_rpc_method_handler(self.join, request_deserializer=pb2.JoinRequest.FromString,
                                                        response_serializer=pb2.JoinResponse.SerializeToString),
            "Session": grpc.stream_stream_rpc_method_handler(
                self.session, request_deserializer=pb2.SessionRequest.FromString,
                response_serializer=pb2.SessionResponse.SerializeToString),
        })


async def serve(per_rank: int = 8) -> None:
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers((FloorSampler(per_rank).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"address": f"127.0.0.1:{port}", "event": "serving"}), flush=True)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(serve())
