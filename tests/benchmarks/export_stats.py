"""One measured distconv export under torchrun: time, disk bytes read and peak RSS per rank.

    torchrun --nproc-per-node N tests/benchmarks/export_stats.py --load CKPT --save OUT --stats STATS.json [--writers K]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch.distributed as dist

import distconv


def io_counters() -> dict[str, int]:
    """This process's ``/proc/self/io``: read_bytes/write_bytes count real storage I/O."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--window", default="256MiB")
    parser.add_argument("--dtype", default="auto")
    opts = parser.parse_args()
    dist.init_process_group("gloo")
    before, start = io_counters(), time.perf_counter()
    distconv.export(opts.load, opts.save, overwrite=True, quiet=True, writers=opts.writers, window=opts.window,
                    dtype=opts.dtype)
    seconds, after = time.perf_counter() - start, io_counters()
    mine = {
        "rank": dist.get_rank(),
        "seconds": seconds,
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "write_bytes": after["write_bytes"] - before["write_bytes"],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        with open(opts.stats, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
