#!/usr/bin/env bash
# Regenerate the Python gRPC stubs for csi/csi.proto into modelcache/csi/.
# Needs grpcio-tools (pip install grpcio-tools); the stubs are committed, so
# running modelcache never needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m grpc_tools.protoc -I csi --python_out=modelcache/csi --pyi_out=modelcache/csi \
  --grpc_python_out=modelcache/csi csi/csi.proto
# protoc writes absolute imports ("import csi_pb2"); the stubs live in a package.
sed -i 's/^import csi_pb2 as csi__pb2/from . import csi_pb2 as csi__pb2/' modelcache/csi/csi_pb2_grpc.py
