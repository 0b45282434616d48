"""The post-training hook must leave nothing running: the job that called it must exit 0.

distconv imports torch's checkpoint modules inside ``export``, so in a job they arrive after
``init_process_group``. Anything the export leaves behind (a reader or writer thread, a
process group, a reference that keeps the job's default group from being freed) runs on into
interpreter exit, where a gloo worker thread can abort the process (SIGABRT, "terminate
called without an active exception") after a successful export. The abort is a race at exit,
so besides several exits the test also asserts its cause directly: no thread outlives
``export`` and no gloo thread outlives the job's ``destroy_process_group()``.

An export that fails on one rank mid-run must also end on every rank with ``DistconvError``
and leave no thread behind: a reader thread left inside a ``dist_checkpointing`` load (a
collective on the job's default group) would pair with the job's next collective. So must one
whose gather fails on one rank (CUDA's out-of-memory error where the writer posts its
receives): every rank raises that rank's message within seconds (the distributed timeout is
60 s), and the job's group still works after it (the ``all_reduce``).
"""

from __future__ import annotations

import json

from distconv.engine import marker
from distconv.hf import sink as hf_sink

from conftest import ROOT, torchrun
from fixtures.build import layout_dir

LAUNCHES = 2  # process exits per rank
RUNS = 2  # exports per launch


def test_hook_exports_then_the_job_exits_cleanly(built, tmp_path):
    ckpt = layout_dir(built, "llama", 2, 1)
    for launch in range(LAUNCHES):
        out = tmp_path / f"launch{launch}"
        out.mkdir()
        proc = torchrun(2, str(ROOT / "tests" / "hook_jobs.py"), str(ckpt), str(out), str(RUNS), timeout=300, check=False)
        assert proc.returncode == 0, f"launch {launch} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
        for rank in range(2):
            result = json.loads((out / f"rank{rank}.json").read_text())
            assert result["threads_after_export"] == [[]] * RUNS, f"rank {rank}: threads left running by export()"
            assert result["gloo_threads_after_destroy"] == [], f"rank {rank}: the default group outlived destroy_process_group()"
            assert result["failure"] and result["failure"].startswith("DistconvError: ") and "File too large" in result["failure"], \
                f"rank {rank}: {result['failure']}"
            assert result["threads_after_failure"] == [], f"rank {rank}: threads left running by the failed export()"
            assert result["all_reduce"] == [3.0] * 4, f"rank {rank}: the job's next collective went wrong"
        faults = [json.loads((out / f"rank{rank}.json").read_text())["gather_fault"] for rank in range(2)]
        errors = {f["error"] for f in faults}
        assert len(errors) == 1, f"the ranks raised different errors for one failed gather: {faults}"
        error = errors.pop()
        assert error and error.startswith("DistconvError: out of memory") and "CUDA out of memory" in error, error
        assert "(on rank" not in error, error  # rank 0's own message
        spread = max(f["raised_at"] for f in faults) - min(f["raised_at"] for f in faults)
        assert spread < 15, f"rank 1 raised {spread:.1f} s after rank 0: it did not learn of the failure promptly"
        for run in range(RUNS):
            assert marker.finished(out / f"run{run}", hf_sink.complete), f"launch {launch} run {run} is incomplete"
