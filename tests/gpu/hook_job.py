"""The post-training hook inside a job that owns an NCCL group (run by tests/gpu/check.py).

    torchrun --nproc-per-node 1 tests/gpu/hook_job.py LOAD OUT BACKEND      (BACKEND: nccl, or gloo for the dry run)

As a training job would: ``init_process_group(BACKEND)``, ``torch.cuda.set_device(LOCAL_RANK)``
(nccl), then ``distconv.export`` twice: into ``OUT/ok`` (must succeed) and from a checkpoint
path that does not exist into ``OUT/bad`` (must raise ``DistconvError``). Then the job's own
group must still work: an ``all_reduce`` on a tensor on the job's device (CUDA for nccl), a
barrier, ``destroy_process_group()``. Each rank writes ``OUT/rank{R}.json``; the job must exit 0.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import distconv


def main() -> None:
    load, out, backend = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {"backend": str(dist.get_backend()), "world": world}
    try:
        # --device cuda (nccl) must use the caller's GPU or fail: no silent fallback to gloo
        report = distconv.export(load, out / "ok", quiet=True, device="cuda" if backend == "nccl" else "cpu")
        result["first"] = {"ok": True, "peak_cuda_bytes": report["ranks"][rank].get("peak_cuda_bytes")}
    except Exception as e:  # recorded, judged by check.py
        result["first"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    result["group_after_first"] = dist.is_initialized()
    try:
        distconv.export(out / "no_such_checkpoint", out / "bad", quiet=True)
        result["second"] = {"raised": None, "error": "no exception"}
    except distconv.DistconvError as e:
        result["second"] = {"raised": "DistconvError", "error": str(e)}
    except Exception as e:
        result["second"] = {"raised": type(e).__name__, "error": str(e)}
    result["group_after_second"] = dist.is_initialized()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["tensor_device"] = str(t.device)
    result["all_reduce"] = t.tolist()
    result["expected"] = [world * (world + 1) / 2] * 4
    dist.barrier()
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
