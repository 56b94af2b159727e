#!/usr/bin/env bash
# Regenerate the vendored gRPC stubs in service/protocols/grpc_v2/ from the .proto files beside them.
#
#   bash scripts/gen-grpc-stubs.sh     (from the repository root; needs network access to PyPI once)
#
# grpcio-tools is pinned: its protoc writes code for protobuf 6.31 (the runtime must be 6.x, >= 6.31,
# which pyproject.toml requires) and its plugin code for grpcio >= 1.76. One change is made to what it
# writes: the messages are registered in a descriptor pool of their own (service.protocols.grpc_v2.POOL)
# rather than protobuf's default one, so these modules can share a process with tritonclient's or
# KServe's own copies of the same protocol (package "inference"), which would otherwise collide.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${TOOLS:-.venv-grpc-tools}"
[ -x "$TOOLS/bin/python" ] || { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install --quiet "grpcio-tools==1.76.0"; }
OUT=service/protocols/grpc_v2
"$TOOLS/bin/python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. "$OUT/open_inference.proto" "$OUT/health.proto"
for module in "$OUT"/*_pb2.py; do
  sed -i -e 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/DESCRIPTOR = POOL.AddSerializedFile(/' \
         -e 's/^from google.protobuf.internal import builder as _builder$/&\nfrom service.protocols.grpc_v2 import POOL/' "$module"
  grep -q '^DESCRIPTOR = POOL.AddSerializedFile(' "$module" || { echo "$module: protoc's output changed; update this script" >&2; exit 1; }
done
echo "regenerated $OUT from its .proto files"
