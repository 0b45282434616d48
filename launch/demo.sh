#!/usr/bin/env bash
# The built-in example: build a small real Megatron checkpoint at TP=2 PP=2 with megatron-core
# on CPU (the test suite's builder, run from this checkout), export it to a Hugging Face folder
# under torchrun, and check transformers' logits against megatron-core's with `distconv verify`.
# Usage: bash launch/demo.sh [WORKDIR]
set -euo pipefail
WORK=$(realpath -m "${1:-$(mktemp -d -t distconv-demo-XXXX)}")
cd "$(dirname "$0")/.."  # the builder is tests/fixtures/build.py of this checkout
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
echo "== building a Llama-style megatron-core checkpoint (TP2 PP2, 4 CPU ranks) in $WORK"
torchrun --standalone --nproc-per-node 4 -m tests.fixtures.build --out "$WORK" --only llama --layouts 2x2
echo "== exporting with distconv (4 ranks, gloo)"
torchrun --standalone --nproc-per-node 4 -m distconv export \
    --load "$WORK/llama/tp2pp2" --save "$WORK/llama-hf" --overwrite
echo "== checking logits"
python -m distconv verify --load "$WORK/llama/tp2pp2" --hf "$WORK/llama-hf"
ls -l "$WORK/llama-hf"
