"""The post-training hook as a job runs it at its end, then the job exits.

    torchrun --nproc-per-node N tests/hook_jobs.py LOAD OUT RUNS

Each rank calls ``init_process_group("gloo")`` before anything imports torch's checkpoint
modules (distconv imports them inside ``export``), runs ``distconv.export`` RUNS times into
fresh folders ``OUT/run{i}`` (writers alternating 1 and 2), then one export that fails mid-run
on rank 0 alone (its output file may not grow past ``FAIL_AT`` bytes, the run reads in many
small batches) followed by an ``all_reduce`` on the default group, then ``all_gather_object``
and ``destroy_process_group()``, as a training job ends.

Between the two, one export fails inside the gather on rank 0 alone: its ``batch_isend_irecv``
raises CUDA's out-of-memory error at its third call (as a writer whose GPU is full after
training would, posting its receives), through ``oom_on_rank0``, a patch of torch undone on
exit. Every rank must raise the same ``DistconvError`` within seconds, though ``timeout_s`` is
60: the peers learn rank 0's message from the job's store, they do not wait it out.

Before exiting it writes ``OUT/rank{R}.json``: the Python threads other than the main one
alive after each export, the failed exports' errors (and when the gather's was raised, on the
shared clock), the threads alive after them and the ``all_reduce`` result, and the gloo threads
alive after ``destroy_process_group()``. tests/test_hook.py also requires the process to exit 0.
"""

import contextlib
import json
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

import distconv

FAIL_AT = 200_000  # bytes: about a quarter of the output file


def gloo_threads() -> list[str]:
    """Names of this process's native threads that belong to a gloo process group."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(n for n in names if "gloo" in n)


def gloo_threads_ending(within: float = 10.0) -> list[str]:
    """``gloo_threads()`` once they are gone, or as they are ``within`` seconds from now: a destroyed
    group's threads are joined as its last reference goes, which a loaded machine may delay a
    moment; a group still referenced somewhere keeps them for good."""
    deadline = time.monotonic() + within
    while (names := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return names


def other_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t is not threading.main_thread()]


def failed_export(load: str, out: Path, rank: int) -> str | None:
    """An export that fails on rank 0 alone, mid-run: writing its output file past ``FAIL_AT``
    bytes fails (EFBIG). Returns the error's type and message (None: no error)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FAIL_AT, hard))
    try:
        distconv.export(load, out, quiet=True, window="1KB", timeout_s=60)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    return None


OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (raised by tests/hook_jobs.py)"


@contextlib.contextmanager
def oom_on_rank0(rank: int, at_call: int = 3):
    """On rank 0, ``torch.distributed.batch_isend_irecv`` raises ``torch.OutOfMemoryError`` at its
    ``at_call``-th call (the others pass through); put back on exit."""
    real = dist.batch_isend_irecv
    calls = [0]

    def failing(ops):
        calls[0] += 1
        if calls[0] == at_call:
            raise torch.OutOfMemoryError(OOM)
        return real(ops)

    if rank == 0:
        dist.batch_isend_irecv = failing
    try:
        yield
    finally:
        dist.batch_isend_irecv = real


def gather_fault_export(load: str, out: Path, rank: int) -> dict:
    """An export whose gather fails on rank 0 alone; its error and when it was raised (time.time())."""
    with oom_on_rank0(rank):
        try:
            distconv.export(load, out, quiet=True, window="1KB", timeout_s=60)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}", "raised_at": time.time()}
    return {"error": None, "raised_at": time.time()}


def main() -> None:
    load, out, runs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    assert "torch.distributed.nn" not in sys.modules, "the hook must be the first to import torch's checkpoint modules"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    after_export = []
    for run in range(runs):
        distconv.export(load, out / f"run{run}", quiet=True, writers=1 + run % 2)
        after_export.append(other_threads())
    error = failed_export(load, out / "failed", rank)
    gather_fault = gather_fault_export(load, out / "gather_fault", rank)
    threads_after_failure = other_threads()
    total = torch.tensor([float(rank + 1)] * 4)
    dist.all_reduce(total)  # the caller's next collective must pair with its peers' one
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rank)
    dist.destroy_process_group()
    result = {"threads_after_export": after_export, "failure": error, "gather_fault": gather_fault,
              "threads_after_failure": threads_after_failure,
              "all_reduce": total.tolist(), "gloo_threads_after_destroy": gloo_threads_ending()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
