#!/usr/bin/env bash
# All the test set-up on a fresh machine, run inside the project's activated venv: the project
# with its test extras, and at the same time the real parts the tests use beside it, each by
# its own script (tests/setup_{slurm,vllm,mindspore,megatron019}.sh: they never fail; their
# tests skip and say why). Fails only when the project itself cannot be installed.
cd "$(dirname "$0")/.." || exit 1
LOGS=$(mktemp -d)
PARTS="slurm vllm mindspore megatron019"
pids=""
for part in $PARTS; do
    bash "tests/setup_$part.sh" >"$LOGS/$part" 2>&1 &
    pids="$pids $!"
done
# torch first, so that pip takes the CPU wheel instead of a multi-GB CUDA build
pip install -q torch==2.13.0 && pip install -q -e '.[test]'
status=$?
# shellcheck disable=SC2086
wait $pids
for part in $PARTS; do
    cat "$LOGS/$part"
done
rm -rf "$LOGS"
[ $status = 0 ] || echo "setup: installing the project failed (pip's messages above)"
exit $status
