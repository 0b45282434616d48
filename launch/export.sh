#!/usr/bin/env bash
# Export a Megatron checkpoint with torchrun, on one node or on several.
#
#   bash launch/export.sh CKPT OUT [distconv export options...]
#
# One node (default): torchrun --standalone. Several nodes: run the same command on every
# node with the rendezvous in the environment:
#   NNODES=4 MASTER_ADDR=node0 [MASTER_PORT=29500] [RDZV_ID=my-export] bash launch/export.sh CKPT OUT
# uses torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT (node ranks assigned on join);
# with NODE_RANK set as well it uses a static rendezvous with that node rank instead.
#
# NPROC (processes per node) defaults to the training's model-parallel size (TP x PP x EP,
# from the checkpoint's args) divided over the nodes, at most one per GPU when there are GPUs;
# without GPUs at most the number of ranks that wrote the checkpoint in all, and the node's cores.
# PYTHON picks the interpreter (default: python). Other options go to `distconv export`.
set -euo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
LOAD=$1 SAVE=$2
shift 2
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
if [ -z "${NPROC:-}" ]; then
    # an unreadable checkpoint gives 1 process here; distconv itself then reports the problem
    GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    if [ "${GPUS:-0}" -gt 0 ]; then
        NPROC=$("$PYTHON" -m distconv layout "$LOAD" --nodes "$NNODES" 2>/dev/null || echo 1)
        if [ "$NPROC" -gt "$GPUS" ]; then NPROC=$GPUS; fi
    else  # args may claim any TP x PP: the files written and the cores bound it
        NPROC=$("$PYTHON" -m distconv layout "$LOAD" --nodes "$NNODES" --cpu 2>/dev/null || echo 1)
    fi
fi
if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    RDZV=(--standalone)
elif [ -n "${NODE_RANK:-}" ]; then
    RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
    RDZV=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}"
          --rdzv-id "${RDZV_ID:-distconv}" --rdzv-conf join_timeout=1800)
fi
echo "distconv: $NNODES node(s) x $NPROC process(es) on $(hostname)" >&2
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC" \
    -m distconv export --load "$LOAD" --save "$SAVE" "$@"
