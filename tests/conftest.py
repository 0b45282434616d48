"""Shared, session-wide fixtures: real megatron-core checkpoints built once per test run.

Set ``DISTCONV_FIXTURES=/some/dir`` to reuse checkpoints built earlier by
``torchrun --nproc-per-node 4 -m tests.fixtures.build --out /some/dir`` (local iteration only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def venv_unavailable(venv: Path, what: str, setup: str) -> str | None:
    """Why the real part ``what``, which ``tests/SETUP`` installs into its
    own ``venv``, cannot be used (the skip reason), or None when it is ready."""
    if (venv / "UNAVAILABLE").exists():
        return f"{what} could not be installed: " + (venv / "UNAVAILABLE").read_text().strip()
    if not (venv / "READY").exists():
        return f"no {what} venv at {venv}: run bash tests/{setup}"
    return None


def torchrun(nproc: int, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``torchrun --standalone --nproc-per-node nproc ARGS`` and capture its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def distconv_cli(*args: str, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI: plain ``python -m distconv`` for one rank, torchrun otherwise."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "distconv", *args]
        return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return torchrun(nproc, "-m", "distconv", *args, timeout=timeout, check=False)


def run_export_jobs(nproc: int, jobs: list[dict], workdir: Path) -> list[dict]:
    """Many ``distconv.export`` calls in one torchrun launch (see tests/export_jobs.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_file, results_file = workdir / f"jobs{nproc}.json", workdir / f"results{nproc}.json"
    jobs_file.write_text(json.dumps(jobs))
    torchrun(nproc, str(ROOT / "tests" / "export_jobs.py"), str(jobs_file), str(results_file), timeout=1200)
    return json.loads(results_file.read_text())


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """Every model of ``fixtures.build.FIXTURES`` at its layouts, with reference logits."""
    cached = os.environ.get("DISTCONV_FIXTURES")
    if cached and (Path(cached) / "refs").is_dir():
        return Path(cached)
    out = tmp_path_factory.mktemp("megatron")
    # under 10 min on 2 cores; the limit is generous (a build that piled up megatron-core's leaked
    # gloo threads once ran past 25 min and failed every test that needs a fixture)
    torchrun(4, "-m", "tests.fixtures.build", "--out", str(out), timeout=3600)
    return out


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of an exported folder as transformers loads it (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="session")
def legacy_built(tmp_path_factory) -> Path:
    """Legacy ``mp_rank_*`` checkpoints written from random HF models (plain torch.save, no torchrun)."""
    from fixtures.legacy import build_all

    return build_all(tmp_path_factory.mktemp("legacy"))
