"""One measured ``distconv verify`` in this process: time, disk bytes read and peak RSS.

    python tests/benchmarks/verify_stats.py --load CKPT --hf HF --stats STATS.json [--sequences 4 --length 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from tests.benchmarks.stats import current_rss, io_counters, warm_imports


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    opts = parser.parse_args()
    from distconv.verify import verify

    warm_imports()
    rss_before = current_rss()
    before, start = io_counters(), time.perf_counter()
    result = verify(opts.load, opts.hf, sequences=opts.sequences, length=opts.length)
    seconds, after = time.perf_counter() - start, io_counters()
    with open(opts.stats, "w") as f:
        json.dump({"seconds": seconds, "read_bytes": after["read_bytes"] - before["read_bytes"],
                   "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before": rss_before,
                   "ok": result["ok"], "max_abs_diff": result["max_abs_diff"]}, f)


if __name__ == "__main__":
    main()
