"""distconv benchmark: against the copy limit and a single-process baseline, same run.

    python -m tests.benchmarks.run [--op export|import|reshard] [--gb 2 ...] [--ranks 1 2 4] [--tp T --pp P]
                                   [--experts N [--ep E --etp X]] [--writers 1] [--window 256MiB] [--repeat 1]
                                   [--workdir DIR] [--json OUT]

For each ``--gb`` size:

1. Generates the inputs (once per size, kept in ``--workdir``): a real megatron-core torch_dist
   checkpoint of ``--gb`` GB of bf16 weights (plus fp32 Adam moments unless ``--no-optimizer``),
   saved by 4 ranks at TP2 PP2 (with ``--experts N``: a Mixtral-shaped MoE model, saved at EP2
   with expert TP 1); for ``--op import`` also the HF folder distconv exports from it (one process).
2. Measures the copy limit: a plain streaming copy of the bytes the conversion reads (the
   weights' stored byte ranges in the ``.distcp`` files, by the DCP metadata; for import the
   ``.safetensors`` files) into one file on the same disk, a reader thread and the writer
   overlapped, fsync'ed: what any conversion of these bytes needs at least. Also
   ``python -m distconv --help``'s wall time and the planning time alone (``plan_time.py``:
   imports done, one rank).
3. Runs ``torchrun -m distconv`` at each ``--ranks`` count, as a user would: ``export`` (with
   ``--writers``; at 2 ranks also ``--writers 2``, with and without ``--read-at writer``, when
   ``--writers`` is 1) to an HF folder;
   ``import`` (HF folder) and ``reshard`` (the checkpoint) to a torch_dist save root at ``--tp``
   x ``--pp`` (default TP2 PP1 for import, TP1 PP2 for reshard), and for an MoE model at
   ``--ep`` x ``--etp`` (default EP2 with expert TP 1 for import, EP4 for reshard). "time" is
   the run's own (``--report``'s ``seconds.total``: planning, conversion, small files, marker),
   "wall" the whole process tree's, start-up and imports included.
4. Runs the baseline in one process (unless ``--skip-baseline``): for export ``baseline.py``
   (``dcp_to_torch_save`` + mapping + ``safetensors``); for import and reshard
   ``baseline_megatron.py`` (the whole source loaded into RAM, every target chunk built in RAM,
   megatron-core's default ``dist_checkpointing.save``).

With ``--repeat N`` every row is measured N times (the runs of a row back to back), and the
table shows the median time and the largest peak RSS. The page cache is dropped for the source
files (``posix_fadvise(DONTNEED)``) before each measurement, so reads come from the disk.
Prints one table per size (and, for several sizes, how each run's peak memory grew with the
weights) and the machine's load average over the runs, and writes them as JSON.
Bytes read are what the whole process tree read from storage (``ru_inblock`` of the waited-for
children); peak RSS is each rank's, from the run report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import queue
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16 << 20
TARGET = {"import": (2, 1), "reshard": (1, 2)}  # default target TP, PP
MOE_TARGET = {"import": (2, 1), "reshard": (4, None)}  # default target EP, expert TP (None: TP)


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


def weight_ranges(ckpt) -> list[tuple[Path, int, int]]:
    """The stored byte ranges of a torch_dist checkpoint's weights (its DCP ``.metadata``: file,
    offset, length of every chunk of every model tensor), in file order: the bytes an export or
    a reshard reads, the optimizer state around them left out."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex

    ranges = []
    for key, tensor in ckpt.tensors.items():
        for chunk in tensor.chunks:
            stored = MetadataIndex(chunk.source or key, torch.Size(chunk.stored_offsets or chunk.offsets))
            info = ckpt.metadata.storage_data[stored]
            ranges.append((ckpt.path / info.relative_path, info.offset, info.length))
    return sorted(ranges)


def file_ranges(files: list[Path], nbytes: int) -> list[tuple[Path, int, int]]:
    """The first ``nbytes`` of ``files`` (an HF folder's safetensors: weights and their headers)."""
    ranges = []
    for path in files:
        n = min(path.stat().st_size, nbytes - sum(r[2] for r in ranges))
        if n <= 0:
            break
        ranges.append((path, 0, n))
    return ranges


def copy_limit(folder: Path, ranges: list[tuple[Path, int, int]], scratch: Path) -> dict[str, float]:
    """The copy limit: a plain streaming copy of the source's byte ``ranges`` (file, offset,
    length; in order) into one file on the output's disk, a reader thread and the writer
    overlapped through a queue of 4 blocks, fsync'ed: what any conversion of these bytes needs
    at least."""
    drop_cache(folder)
    blocks: queue.Queue = queue.Queue(maxsize=4)

    def read() -> None:
        opened: dict[Path, Any] = {}
        try:
            for path, offset, length in ranges:
                f = opened.get(path) or opened.setdefault(path, open(path, "rb", buffering=0))
                f.seek(offset)
                while length > 0:
                    buf = bytearray(min(BLOCK, length))
                    n = f.readinto(buf)
                    if not n:
                        break
                    blocks.put(memoryview(buf)[:n])
                    length -= n
        finally:
            for f in opened.values():
                f.close()
            blocks.put(None)

    target = scratch / "limit.bin"
    start = time.perf_counter()
    reader = threading.Thread(target=read)
    reader.start()
    with open(target, "wb", buffering=0) as f:
        while (block := blocks.get()) is not None:
            f.write(block)
        os.fsync(f.fileno())
    reader.join()
    seconds = time.perf_counter() - start
    target.unlink()
    return {"seconds": seconds, "load_avg_1m": os.getloadavg()[0]}


def plan_seconds(op: str, load: Path, tp: int, pp: int) -> float:
    """Planning alone, its libraries imported (``plan_time.py``: the job planned twice in one process, the second timed)."""
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.plan_time", "--op", op, "--load", str(load),
                           "--tp", str(tp), "--pp", str(pp)], env=env(), cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["plan_s"]


def help_seconds(times: int = 3) -> float:
    """The median wall time of ``python -m distconv --help`` (a fresh interpreter each time)."""
    runs = []
    for _ in range(times):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "distconv", "--help"], env=env(), cwd=ROOT, check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return sorted(runs)[(times - 1) // 2]


def run_measured(cmd: list[str], report_path: Path, save: Path) -> dict:
    """One whole ``torchrun -m distconv ...`` process tree: its wall time, the storage bytes all its
    processes read (``ru_inblock``), and from distconv's ``--report``: the run's own time, its
    planning time and each rank's peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    report = json.loads(report_path.read_text())
    ranks = report["ranks"]
    return {
        "wall_s": wall,
        "seconds": report["seconds"]["total"],
        "plan_s": report["seconds"]["plan"],
        "read_bytes": (after.ru_inblock - before.ru_inblock) * 512,
        "rss_rank0": ranks[0]["peak_rss_bytes"],
        "rss_other_max": max((r["peak_rss_bytes"] for r in ranks[1:]), default=0),
        "read_ahead_misses": report.get("read_ahead_misses"),
        "load_avg_1m": os.getloadavg()[0],
        "report": report,
    }


def run_baseline(cmd: list[str], stats: Path, save: Path) -> dict:
    """The baseline script's run: its own figures (``--stats``) and the process's wall time."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    (r,) = json.loads(stats.read_text())
    return {"wall_s": wall, "seconds": r["seconds"], "plan_s": None, "read_bytes": r["read_bytes"], "rss_rank0": r["peak_rss"],
            "rss_other_max": 0, "read_ahead_misses": None, "load_avg_1m": os.getloadavg()[0]}


def repeated(measure_once, times: int) -> dict:
    """``measure_once()`` ``times`` times: the median time, the largest peak RSS, reads and
    read-ahead misses (the worst case is what a machine must have room for); every run kept."""
    runs = [measure_once() for _ in range(times)]
    mid = lambda key: sorted(r[key] for r in runs)[(len(runs) - 1) // 2]  # noqa: E731  (the lower median)
    worst = lambda key: None if runs[0][key] is None else max(r[key] for r in runs)  # noqa: E731
    return {"seconds": mid("seconds"), "wall_s": mid("wall_s"), "plan_s": mid("plan_s"), "read_bytes": worst("read_bytes"),
            "rss_rank0": worst("rss_rank0"), "rss_other_max": worst("rss_other_max"),
            "read_ahead_misses": worst("read_ahead_misses"), "runs": runs}


def make_inputs(opts: argparse.Namespace, gb: float) -> tuple[Path, Path | None]:
    """The Megatron checkpoint of ``gb`` GB (and for import its HF export), generated once."""
    wide = (f"-h{opts.hidden}" if opts.hidden != 1024 else "") + (f"-e{opts.experts}" if opts.experts else "")
    ckpt_root = opts.workdir / f"ckpt-{gb:g}gb{wide}{'-noopt' if opts.no_optimizer else ''}"
    if not (ckpt_root / "latest_checkpointed_iteration.txt").exists():
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                        str(ROOT / "tests/benchmarks/make_checkpoint.py"), "--out", str(ckpt_root), "--gb", str(gb),
                        "--hidden", str(opts.hidden), "--experts", str(opts.experts),
                        *(["--no-optimizer"] if opts.no_optimizer else [])],
                       env=env(), cwd=ROOT, check=True)
    if opts.op != "import":
        return ckpt_root, None
    hf = opts.workdir / f"hf-{gb:g}gb{wide}"
    if not (hf / "distconv.json").exists():
        subprocess.run([sys.executable, "-m", "distconv", "export", "--load", str(ckpt_root), "--save", str(hf),
                        "--overwrite", "--quiet"], env=env(), cwd=ROOT, check=True)
    return ckpt_root, hf


def measure(opts: argparse.Namespace, gb: float) -> dict:
    """One size: the limit, distconv at each rank count, the baseline; prints the table."""
    from distconv.megatron.source import describe

    ckpt_root, hf = make_inputs(opts, gb)
    help_s = help_seconds()
    plan_s = plan_seconds(opts.op, hf if opts.op == "import" else ckpt_root, *TARGET.get(opts.op, (1, 1)))
    ckpt = describe(ckpt_root)
    weights = ckpt.weight_bytes
    source = hf if opts.op == "import" else ckpt.path
    source_files = sorted(source.glob("*.safetensors" if opts.op == "import" else "*.distcp"))
    scratch = opts.workdir / "out"
    scratch.mkdir(parents=True, exist_ok=True)
    tp, pp = opts.tp or TARGET.get(opts.op, (1, 1))[0], opts.pp or TARGET.get(opts.op, (1, 1))[1]
    ep, etp = MOE_TARGET.get(opts.op, (1, None)) if opts.experts else (1, None)
    ep, etp = opts.ep or ep, opts.etp or etp
    experts = ["--ep", str(ep)] + (["--etp", str(etp)] if etp else [])
    target = ""
    if opts.op != "export":
        target = f" -> TP{tp} PP{pp}" + (f" EP{ep}" + (f" ETP{etp}" if etp else "") if opts.experts else "")

    ranges = file_ranges(source_files, weights) if opts.op == "import" else weight_ranges(ckpt)
    limits = [copy_limit(source, ranges, scratch) for _ in range(opts.repeat)]
    limit = dict(sorted(limits, key=lambda x: x["seconds"])[(len(limits) - 1) // 2], runs=limits)
    rows = {"copy limit (streaming copy, fsync'ed)": {
        "seconds": limit["seconds"], "wall_s": limit["seconds"], "plan_s": None, "read_bytes": weights,
        "rss_rank0": 0, "rss_other_max": 0, "read_ahead_misses": None, "runs": limits}}

    def once(measure_one, *args):
        def go() -> dict:
            drop_cache(source)
            result = measure_one(*args)
            shutil.rmtree(args[-1])
            return result
        return go

    runs = [(n, min(opts.writers, n), "saver") for n in opts.ranks]
    if opts.op == "export" and 2 in opts.ranks and opts.writers == 1:
        runs += [(2, 2, "saver"), (2, 2, "writer")]  # --writers 2 at 2 ranks beside --writers 1, and gathering nothing
    for n, writers, read_at in runs:
        report = scratch / f"report{n}.json"
        save = scratch / f"{opts.op}{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "distconv",
               opts.op, "--load", str(ckpt_root if opts.op == "export" else hf or ckpt_root), "--save", str(save),
               "--overwrite", "--quiet", "--report", str(report), "--window", opts.window]
        if opts.op == "export":
            cmd += ["--writers", str(writers), "--read-at", read_at, "--dtype", opts.dtype]
        else:
            cmd += ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                    "--expert-model-parallel-size", str(ep), *(["--expert-tensor-parallel-size", str(etp)] if etp else []),
                    *(["--dtype", opts.dtype] if opts.op == "import" else [])]
        name = f"distconv {opts.op}{target}, {n} rank(s)" + (
            f", --writers {writers}" + (" --read-at writer" if read_at == "writer" else "") if opts.op == "export" else "")
        rows[name] = repeated(once(run_measured, cmd, report, save), opts.repeat)
    base_name = None
    if not opts.skip_baseline:
        stats = scratch / "baseline.json"
        save = scratch / "baseline"
        if opts.op == "export":
            base_name = "baseline (dcp_to_torch_save + 1 process)"
            cmd = [sys.executable, str(ROOT / "tests/benchmarks/baseline.py"), "--load", str(ckpt.path),
                   "--save", str(save), "--stats", str(stats)]
        else:
            base_name = "baseline (all in RAM + mcore save, 1 process)"
            cmd = [sys.executable, str(ROOT / "tests/benchmarks/baseline_megatron.py"), "--op", opts.op,
                   "--load", str(hf or ckpt_root), "--save", str(save), "--stats", str(stats), "--tp", str(tp), "--pp", str(pp),
                   *experts]
        rows[base_name] = repeated(once(run_baseline, cmd, stats, save), opts.repeat)

    base = rows.get(base_name) if base_name else None
    shape = f"{ckpt.args.num_layers} layers of hidden {ckpt.args.hidden_size}" + (
        f", {opts.experts} experts each" if opts.experts else "")
    print(f"\n{opts.op}{target}: source {source} ({shape}: {weights / 1e9:.2f} GB weights, {ckpt.other_bytes / 1e9:.2f} GB optimizer "
          f"state in the checkpoint); copy limit {weights / limit['seconds'] / 1e9:.2f} GB/s; --window {opts.window}; "
          f"{opts.repeat} run(s) each: median time, largest peak RSS; `distconv --help`: {help_s:.2f} s; planning alone "
          f"(imports done, 1 rank): {plan_s:.2f} s")
    print(f"{'run':60} {'time s':>7} {'wall s':>7} {'wall-time':>9} {'plan s':>6} {'GB/s':>6} {'read/weights':>12} "
          f"{'rss r0 GB':>9} {'rss max other':>13} {'x copy':>6} {'speedup':>7} {'mem ratio':>9}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    table = []
    for name, r in rows.items():
        row = {
            "run": name, **r, "gb_per_s": weights / r["seconds"] / 1e9, "read_ratio": r["read_bytes"] / weights,
            "x_copy_limit": r["seconds"] / limit["seconds"],
            "speedup_vs_baseline": base["seconds"] / r["seconds"] if base else None,
            "memory_ratio_vs_baseline": base["rss_rank0"] / r["rss_rank0"] if base and r["rss_rank0"] else None,
        }
        table.append(row)
        print(f"{name:60} {r['seconds']:7.1f} {r['wall_s']:7.1f} {r['wall_s'] - r['seconds']:9.1f} {fmt(r['plan_s'], '6.2f')} "
              f"{row['gb_per_s']:6.2f} {row['read_ratio']:12.3f} {r['rss_rank0'] / 1e9:9.2f} {r['rss_other_max'] / 1e9:13.2f} "
              f"{row['x_copy_limit']:6.2f} {fmt(row['speedup_vs_baseline'], '7.2f')} {fmt(row['memory_ratio_vs_baseline'], '9.1f')}")
    loads = [run["load_avg_1m"] for r in rows.values() for run in r.get("runs", [])]
    if loads:
        print(f"load average (1 min) after each run: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs")
    return {"gb": gb, "model": shape, "source": str(source), "target": target.removeprefix(" -> ") or None, "weights_bytes": weights,
            "optimizer_bytes": ckpt.other_bytes, "copy_limit": limit, "help_s": help_s, "plan_alone_s": plan_s, "rows": table}


def growth(sizes: list[dict]) -> list[dict]:
    """Per run: peak RSS (rank 0, and the largest other rank) at the smallest and largest size,
    and how many bytes of peak each added byte of weights cost."""
    small, large = sizes[0], sizes[-1]
    dw = large["weights_bytes"] - small["weights_bytes"]
    out = []
    print(f"\npeak RSS against weights ({small['weights_bytes'] / 1e9:.2f} -> {large['weights_bytes'] / 1e9:.2f} GB)")
    print(f"{'run':52} {'r0 small':>8} {'r0 large':>8} {'r0 slope':>8} {'other small':>11} {'other large':>11} {'other slope':>11}")
    for a in small["rows"]:
        b = next((r for r in large["rows"] if r["run"] == a["run"]), None)
        if b is None or not a["rss_rank0"]:
            continue
        row = {"run": a["run"], "rss_rank0": [a["rss_rank0"], b["rss_rank0"]],
               "rss_other_max": [a["rss_other_max"], b["rss_other_max"]],
               "rank0_slope": (b["rss_rank0"] - a["rss_rank0"]) / dw if dw else None,
               "other_slope": (b["rss_other_max"] - a["rss_other_max"]) / dw if dw and a["rss_other_max"] else None}
        out.append(row)
        other = (f"{a['rss_other_max'] / 1e9:11.2f} {b['rss_other_max'] / 1e9:11.2f} {row['other_slope']:11.2f}"
                 if row["other_slope"] is not None else f"{'-':>11} {'-':>11} {'-':>11}")
        print(f"{a['run']:52} {a['rss_rank0'] / 1e9:8.2f} {b['rss_rank0'] / 1e9:8.2f} {row['rank0_slope']:8.2f} {other}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["export", "import", "reshard"], default="export",
                        help="export: Megatron -> HF; import: HF -> Megatron; reshard: Megatron -> Megatron")
    parser.add_argument("--gb", type=float, nargs="+", default=[2.0], help="weight size(s) of the generated model (GB)")
    parser.add_argument("--ranks", type=int, nargs="+", help="distconv's world sizes (default 1 2 4; 1 2 for import, reshard)")
    parser.add_argument("--tp", type=int, help="import / reshard: target TP (default 2 for import, 1 for reshard)")
    parser.add_argument("--pp", type=int, help="import / reshard: target PP (default 1 for import, 2 for reshard)")
    parser.add_argument("--writers", type=int, default=1, help="export: distconv's --writers")
    parser.add_argument("--window", default="256MiB", help="distconv's --window")
    parser.add_argument("--dtype", default="auto", help="distconv's --dtype (e.g. fp8 for export)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distconv-bench"))
    parser.add_argument("--skip-baseline", action="store_true", help="e.g. when the model does not fit in RAM")
    parser.add_argument("--no-optimizer", action="store_true", help="generate the checkpoint without Adam moments")
    parser.add_argument("--hidden", type=int, default=1024,
                        help="hidden size of the generated model (wider: larger chunks, fewer layers)")
    parser.add_argument("--experts", type=int, default=0,
                        help="generate a Mixtral-shaped MoE model with this many experts per layer (0: dense)")
    parser.add_argument("--ep", type=int, help="import / reshard of --experts: target EP (default 2 for import, 4 for reshard)")
    parser.add_argument("--etp", type=int, help="import / reshard of --experts: target expert TP (default 1 for import, TP for reshard)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every row this many times (median time, largest peak RSS; all runs in the JSON)")
    parser.add_argument("--json", type=Path, help="also write the tables here")
    opts = parser.parse_args()
    opts.ranks = opts.ranks or ([1, 2, 4] if opts.op == "export" else [1, 2])
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")  # megatron-core's import-time notes about missing Apex / TE
    sizes = [measure(opts, gb) for gb in sorted(opts.gb)]
    result = {"op": opts.op, "window": opts.window, "dtype": opts.dtype, "repeat": opts.repeat, "hidden": opts.hidden,
              "experts": opts.experts, "sizes": sizes}
    if len(sizes) > 1:
        result["growth"] = growth(sizes)
    out = opts.json or opts.workdir / (f"bench-{opts.op}-{'-'.join(f'{gb:g}' for gb in sorted(opts.gb))}gb-h{opts.hidden}"
                                       f"{f'-e{opts.experts}' if opts.experts else ''}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
