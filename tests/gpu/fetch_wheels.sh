#!/usr/bin/env bash
# Download, HERE (a machine that reaches PyPI), the wheels the offline GPU machine needs to run
# tests/gpu/check.sh, into .whl/ at the repository root (ignored by git; it travels with the
# working tree). The GPU machine has python3 3.12 with torch (CUDA), transformers, safetensors,
# accelerate and tokenizers, but not megatron-core. distconv itself is used from the source tree.
#
# megatron-core 0.16.1's Requires-Dist (no extras): torch>=2.6.0, numpy, packaging>=24.2.
# torch is there; numpy comes with transformers; packaging too, but maybe older than 24.2, so
# its (pure-python) wheel is carried as well and check.sh installs it only when the machine's
# is older.
#
#   bash tests/gpu/fetch_wheels.sh          (from the repository root; uses python3 -m pip,
#                                            or $PYTHON -m pip)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
mkdir -p .whl
# megatron-core has a compiled extension: the wheel for CPython 3.12 on manylinux x86_64
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "megatron-core==0.16.1"
# pure python
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .whl "packaging>=24.2"
echo "wheels in .whl/:"
ls -l .whl/*.whl
du -ch .whl/*.whl | tail -n 1
