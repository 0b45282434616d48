"""slurm/distconv.sbatch against a real Slurm: munged, slurmctld and slurmd on this machine.

The module fixture configures a one-node cluster (Debian's slurm-wlm, installed by
``tests/setup_slurm.sh``) in a scratch folder, submits the real sbatch script with CPU ranks,
and stops the daemons by their pid files. Without the Slurm binaries, or without root (slurmd
launches jobs as their users), it skips and says why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, hf_logits, subprocess_env
from fixtures.build import layout_dir

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "srun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """Environment for Slurm client commands talking to a fresh one-node cluster."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing); run tests/setup_slurm.sh as root")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm cluster needs root (slurmd starts jobs as their users)")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = d / "munge.sock"
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=distconv-test",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={sock}",
        "CredType=cred/munge",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    env = {**subprocess_env(), "SLURM_CONF": str(conf)}
    pid_files = [d / "slurmd.pid", d / "slurmctld.pid", d / "munged.pid"]
    try:
        subprocess.run(["munged", "-f", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d / 'munged.pid'}",
                        f"--log-file={d / 'log' / 'munged.log'}", f"--seed-file={d / 'munge.seed'}"],
                       check=True, env=env, capture_output=True, text=True, timeout=30)
        subprocess.run(["slurmctld", "-c", "-f", str(conf)], check=True, env=env, capture_output=True, timeout=30)
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env, capture_output=True, timeout=30)

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() == "idle"

        _wait(idle, 60, "the Slurm node to become idle")
    except (subprocess.CalledProcessError, AssertionError) as e:
        logs = "\n".join(p.read_text()[-2000:] for p in (d / "log").iterdir())
        _stop(pid_files)
        raise AssertionError(f"could not start the Slurm cluster: {e}\n{getattr(e, 'stderr', '')}\n{logs}") from None
    yield env
    _stop(pid_files)


def _stop(pid_files: list[Path]) -> None:
    for pid_file in pid_files:
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        end = time.monotonic() + 15
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.2)


def test_sbatch_export_on_a_real_slurm(slurm, built, tmp_path):
    """The real sbatch script: srun -> torchrun (c10d rendezvous) -> distconv export, 2 CPU ranks."""
    load = layout_dir(built, "llama", 2, 1)  # TP2 PP1: the layout default gives 2 processes
    out, log = tmp_path / "hf", tmp_path / "job.out"
    env = {**slurm, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["sbatch", "--wait", "--parsable", "-o", str(log), "-J", "distconv-test",
         str(ROOT / "slurm" / "distconv.sbatch"), "export", "--load", str(load), "--save", str(out),
         "--device", "cpu", "--timeout", "120"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    text = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{text[-6000:]}"
    job = proc.stdout.strip().split(";")[0]
    host = socket.gethostname()
    assert f"job {job}, 1 node(s) x 2 process(es), 0 GPU(s) per node seen, rendezvous {host}:" in text, text[-3000:]
    assert "plan        2 rank(s)" in text and f"wrote LlamaForCausalLM to {out}" in text, text[-3000:]
    ref = torch.load(built / "refs" / "llama.pt")
    logits = hf_logits(out, ref["tokens"])
    assert (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item() <= 1e-4
