#!/usr/bin/env bash
# Submit slurm/distconv.sbatch asking for GPUs from a variable (an #SBATCH line cannot):
#
#   GPUS_PER_NODE=8 bash slurm/submit.sh export --load CKPT --save OUT [options]
#   GPUS_PER_NODE=8 NODES=2 bash slurm/submit.sh import --load HF --save CKPT ...
#
# GPUS_PER_NODE  GPUs per node to ask for (--gpus-per-node); unset or 0: none (the ranks gather
#                over gloo on the CPU, and distconv says so once)
# GRES           instead, a generic resource string for clusters that want --gres (e.g. gpu:a100:8)
# NODES          nodes (--nodes; default 1)
# SBATCH_ARGS    anything else for sbatch (e.g. "--partition gpu --time 02:00:00")
# Every argument goes to `python -m distconv` through slurm/distconv.sbatch.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
request=()
if [ -n "${GRES:-}" ]; then
    request=(--gres "$GRES")
elif [ "${GPUS_PER_NODE:-0}" != 0 ]; then
    request=(--gpus-per-node "$GPUS_PER_NODE")
fi
# shellcheck disable=SC2086  # SBATCH_ARGS is split on purpose
exec sbatch --nodes "${NODES:-1}" ${request[@]+"${request[@]}"} ${SBATCH_ARGS:-} "$here/distconv.sbatch" "$@"
