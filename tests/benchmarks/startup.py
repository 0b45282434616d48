"""What a whole ``torchrun -m distconv`` run spends before and around its own work, piece by piece.

    python -m tests.benchmarks.startup [--repeat 5] [--json OUT]

Each line is a fresh process's wall time, the median of ``--repeat`` runs, page cache warm (as on
a node that has run Python before), run interleaved so that a slow minute touches every line:

- the interpreter alone;
- importing torch; then also transformers; then also megatron-core's ``dist_checkpointing`` (what
  every conversion imports: the last two only when a command needs them);
- ``torchrun --standalone --nproc-per-node 1`` running ``/bin/true``: the launcher's own cost,
  before and after its worker;
- ``python -m distconv --help``.

The issue's target is a whole-process wall time of at most the conversion's time + 3 s. The
launcher plus the imports every conversion needs are a floor under that difference which
distconv's own code does not set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.benchmarks.run import ROOT, env

STEPS = {
    "interpreter (python -c pass)": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
    "import torch, transformers": [sys.executable, "-c", "import torch, transformers"],
    "import torch, transformers, megatron-core dist_checkpointing": [
        sys.executable, "-c", "import torch, transformers\nfrom megatron.core import dist_checkpointing"],
    "torchrun --standalone --nproc-per-node 1 /bin/true": [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "--no-python", "/bin/true"],
    "python -m distconv --help": [sys.executable, "-m", "distconv", "--help"],
}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env(), cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    opts = parser.parse_args()
    for cmd in STEPS.values():  # warm the page cache: every line measures a warm start
        wall(cmd)
    runs: dict[str, list[float]] = {name: [] for name in STEPS}
    for _ in range(opts.repeat):
        for name, cmd in STEPS.items():
            runs[name].append(wall(cmd))
    for name, seconds in runs.items():
        print(f"{name:64s} {statistics.median(seconds):6.2f} s  (runs {min(seconds):.2f}-{max(seconds):.2f})")
    if opts.json:
        opts.json.write_text(json.dumps({"runs": runs, "median_s": {n: statistics.median(s) for n, s in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
