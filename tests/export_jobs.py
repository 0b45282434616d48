"""Run many exports in one torchrun launch, through the Python API inside an existing group.

    torchrun --nproc-per-node N tests/export_jobs.py JOBS.json RESULTS.json

The test suite uses it to keep torchrun launches few. It also exercises the post-training
hook contract: ``distconv.export`` must reuse this script's process group and leave it alive.
"""

import json
import sys

import torch.distributed as dist

import distconv


def main() -> None:
    jobs_path, results_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    results = []
    for job in json.load(open(jobs_path)):
        try:
            report = distconv.export(**job, quiet=True)
            results.append({"ok": True, "report": report})
        except distconv.DistconvError as e:
            results.append({"ok": False, "error": str(e)})
        results[-1]["group_alive"] = dist.is_initialized()
    if dist.get_rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
