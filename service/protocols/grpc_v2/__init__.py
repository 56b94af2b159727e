"""The gRPC protocols' messages and service stubs: the Open Inference Protocol (``open_inference.proto``)
and gRPC health (``health.proto``).

The ``*_pb2*.py`` modules are generated from the .proto files beside them and checked in; regenerate
them with ``scripts/gen-grpc-stubs.sh`` after changing a .proto. Their messages live in ``POOL``, a
descriptor pool of their own, so they can share a process with another copy of the same protocol
(tritonclient's, KServe's), whose package names are the same.
"""

from google.protobuf.descriptor_pool import DescriptorPool

POOL = DescriptorPool()
