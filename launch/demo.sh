#!/usr/bin/env bash
# The built-in example: build a small real Megatron checkpoint at TP=2 PP=2 with megatron-core
# on CPU, export it to a Hugging Face folder under torchrun, and check transformers' logits
# against megatron-core's. Usage: bash launch/demo.sh [WORKDIR]
set -euo pipefail
WORK=${1:-$(mktemp -d -t distconv-demo-XXXX)}
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
echo "== building a Llama-style megatron-core checkpoint (TP2 PP2, 4 CPU ranks) in $WORK"
torchrun --standalone --nproc-per-node 4 -m distconv.testing.build --out "$WORK" --only llama --layouts 2x2
echo "== exporting with distconv (4 ranks, gloo)"
torchrun --standalone --nproc-per-node 4 -m distconv export \
    --load "$WORK/llama/tp2pp2" --save "$WORK/llama-hf" --overwrite
echo "== checking logits"
python -m distconv.testing.check --hf "$WORK/llama-hf" --ref "$WORK/refs/llama.pt"
ls -l "$WORK/llama-hf"
