#!/usr/bin/env bash
# Install megatron-core 0.19.2 into .venv-m019 for tests/test_megatron019.py: a second, newer writer
# of real checkpoints beside the project's megatron-core 0.16.1. Never fails the caller (see
# tests/setup_venv.sh).
#
# How, and why: megatron-core 0.17 and newer declare Python >= 3.12 (0.19.2's only wheel is
# cp312), and 0.19.2 imports triton unconditionally (megatron/core/transformer/moe/ops/paged_stash.py),
# which only torch's CUDA builds bring. So this venv is the real thing: the machine's Python 3.12
# (pyenv's, on this kind of machine) with torch 2.13.0 as pip resolves it there, i.e. PyPI's CUDA
# build (about 4.8 GB installed; no CPU build of torch for 3.12 is reachable: the PyTorch CPU
# index is not among the registries here), run on the CPU. Not chosen: megatron-core's sdist
# forced onto the project's Python 3.11 with --ignore-requires-python beside the CPU torch 2.13.0
# (it also needs triton from PyPI, and runs 0.19.2 on a Python it does not support).
MEGATRON_VERSION=0.19.2
TORCH_VERSION=2.13.0
# psutil: 0.19.2's dist_checkpointing save imports it (strategies/filesystem_async.py) but does not declare it;
# einops: distconv's model builder for hybrid (Mamba) models runs here too (tests/megatron019_builder.py)
PINS="megatron-core==$MEGATRON_VERSION torch==$TORCH_VERSION psutil==7.2.2 einops==0.8.2"
cd "$(dirname "$0")/.." || exit 0
NAME=setup_megatron019 VENV=.venv-m019 TESTS=tests/test_megatron019.py
. tests/setup_venv.sh
# a Python 3.12: on PATH, else pyenv's (its shim answers only for the selected version)
PY312=""
if python3.12 -c "" >/dev/null 2>&1; then
    PY312=python3.12
else
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
        [ -x "$candidate" ] && "$candidate" -c "" >/dev/null 2>&1 && PY312=$candidate
    done
fi
[ -n "$PY312" ] || give_up "no Python 3.12 on this machine (megatron-core $MEGATRON_VERSION requires it)"
"$PY312" -m venv "$VENV" >"$LOG" 2>&1 || give_up "$PY312 -m venv $VENV failed"
PY="$PWD/$VENV/bin/python"
# one resolver run with both pins
# shellcheck disable=SC2086
timeout 1500 "$PY" -m pip install -q $PINS >>"$LOG" 2>&1 || give_up "pip install $PINS failed or timed out"
# from a scratch folder, so that the project's own files are not on the path
SCRATCH=$(mktemp -d)
# (megatron.core.__version__ appends the hash of a git checkout it lies in: the metadata's is exact)
(cd "$SCRATCH" && timeout 600 "$PY" -W ignore -c "import importlib.metadata, torch, megatron.core
from megatron.core import dist_checkpointing
assert importlib.metadata.version('megatron-core') == '$MEGATRON_VERSION'") >>"$LOG" 2>&1 \
    || { rm -rf "$SCRATCH"; give_up "'import megatron.core' fails after installing $PINS"; }
rm -rf "$SCRATCH"
ready
