#!/usr/bin/env bash
# Regenerates the Python gRPC stubs for provider_gateway.v1 into ./generated.
# Works from any directory. Requires the packages in requirements.txt.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
out="${here}/generated"

rm -rf "${out}"
mkdir -p "${out}"

python3 -m grpc_tools.protoc \
  -I "${repo}/proto" \
  --python_out="${out}" \
  --grpc_python_out="${out}" \
  --pyi_out="${out}" \
  provider_gateway/v1/provider_gateway.proto

# Make `from provider_gateway.v1 import provider_gateway_pb2` importable when
# ${out} is on sys.path.
touch "${out}/provider_gateway/__init__.py" "${out}/provider_gateway/v1/__init__.py"

# The installable package (clients/python) ships the same stubs.
pkg="${repo}/clients/python/src/provider_gateway"
rm -rf "${pkg}"
cp -R "${out}/provider_gateway" "${pkg}"

echo "generated Python stubs in ${out} and ${pkg}"
