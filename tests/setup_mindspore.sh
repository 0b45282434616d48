#!/usr/bin/env bash
# Install MindSpore and MindFormers (CPU) into .venv-mindspore for tests/test_mindspore_real.py,
# apart from the project's venv (MindFormers pins numpy < 2 and its own dependencies). Never
# fails the caller (see tests/setup_venv.sh).
MINDSPORE_VERSION=2.9.0
MINDFORMERS_VERSION=1.9.0
PINS="mindspore==$MINDSPORE_VERSION mindformers==$MINDFORMERS_VERSION pyarrow==19.0.0 numpy<2"
cd "$(dirname "$0")/.." || exit 0
NAME=setup_mindspore VENV=.venv-mindspore TESTS=tests/test_mindspore_real.py
. tests/setup_venv.sh
python3 -m venv "$VENV" >"$LOG" 2>&1 || give_up "python3 -m venv $VENV failed"
PY="$PWD/$VENV/bin/python"
# one resolver run with every pin, so that pip never upgrades numpy or pyarrow past them
# shellcheck disable=SC2086
timeout 1500 "$PY" -m pip install -q $PINS >>"$LOG" 2>&1 \
    || give_up "pip install $PINS failed or timed out"
# from a scratch folder: importing MindFormers creates ./output/log
SCRATCH=$(mktemp -d)
(cd "$SCRATCH" && timeout 600 "$PY" -c "import mindspore, mindformers") >>"$LOG" 2>&1 \
    || { rm -rf "$SCRATCH"; give_up "'import mindspore, mindformers' fails after installing $PINS"; }
rm -rf "$SCRATCH"
ready
