"""Where a 1-rank export's conversion time goes: megatron-core's load, and the writes.

    python -m tests.benchmarks.export_parts [--gb 2] [--repeat 3] [--workdir DIR] [--json OUT]

On the checkpoint ``tests.benchmarks.run`` generates (the same ``--gb`` and ``--workdir``), each
round measures, in fresh ``python -m distconv export`` processes (one rank, no torchrun), page
cache dropped before each, interleaved so that a slow minute touches every row:

- the copy limit (``run.copy_limit``: the weights' stored bytes copied, read and write overlapped);
- the whole export;
- **reads only**: the export with the shard's file writes (and their SHA-256) skipped, so what is
  left is megatron-core's load, the mapping and the NaN check;
- **writes only**: the export with megatron-core's load replaced by constant tensors of the
  planned shapes, so what is left is the mapping, the NaN check and the writes.

Each row reports the conversion's seconds (the run report's ``seconds.convert``) and, timed
inside the process, the seconds spent in megatron-core's load (``TorchDistReader.read``, on the
read-ahead thread), in the shard's write calls (``HashedWrites.write``: each buffer's write with
its SHA-256 on a second thread beside it) and in closing the shard (flush and ``fsync``). The
parts overlap in time (three threads on the machine's cores), so they do not add up to the
conversion. Medians of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from unittest import mock

from tests.benchmarks.run import ROOT, copy_limit, drop_cache, env, make_inputs, weight_ranges

VARIANTS = ("whole", "reads only", "writes only")
PARTS = ("load_s", "write_s", "close_s")


@contextlib.contextmanager
def timed_parts(variant: str, timers: dict[str, float]) -> Iterator[None]:
    """Time distconv's load, write and close calls into ``timers``; for ``reads only`` skip the
    writes, for ``writes only`` replace the load by constant tensors. Undone on exit."""
    import torch

    from distconv.engine.marker import HashedWrites
    from distconv.hf.sink import ShardWriter
    from distconv.megatron.torch_dist import TorchDistReader

    def timing(key, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[key] += time.perf_counter() - start
        return wrapper

    load, write = TorchDistReader.read, HashedWrites.write
    if variant == "writes only":
        load = lambda self, reads, dtype: [torch.full(r.sizes, 0.5, dtype=dtype) for r in reads]  # noqa: E731
    if variant == "reads only":
        write = lambda self, file, sha, data: memoryview(data).nbytes  # noqa: E731
    with mock.patch.object(TorchDistReader, "read", timing("load_s", load)), \
            mock.patch.object(HashedWrites, "write", timing("write_s", write)), \
            mock.patch.object(ShardWriter, "_close_file", timing("close_s", ShardWriter._close_file)):
        yield


def child(variant: str, load: str, save: str, report: str) -> None:
    """One export under ``timed_parts``; prints the timers and the report's seconds as JSON."""
    from distconv.cli import main

    timers = dict.fromkeys(PARTS, 0.0)
    with timed_parts(variant, timers):
        code = main(["export", "--load", load, "--save", save, "--overwrite", "--quiet", "--report", report])
    if code:
        raise SystemExit(code)
    print(json.dumps({**timers, "convert_s": json.loads(Path(report).read_text())["seconds"]["convert"]}))


def run_variant(variant: str, ckpt: Path, scratch: Path) -> dict[str, float]:
    save, report = scratch / "parts-out", scratch / "parts-report.json"
    drop_cache(ckpt)
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.export_parts", "--child", variant, "--load", str(ckpt),
                           "--save", str(save), "--report", str(report)],
                          env=env(), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    shutil.rmtree(save)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="weight size of the generated model (GB)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (each: every row once)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distconv-bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts.child, opts.load, opts.save, opts.report)
        return
    inputs = argparse.Namespace(op="export", workdir=opts.workdir, hidden=1024, experts=0, no_optimizer=False)
    ckpt_root, _ = make_inputs(inputs, opts.gb)
    from distconv.megatron.source import describe

    ckpt = describe(ckpt_root)
    scratch = opts.workdir / "out"
    scratch.mkdir(parents=True, exist_ok=True)
    ranges = weight_ranges(ckpt)
    rounds: list[dict[str, dict[str, float]]] = []
    for _ in range(opts.repeat):
        one = {"copy limit": {"convert_s": copy_limit(ckpt.path, ranges, scratch)["seconds"]}}
        one.update({v: run_variant(v, ckpt.path, scratch) for v in VARIANTS})
        rounds.append(one)
    median = {row: {k: statistics.median(r[row][k] for r in rounds) for k in rounds[0][row]} for row in rounds[0]}
    limit = median["copy limit"]["convert_s"]
    print(f"\n1-rank export of {ckpt.path} ({ckpt.weight_bytes / 1e9:.2f} GB of weights), {opts.repeat} round(s), medians")
    print(f"{'row':14} {'conversion s':>12} {'x copy':>6} {'in load s':>9} {'in writes s':>11} {'in close s':>10}   conversion s of each round")
    for row, m in median.items():
        parts = " ".join(f"{m[k]:>{w}.2f}" if k in m else f"{'-':>{w}}" for k, w in zip(PARTS, (9, 11, 10)))
        each = ", ".join(f"{r[row]['convert_s']:.2f}" for r in rounds)
        print(f"{row:14} {m['convert_s']:12.2f} {m['convert_s'] / limit:6.2f} {parts}   {each}")
    out = opts.json or opts.workdir / f"bench-export-parts-{opts.gb:g}gb.json"
    out.write_text(json.dumps({"checkpoint": str(ckpt.path), "weights_bytes": ckpt.weight_bytes, "median": median,
                               "rounds": rounds, "load_avg_1m": os.getloadavg()[0]}, indent=1))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
