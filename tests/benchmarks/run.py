"""distconv export benchmark: against the disk's limit and a single-process baseline, same run.

    python -m tests.benchmarks.run [--gb 2] [--ranks 1 2 4] [--writers 1] [--workdir DIR] [--json OUT]

1. Generates (once per size, kept in ``--workdir``) a real megatron-core torch_dist checkpoint
   of ``--gb`` GB of bf16 weights plus fp32 Adam moments, saved by 4 ranks at TP2 PP2.
2. Measures the physical limit: plain sequential reads of the model's byte count from the
   ``.distcp`` files, then plain sequential writes (fsync'ed) of as many bytes to the same disk.
3. Runs distconv export under torchrun at each ``--ranks`` count (and ``--writers``).
4. Runs the baseline (``dcp_to_torch_save`` + one-process mapping + ``safetensors`` save).

The page cache is dropped for the checkpoint files (``posix_fadvise(DONTNEED)``) before each
measurement, so reads come from the disk. Prints one table and writes it as JSON.
Bytes read are the processes' ``read_bytes`` from ``/proc/<pid>/io`` (real storage reads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16 << 20


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONWARNINGS="ignore")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def drop_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(path, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def physical_limit(ckpt: Path, nbytes: int, scratch: Path) -> dict[str, float]:
    """Sequential read of ``nbytes`` from the .distcp files, then sequential write of as many."""
    drop_cache(ckpt)
    buf = bytearray(BLOCK)
    left, start = nbytes, time.perf_counter()
    for path in sorted(ckpt.glob("*.distcp")):
        with open(path, "rb", buffering=0) as f:
            while left > 0:
                n = f.readinto(memoryview(buf)[: min(BLOCK, left)])
                if not n:
                    break
                left -= n
        if left <= 0:
            break
    read_s = time.perf_counter() - start
    target = scratch / "limit.bin"
    left, start = nbytes, time.perf_counter()
    with open(target, "wb", buffering=0) as f:
        while left > 0:
            left -= f.write(memoryview(buf)[: min(BLOCK, left)])
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    target.unlink()
    return {"read_s": read_s, "write_s": write_s, "seconds": read_s + write_s}


def run_measured(cmd: list[str], stats: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    ranks = json.loads(stats.read_text())
    return {
        "wall_s": wall,
        "seconds": max(r["seconds"] for r in ranks),
        "read_bytes": sum(r["read_bytes"] for r in ranks),
        "rss_rank0": ranks[0]["peak_rss"],
        "rss_other_max": max((r["peak_rss"] for r in ranks[1:]), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="weight size of the generated checkpoint (GB)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--window", default="256MiB", help="distconv's --window (rank 0 holds about 3 of them)")
    parser.add_argument("--dtype", default="auto", help="distconv's --dtype (e.g. fp8)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distconv-bench"))
    parser.add_argument("--skip-baseline", action="store_true", help="e.g. when the model does not fit in RAM")
    parser.add_argument("--no-optimizer", action="store_true", help="generate the checkpoint without Adam moments")
    parser.add_argument("--json", type=Path, help="also write the table here")
    opts = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from distconv.sources.megatron import describe

    ckpt_root = opts.workdir / f"ckpt-{opts.gb:g}gb"
    if not (ckpt_root / "latest_checkpointed_iteration.txt").exists():
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                        str(ROOT / "tests/benchmarks/make_checkpoint.py"), "--out", str(ckpt_root), "--gb", str(opts.gb),
                        *(["--no-optimizer"] if opts.no_optimizer else [])],
                       env=env(), cwd=ROOT, check=True)
    ckpt = describe(ckpt_root)
    weights = ckpt.weight_bytes
    scratch = opts.workdir / "out"
    scratch.mkdir(parents=True, exist_ok=True)

    limit = physical_limit(ckpt.path, weights, scratch)
    rows = {"physical limit (read+write)": {"seconds": limit["seconds"], "wall_s": limit["seconds"], "read_bytes": weights,
                                            "rss_rank0": 0, "rss_other_max": 0}}
    for n in opts.ranks:
        drop_cache(ckpt.path)
        stats = scratch / f"stats{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               str(ROOT / "tests/benchmarks/export_stats.py"), "--load", str(ckpt_root),
               "--save", str(scratch / f"hf{n}"), "--stats", str(stats), "--writers", str(min(opts.writers, n)),
               "--window", opts.window, "--dtype", opts.dtype]
        rows[f"distconv {n} rank(s)"] = run_measured(cmd, stats)
        shutil.rmtree(scratch / f"hf{n}")
    if not opts.skip_baseline:
        drop_cache(ckpt.path)
        stats = scratch / "baseline.json"
        cmd = [sys.executable, str(ROOT / "tests/benchmarks/baseline.py"), "--load", str(ckpt.path),
               "--save", str(scratch / "baseline"), "--stats", str(stats)]
        rows["baseline (dcp_to_torch_save + 1 process)"] = run_measured(cmd, stats)
        shutil.rmtree(scratch / "baseline")

    base = rows.get("baseline (dcp_to_torch_save + 1 process)")
    print(f"\ncheckpoint: {ckpt.path} ({weights / 1e9:.2f} GB weights, {ckpt.other_bytes / 1e9:.2f} GB optimizer state); "
          f"limit: read {weights / limit['read_s'] / 1e9:.2f} GB/s, write {weights / limit['write_s'] / 1e9:.2f} GB/s")
    header = f"{'run':42} {'time s':>7} {'wall s':>7} {'GB/s':>6} {'read/weights':>12} {'rss r0 GB':>9} {'rss max other':>13} {'x limit':>7} {'speedup':>7} {'mem ratio':>9}"
    print(header)
    table = []
    for name, r in rows.items():
        row = {
            "run": name, **r, "gb_per_s": weights / r["seconds"] / 1e9, "read_ratio": r["read_bytes"] / weights,
            "x_limit": r["seconds"] / limit["seconds"],
            "speedup_vs_baseline": base["seconds"] / r["seconds"] if base else None,
            "memory_ratio_vs_baseline": base["rss_rank0"] / r["rss_rank0"] if base and r["rss_rank0"] else None,
        }
        table.append(row)
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{name:42} {r['seconds']:7.1f} {r['wall_s']:7.1f} {row['gb_per_s']:6.2f} {row['read_ratio']:12.3f} "
              f"{r['rss_rank0'] / 1e9:9.2f} {r['rss_other_max'] / 1e9:13.2f} {row['x_limit']:7.2f} "
              f"{fmt(row['speedup_vs_baseline'], '7.2f')} {fmt(row['memory_ratio_vs_baseline'], '9.1f')}")
    result = {"window": opts.window, "dtype": opts.dtype, "weights_bytes": weights, "optimizer_bytes": ckpt.other_bytes, "limit": limit, "rows": table}
    out = opts.json or opts.workdir / f"bench-{opts.gb:g}gb.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
