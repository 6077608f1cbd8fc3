#!/usr/bin/env bash
# Generates flux_kv/flux_pb2.py from proto/flux.proto with protoc. Use the protoc that goes
# with the protobuf runtime the client will import (on Debian: protobuf-compiler with
# python3-protobuf); a newer protoc makes code an older runtime refuses. PYTHON_PROTOC
# names another; PROTOC is not used, as the Rust build sets it to its own, newer protoc.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PROTOC=${PYTHON_PROTOC:-$(command -v /usr/bin/protoc || command -v protoc)}
"$PROTOC" --python_out="$HERE/flux_kv" -I"$ROOT/proto" "$ROOT/proto/flux.proto"
echo "wrote $HERE/flux_kv/flux_pb2.py with $("$PROTOC" --version)"
