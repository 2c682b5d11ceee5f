"""Standard gRPC tooling against uplinkd: health checking and server reflection (v1alpha,
what grpcio-reflection's client speaks), over the agent's mTLS port.

usage: grpc_tooling.py ADDRESS CA CERT KEY
"""
import sys

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

addr, ca, cert, key = sys.argv[1:5]
with open(ca, "rb") as c, open(key, "rb") as k, open(cert, "rb") as e:
    creds = grpc.ssl_channel_credentials(c.read(), k.read(), e.read())
channel = grpc.secure_channel(addr, creds)
health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
print("health", health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))
db = ProtoReflectionDescriptorDatabase(channel)
print("services", ",".join(sorted(db.get_services())))
pool = descriptor_pool.DescriptorPool(db)
print("methods", ",".join(m.name for m in pool.FindServiceByName("uplink.v1.Agent").methods))
