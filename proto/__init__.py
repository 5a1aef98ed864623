"""croupier.proto: the versioned gRPC contract and its generated Python modules.

    from croupier.proto import pb2, pb2_grpc, API_VERSION

`pb2` holds the messages of croupier/v1/croupier.proto, `pb2_grpc` the `SamplerStub` and the
servicer base. The generated files are checked in and reproduced by proto/generate.sh.
"""

from croupier.proto.croupier.v1 import croupier_pb2 as pb2
from croupier.proto.croupier.v1 import croupier_pb2_grpc as pb2_grpc

API_VERSION = "croupier.v1"
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Sampler"].full_name

__all__ = ["pb2", "pb2_grpc", "API_VERSION", "SERVICE_NAME"]
