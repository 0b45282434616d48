"""NCCL on one GPU through distconv's own gather code (run by tests/gpu/check.py).

    python tests/gpu/loopback.py gloo RESULT.json [--rounds 200] [--watchdog-wait S]
    torchrun --nproc-per-node 1 tests/gpu/loopback.py nccl RESULT.json [...]

At world size 1 distconv makes no data group and sends nothing, so a one-GPU export proves
nothing about NCCL. Here rank 0 is its own peer, on ``cuda:0``:

- **loopback**: a data group made by ``engine.comm._data_group`` (NCCL, its communicator made
  eagerly on ``cuda:0``), under a default group of gloo (``gloo``: a plain process) or of NCCL
  (``nccl``: torchrun, as a training job has). Each of ``--rounds`` rounds packs CPU tensors of
  varied dtypes and sizes (odd sizes too, so the 16-byte alignment matters) with ``_pack``,
  sends the message to itself and receives it in one ``batch_isend_irecv``, waits with
  ``Comm.wait``, stages it through ``Comm.staging`` (pinned by ``cudaHostRegister``) and unpacks
  it with ``_unpack``: every byte must come back (bytes compared, so NaN payloads count too).
- **staging**: after ``clear()`` no page is left registered (``HostBuffers.pinned_bytes``).
- **hook state**: ``Comm.setup`` inside the existing default group (the hook) leaves the peak
  memory statistics as they were, and the current device as it was.
- **stalled teardown** (item 1 of issue 26): a receive from itself that no send matches stalls
  the GPU stream; ``Comm.wait`` must raise ``DistconvError`` within its deadline (4 s), and
  ``Comm.close(clean=False)`` must abort the data group and return, after which the device
  synchronizes (the stalled kernel is gone). With ``--watchdog-wait S`` the process then lives
  S seconds more, past NCCL's watchdog timeout for that group (deadline + 60 s): a watchdog that
  still saw the transfer would kill the process (SIGABRT), which check.py sees in the exit status.

RESULT.json holds each part's outcome and figures. Without CUDA it writes
``{"skipped": "..."}`` and exits 0 (the CPU suite checks that it imports and says so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distconv.engine.comm import Comm, _data_group, _pack, _packed_size, _unpack  # noqa: E402
from distconv.engine.plan import Read  # noqa: E402
from distconv.errors import DistconvError  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64]
STALL_DEADLINE_S = 4.0


def _reads(rng: random.Random, dtype: torch.dtype) -> list[Read]:
    """1 to 5 boxes of 1 to ~1.5M elements, 1-D to 3-D."""
    reads = []
    for i in range(rng.randint(1, 5)):
        n = rng.choice([1, 3, 7, 17, 255, 4099, 65_537, rng.randint(1, 1_500_000)])
        shape = (n,) if n % 2 or n < 64 else (2, n // 2) if n % 4 else (2, 2, n // 4)
        elements = 1
        for s in shape:
            elements *= s
        reads.append(Read(i, 0, f"t{i}", shape, (0,) * len(shape), shape, tuple(slice(0, s) for s in shape),
                          elements * dtype.itemsize))
    return reads


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as ``dtype``: every bit pattern, NaNs included."""
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def loopback(comm: Comm, rounds: int) -> dict:
    rng, gen = random.Random(26), torch.Generator().manual_seed(26)
    sent = 0
    start = time.monotonic()
    for r in range(rounds):
        dtype = DTYPES[r % len(DTYPES)]
        reads = _reads(rng, dtype)
        tensors = [_tensor(read.sizes, dtype, gen) for read in reads]
        packed = _pack(tensors, reads, dtype, comm.device)
        recv = torch.empty(_packed_size(reads, dtype), dtype=torch.uint8, device=comm.device)
        ops = [dist.P2POp(dist.isend, packed, 0, group=comm.data), dist.P2POp(dist.irecv, recv, 0, group=comm.data)]
        comm.wait(dist.batch_isend_irecv(ops))
        host = comm.staging.copy(0, recv)
        for read, want, got in zip(reads, tensors, _unpack(host, reads, dtype)):
            if got.shape != want.shape or not torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)):
                return {"ok": False, "round": r, "dtype": str(dtype), "shape": list(read.sizes), "sent_bytes": sent}
        sent += packed.numel()
    pinned = comm.staging.pinned_bytes()
    comm.staging.clear()
    return {"ok": True, "rounds": rounds, "sent_bytes": sent, "seconds": round(time.monotonic() - start, 3),
            "pinned_bytes_before_clear": pinned, "pinned_bytes_after_clear": comm.staging.pinned_bytes(),
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(comm.device)}


def stalled(comm: Comm) -> dict:
    """A receive no send matches: ``Comm.wait`` must raise in time, the abort must return."""
    comm.timeout_s = STALL_DEADLINE_S
    recv = torch.empty(1 << 20, dtype=torch.uint8, device=comm.device)
    works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, recv, 0, group=comm.data)])
    start = time.monotonic()
    out: dict = {}
    try:
        comm.wait(works)
        out["raised"] = None
    except DistconvError as e:
        out["raised"] = str(e)
    out["raised_after_s"] = round(time.monotonic() - start, 3)
    del works
    start = time.monotonic()
    closer = threading.Thread(target=comm.close, kwargs={"clean": False}, daemon=True)
    closer.start()
    closer.join(60)
    out["close_returned"] = not closer.is_alive()
    out["close_s"] = round(time.monotonic() - start, 3)
    syncer = threading.Thread(target=torch.cuda.synchronize, args=(comm.device,), daemon=True)
    syncer.start()
    syncer.join(30)
    out["synchronized_after_abort"] = not syncer.is_alive()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("default", choices=["gloo", "nccl"], help="the default group's backend")
    parser.add_argument("result", type=Path)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--watchdog-wait", type=float, default=0.0)
    opts = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        opts.result.write_text(json.dumps({"skipped": "no CUDA device: nothing to measure"}))
        print("SKIP loopback: no CUDA device", flush=True)
        return 0
    version = torch.cuda.nccl.version()
    result: dict = {"default": opts.default, "torch": torch.__version__,
                    "nccl": str(version) if isinstance(version, int) else ".".join(map(str, version))}
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    if opts.default == "gloo":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("nccl", device_id=device)
    # the hook's view: Comm.setup in a group that exists keeps the caller's statistics and device
    scratch = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    del scratch
    peak_before = torch.cuda.max_memory_allocated(device)
    hook = Comm.setup("cuda", timeout_s=60)
    result["hook"] = {"device": str(hook.device), "peak_before": peak_before,
                      "peak_after_setup": torch.cuda.max_memory_allocated(device),
                      "current_device_after": torch.cuda.current_device()}
    hook.close(clean=True)
    # world 1 makes no data group: make the one a multi-rank run makes, on this GPU
    # its timeout is the stall's deadline: NCCL's watchdog fires at that + 60 s (_WATCHDOG_MARGIN)
    data = _data_group(device, datetime.timedelta(seconds=STALL_DEADLINE_S))
    comm = Comm(0, 1, device, False, None, data, timeout_s=60)
    try:
        result["loopback"] = loopback(comm, opts.rounds)
    except Exception as e:  # recorded, judged by check.py
        result["loopback"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    result["stalled"] = stalled(comm)
    opts.result.write_text(json.dumps(result, indent=1))
    if opts.watchdog_wait:
        time.sleep(opts.watchdog_wait)
    result["alive_after_watchdog_wait_s"] = opts.watchdog_wait
    opts.result.write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
