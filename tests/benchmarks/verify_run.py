"""``distconv verify`` benchmark: its peak memory against the model's size, and its time against the disk.

    python -m tests.benchmarks.verify_run [--gb 2 8] [--hidden 1024] [--repeat 1] [--workdir DIR] [--json OUT]

For each ``--gb`` size, the generated checkpoint of ``tests.benchmarks.run`` (Llama-shaped, bf16,
saved at TP2 PP2; here without optimizer state) and the HF folder distconv exports from it (both
made once, kept in ``--workdir``). Then, in the same run: the disk's limit for what verify has to
read (plain sequential reads of the checkpoint's weight bytes from its ``.distcp`` files and of the
export's ``.safetensors``), and ``distconv verify`` in one fresh process (4 sequences of 32 tokens,
its default), the page cache dropped for both folders first. Reported: time (the call) and wall
(with interpreter start-up and imports), bytes read from storage against the two folders' weights,
peak RSS (start-up included) and the RSS after imports. For several sizes, how the peak grew
against one decoder layer's fp32 bytes (the issue's bound: less than one layer's worth), from the
largest and from the median peaks of ``--repeat`` runs, with how far one size's peaks spread.
``--hidden 128`` makes deep, narrow models (``--gb 0.06 0.24``: 102 and 524 layers of 0.85 MB in
fp32), where what verify costs per layer, not per byte, shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from tests.benchmarks.run import BLOCK, ROOT, drop_cache, env, make_inputs


def read_limit(files: list[Path], folders: list[Path]) -> float:
    """Seconds to read ``files`` whole, sequentially, from storage."""
    for folder in folders:
        drop_cache(folder)
    buf = bytearray(BLOCK)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def measure(opts: argparse.Namespace, gb: float) -> dict:
    from distconv.megatron.source import describe

    ckpt_root, hf = make_inputs(argparse.Namespace(**{**vars(opts), "op": "import"}), gb)
    ckpt = describe(ckpt_root)
    weights = ckpt.weight_bytes
    hf_files = sorted(hf.glob("*.safetensors"))
    hf_bytes = sum(f.stat().st_size for f in hf_files)
    layer_fp32 = sum(t.nbytes for k, t in ckpt.tensors.items() if k.startswith("decoder.layers.")) * 2 // ckpt.args.num_layers
    # the limit reads the weights' bytes of the checkpoint (its files also hold nothing else here) and the export
    limit = read_limit(sorted(ckpt.path.glob("*.distcp")) + hf_files, [ckpt.path, hf])
    stats = opts.workdir / "verify-stats.json"
    runs = []
    for _ in range(opts.repeat):
        drop_cache(ckpt.path)
        drop_cache(hf)
        cmd = [sys.executable, str(ROOT / "tests/benchmarks/verify_stats.py"), "--load", str(ckpt_root), "--hf", str(hf),
               "--stats", str(stats)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        runs.append({**json.loads(stats.read_text()), "wall_s": wall, "load_avg_1m": os.getloadavg()[0]})
    run = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    peaks = sorted(r["peak_rss"] for r in runs)
    peak = peaks[-1]
    row = {"gb": gb, "layers": ckpt.args.num_layers, "hidden": ckpt.args.hidden_size, "weights_bytes": weights,
           "hf_bytes": hf_bytes, "layer_fp32_bytes": layer_fp32, "limit_s": limit, "seconds": run["seconds"],
           "wall_s": run["wall_s"], "x_limit": run["seconds"] / limit, "read_ratio": run["read_bytes"] / (weights + hf_bytes),
           "peak_rss": peak, "median_peak_rss": peaks[(len(peaks) - 1) // 2], "rss_before": run["rss_before"], "ok": run["ok"], "max_abs_diff": run["max_abs_diff"],
           "runs": runs}
    print(f"{gb:g} GB ({row['layers']} layers of hidden {row['hidden']}; one layer {layer_fp32 / 1e6:.0f} MB in fp32): "
          f"limit {limit:.1f} s, verify {run['seconds']:.1f} s (wall {run['wall_s']:.1f} s, x limit {row['x_limit']:.2f}), "
          f"read {row['read_ratio']:.3f} x the weights of both, peak RSS {peak / 1e9:.2f} GB "
          f"(after imports {run['rss_before'] / 1e9:.2f} GB), max |diff| {run['max_abs_diff']:.2e}, ok {run['ok']}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, nargs="+", default=[2.0, 8.0], help="weight sizes of the generated models (GB)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the generated models")
    parser.add_argument("--repeat", type=int, default=1, help="verify runs per size (median time, largest peak RSS)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distconv-bench"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    opts = parser.parse_args()
    opts.experts, opts.no_optimizer = 0, True
    opts.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    sizes = [measure(opts, gb) for gb in sorted(opts.gb)]
    result: dict = {"sizes": sizes}
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        layer = large["layer_fp32_bytes"]
        grew = large["peak_rss"] - small["peak_rss"]
        grew_median = large["median_peak_rss"] - small["median_peak_rss"]
        spread = max(max(r["peak_rss"] for r in size["runs"]) - min(r["peak_rss"] for r in size["runs"]) for size in sizes)
        result["growth"] = {"peak_rss_bytes": grew, "layer_fp32_bytes": layer, "in_layers": grew / layer,
                            "median_peak_rss_bytes": grew_median, "median_in_layers": grew_median / layer,
                            "largest_spread_bytes": spread}
        print(f"peak RSS grew {grew / 1e6:.0f} MB from {small['gb']:g} to {large['gb']:g} GB: "
              f"{grew / layer:.2f} of one layer's fp32 bytes (largest peaks; medians: {grew_median / 1e6:.0f} MB, "
              f"{grew_median / layer:.2f}); one size's peaks spread over up to {spread / 1e6:.0f} MB")
    wide = f"-h{opts.hidden}" if opts.hidden != 1024 else ""  # as make_inputs names the inputs
    out = opts.json or opts.workdir / f"bench-verify-{'-'.join(f'{gb:g}' for gb in sorted(opts.gb))}gb{wide}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
