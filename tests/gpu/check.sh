#!/usr/bin/env bash
# The GPU check (see tests/gpu/check.py): run from anywhere on a machine with NVIDIA GPUs,
#
#   bash tests/gpu/check.sh                  (add --cpu-dry-run to prove the plumbing on a CPU)
#
# Needs python3 with torch (CUDA), transformers, safetensors, accelerate, tokenizers, and
# megatron-core: if it is not importable it is installed from .whl/ at the repository root
# (made by tests/gpu/fetch_wheels.sh on a machine that reaches PyPI) into $DISTCONV_SITE
# (default /tmp/site). distconv itself is used from this source tree. Output goes under $OUT
# when set, else a new temporary folder. Exit status: 0 all checks passed or skipped, 1 some
# check failed, 2 the environment is not ready.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import numpy" 2>/dev/null; then
    echo "check.sh: $PY cannot import numpy (megatron-core needs it); install numpy for this python" >&2
    exit 2
fi
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/megatron_core-*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        cat >&2 <<MSG
check.sh: megatron-core is not importable by $PY and there is no .whl/megatron_core-*.whl here.
  On a machine that reaches PyPI run:  bash tests/gpu/fetch_wheels.sh
  then copy the repository (with its .whl/ folder) here and run this script again; or
  install megatron-core==0.16.1 for this python yourself.
MSG
        exit 2
    fi
    site=${DISTCONV_SITE:-/tmp/site}
    install() {  # offline, no dependencies; a python without pip unpacks the wheel (all it needs here)
        if "$PY" -m pip --version >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$site" "$@"
        else
            mkdir -p "$site" && for w in "$@"; do "$PY" -m zipfile -e "$w" "$site" || return 1; done
        fi
    }
    echo "check.sh: installing ${wheels[*]} into $site (offline)"
    install "${wheels[@]}" || exit 2
    # megatron-core 0.16.1 wants packaging>=24.2; the machine's may be older
    if ! "$PY" -c "import sys, packaging; from packaging.version import Version; sys.exit(Version(packaging.__version__) < Version('24.2'))" 2>/dev/null; then
        pkg=(.whl/packaging-*.whl)
        if [ ${#pkg[@]} -gt 0 ]; then
            echo "check.sh: packaging older than 24.2 (or missing): installing ${pkg[*]} too"
            install "${pkg[@]}" || exit 2
        else
            echo "check.sh: warning: packaging older than 24.2 and no .whl/packaging-*.whl" >&2
        fi
    fi
    export PYTHONPATH="$site:$PYTHONPATH"
    if ! "$PY" -W ignore -c "import megatron.core" ; then
        echo "check.sh: megatron-core still does not import after installing ${wheels[*]} into $site" >&2
        exit 2
    fi
fi
exec "$PY" tests/gpu/check.py "$@"
