"""Planning time of one conversion, its libraries already imported: in one process the job is
planned once (imports, caches), then again, timed (what a run's ``seconds.plan`` holds besides
the first imports of transformers and megatron-core, which a run now makes when it first needs them).

    python -m tests.benchmarks.plan_time --op export|import|reshard --load SRC [--world N] [--tp T --pp P]

Prints the seconds as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

from distconv.engine.run import collector_paused


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", choices=["export", "import", "reshard"], default="export")
    parser.add_argument("--load", required=True)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    opts = parser.parse_args()
    if opts.op == "export":
        from distconv.directions.export import ExportJob, ExportOptions

        plan = lambda: ExportJob(opts.load, ExportOptions(save="/nonexistent/plan-only"), opts.world)  # noqa: E731
    else:
        from distconv.directions.to_megatron import MegatronOptions

        options = MegatronOptions(save="/nonexistent/plan-only", tp=opts.tp, pp=opts.pp)
        if opts.op == "import":
            from distconv.directions.import_ import ImportJob
            from distconv.families import HUB_TYPES
            from distconv.hf.source import open_hf

            plan = lambda: ImportJob(open_hf(opts.load, HUB_TYPES), options, opts.world)  # noqa: E731
        else:
            from distconv.directions.reshard import ReshardJob

            plan = lambda: ReshardJob(opts.load, options, opts.world)  # noqa: E731
    with collector_paused():  # as a run plans
        plan()
        start = time.perf_counter()
        plan()
    print(json.dumps({"plan_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
