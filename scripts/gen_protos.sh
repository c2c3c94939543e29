#!/usr/bin/env bash
# Regenerates shared/pb/ from proto/. The one way generated code is made; CI checks
# that running it changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=shared/pb/v1
rm -f "$out"/*_pb2.py "$out"/*_pb2.pyi "$out"/*_pb2_grpc.py
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  proto/shared/pb/v1/*.proto
touch shared/pb/__init__.py shared/pb/v1/__init__.py
