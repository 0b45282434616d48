#!/usr/bin/env bash
# Install Debian's slurm-wlm and munge for tests/test_slurm.py (which configures and starts a
# one-node cluster in a scratch folder by itself). Needs root and apt-get; otherwise it says
# why and leaves the Slurm test to skip. Never fails the caller.
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
    echo "setup_slurm: slurm-wlm and munge already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup_slurm: not root or no apt-get: slurm-wlm not installed, tests/test_slurm.py will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; then
    echo "setup_slurm: installed slurm-wlm and munge"
else
    echo "setup_slurm: apt-get install slurm-wlm munge failed, tests/test_slurm.py will skip"
fi
exit 0
