"""One measured distconv conversion under torchrun: time, disk bytes read and peak RSS per rank.

    torchrun --nproc-per-node N tests/benchmarks/export_stats.py --load SRC --save OUT --stats STATS.json \
        [--op export|import|reshard] [--writers K] [--window 256MiB] [--tp 2 --pp 1 --ep 1 --etp E]

``--op export`` (the default) runs ``distconv.export``; ``import`` and ``reshard`` run
``distconv.import_hf`` / ``distconv.reshard`` to ``--tp`` x ``--pp`` (x ``--ep`` x ``--etp``). Besides the figures taken
here, each rank's row carries its resident memory just before the call, after importing what
every conversion imports (the runtime's share of the peak) and, for import and reshard, the run report's per-rank ``peak_rss_bytes`` and measured
``bytes_read`` and the report's ``read_ahead_misses``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import time

import torch.distributed as dist

import distconv


def io_counters() -> dict[str, int]:
    """This process's ``/proc/self/io``: read_bytes/write_bytes count real storage I/O."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def current_rss() -> int:
    """This process's resident set size now (``/proc/self/statm``), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def warm_imports() -> None:
    """Import what every conversion loads, so that ``rss_before`` is the same runtime in each script."""
    for module in ("megatron.core.dist_checkpointing", "safetensors.torch", "torch.distributed.checkpoint", "transformers"):
        importlib.import_module(module)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", choices=["export", "import", "reshard"], default="export")
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--window", default="256MiB")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tp", type=int, default=1, help="import / reshard: the target's TP")
    parser.add_argument("--pp", type=int, default=1, help="import / reshard: the target's PP")
    parser.add_argument("--ep", type=int, default=1, help="import / reshard: the target's EP")
    parser.add_argument("--etp", type=int, help="import / reshard: the target's expert TP (default: TP)")
    opts = parser.parse_args()
    dist.init_process_group("gloo")
    warm_imports()
    rss_before = current_rss()
    before, start = io_counters(), time.perf_counter()
    if opts.op == "export":
        report = distconv.export(opts.load, opts.save, overwrite=True, quiet=True, writers=opts.writers,
                                 window=opts.window, dtype=opts.dtype)
    else:
        call = distconv.import_hf if opts.op == "import" else distconv.reshard
        report = call(opts.load, opts.save, overwrite=True, quiet=True, window=opts.window, tp=opts.tp, pp=opts.pp,
                      ep=opts.ep, etp=opts.etp, **({"dtype": opts.dtype} if opts.op == "import" else {}))
    seconds, after = time.perf_counter() - start, io_counters()
    mine = {
        "rank": dist.get_rank(),
        "seconds": seconds,
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "write_bytes": after["write_bytes"] - before["write_bytes"],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before": rss_before,
    }
    if opts.op != "export":
        ranks = {r["rank"]: r for r in report["ranks"]}
        mine.update(report_peak_rss=ranks[dist.get_rank()]["peak_rss_bytes"],
                    report_bytes_read=ranks[dist.get_rank()]["bytes_read"],
                    read_ahead_misses=report["read_ahead_misses"])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(opts.stats, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
