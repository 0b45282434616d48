"""Where gathering happens: the GPU each rank takes, and the choice every rank agrees on.

The mapping and the decision are plain functions, checked here table by table; the agreement
itself runs under torchrun on this CPU-only machine, where ``--device cuda`` must fail on
every rank with one message before any NCCL group is made.
"""

from __future__ import annotations

import re

import pytest

from distconv.engine.comm import decide_device, local_gpu
from distconv.errors import DistconvError

from conftest import distconv_cli
from fixtures.build import layout_dir


@pytest.mark.parametrize("env,count,expected", [
    ({"LOCAL_RANK": "3"}, 8, 3),  # torchrun on an 8-GPU node
    ({"LOCAL_RANK": "0", "SLURM_LOCALID": "5"}, 8, 0),  # torchrun under Slurm: torchrun's rank wins
    ({"SLURM_LOCALID": "5"}, 8, 5),  # srun starting the ranks itself
    ({"SLURM_LOCALID": "5"}, 1, 0),  # --gpus-per-task 1: each task sees its own GPU as device 0
    ({}, 2, 0),  # a plain process
    ({"LOCAL_RANK": "6"}, 4, 2),  # more local ranks than GPUs: shares GPU 2 with rank 2 (found below)
])
def test_local_gpu(env, count, expected):
    assert local_gpu(env, count) == expected


A, B = ("node0", "GPU-a"), ("node0", "GPU-b")


@pytest.mark.parametrize("device,gpus,use_cuda,note", [
    ("auto", [A, B], True, None),
    ("auto", [A, ("node1", "GPU-a")], True, None),  # the same UUID string on two hosts is two GPUs
    ("auto", [None, None], False, "no rank sees a CUDA device"),  # no GPU anywhere (Slurm hid them?): said
    ("auto", [None], False, None),  # a rank alone gathers nothing: nothing to say
    ("auto", [A, None], False, "rank 1 has no CUDA device"),  # mixed nodes: everyone on gloo
    ("auto", [A, A], False, "ranks 0, 1 would share GPU GPU-a on node0"),
    ("cpu", [A, B], False, None),
])
def test_decide_device(device, gpus, use_cuda, note):
    decided, said = decide_device(device, gpus)
    assert decided is use_cuda
    assert (said is None) if note is None else (note in said)


@pytest.mark.parametrize("gpus,needle", [([A, A], "would share GPU"), ([A, None], "rank 1 has no CUDA device"),
                                         ([None], "rank 0 has no CUDA device")])
def test_device_cuda_refuses_what_nccl_cannot_do(gpus, needle):
    with pytest.raises(DistconvError, match=needle):
        decide_device("cuda", gpus)


def test_device_cuda_without_gpus_fails_on_every_rank(built, tmp_path):
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(layout_dir(built, "llama", 2, 1)), "--save", str(out),
                        "--device", "cuda", nproc=2, timeout=120)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("distconv: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "rank 0 has no CUDA device" in errors[0], proc.stderr[-3000:]
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", proc.stderr))
    assert sorted(codes) == ["0", "1"] and all(int(c) != 0 for c in codes.values()), proc.stderr[-3000:]
    assert not out.exists()


def test_the_hook_takes_the_callers_gpu_only_where_it_uses_cuda(monkeypatch):
    """In a job's process (the hook) the caller's current device is taken only once CUDA is in use
    there: asking a process that never used CUDA for its current device would open a context on
    GPU 0 in every rank. (CUDA is stood in for: this machine has none; ``monkeypatch`` undoes it.)"""
    import torch

    from distconv.engine.comm import _visible_gpu

    def current_device() -> int:
        raise AssertionError("current_device() asked in a process that never used CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    assert _visible_gpu("auto", owns=False) is None  # gloo on the CPU; no context opened
    assert _visible_gpu("cpu", owns=False) is None
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert _visible_gpu("auto", owns=False) == 2  # the caller's device, as it set it
    assert _visible_gpu("auto", owns=True) == 0  # a process of its own: its local rank's (none set here)


def test_the_gpu_loopback_says_skip_without_a_gpu(tmp_path):
    """tests/gpu/loopback.py (NCCL through distconv's own gather code, run by tests/gpu/check.py on a
    GPU machine) imports distconv's internals it drives and, without CUDA, says so and exits 0."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    out = tmp_path / "loopback.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu" / "loopback.py"), "gloo", str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "SKIP loopback: no CUDA device" in proc.stdout, proc.stderr[-2000:]
    assert json.loads(out.read_text()) == {"skipped": "no CUDA device: nothing to measure"}
