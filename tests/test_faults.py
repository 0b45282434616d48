"""Faults mid-run: a rank killed, a disk that fills up, a source file that disappears.

Each must end every rank non-zero within the distributed timeout, with an error naming the
cause, and leave no output folder that looks complete. To be caught mid-run, the exports use
``--window 1KB`` (one small group per tensor, each read and gathered on its own) and
``--max-shard-size 20KB`` (a file per tensor or two), and the fault is injected once the
third output file has appeared in the hidden partial folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


from conftest import ROOT, subprocess_env
from distconv.testing.build import layout_dir

SLOW = ["--window", "1KB", "--max-shard-size", "20KB", "--timeout", "60"]


def _partial_files(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.distconv-partial-*/model-*.safetensors"))


def _wait_mid_run(proc: subprocess.Popen, out: Path, files: int = 3) -> None:
    end = time.monotonic() + 300
    while len(_partial_files(out)) < files:
        assert proc.poll() is None, f"the export ended before the fault could be injected:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < end, "the export never got going"
        time.sleep(0.01)


def _assert_nothing_complete(out: Path) -> None:
    assert not out.exists(), "no folder may appear at --save"
    for folder in out.parent.glob(f".{out.name}.distconv-*"):
        names = {p.name for p in folder.iterdir()}
        assert not names & {"model.safetensors.index.json", "distconv.json"}, f"{folder} looks complete"


def _children(pid: int) -> dict[int, dict[str, str]]:
    """Environment of each child process of ``pid`` (torchrun's workers)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                out[int(stat.parent.name)] = dict(e.decode().split("=", 1) for e in env if b"=" in e)
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_rank_killed_mid_run(built, tmp_path):
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "distconv", "export", "--load", str(layout_dir(built, "llama", 2, 2)), "--save", str(out), *SLOW]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _wait_mid_run(proc, out)
        rank1 = [pid for pid, env in _children(proc.pid).items() if env.get("RANK") == "1"]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode != 0
    # torchrun's summary names the cause and every rank's exit status
    assert "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", stderr))
    assert sorted(codes) == ["0", "1"] and all(int(c) != 0 for c in codes.values()), stderr[-3000:]
    _assert_nothing_complete(out)


def _size_capped(tmp_path: Path, size: str = "300k") -> tuple[Path, list[str], object]:
    """A folder that fills up: a small tmpfs if this process may mount one (root), else a
    per-process file size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if mounted:
        return disk, ["No space left on device"], None

    def cap() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    return disk, ["File too large"], cap


def test_disk_fills_up(built, tmp_path):
    disk, needles, preexec = _size_capped(tmp_path)
    out = disk / "hf"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "distconv", "export", "--load", str(layout_dir(built, "llama", 2, 2)),
             "--save", str(out)],
            env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=preexec)
        assert proc.returncode == 1
        errors = [l for l in proc.stderr.splitlines() if l.startswith("distconv: error:")]
        assert len(errors) == 1 and any(n in errors[0] for n in needles), proc.stderr[-3000:]
        assert str(disk) in errors[0]  # the error names where
        assert list(disk.iterdir()) == [], "the partial output must be removed"
    finally:
        if preexec is None:
            subprocess.run(["umount", str(disk)], check=False)


def test_source_file_disappears_mid_run(built, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(layout_dir(built, "llama", 2, 2), root)
    folder = root / "iter_0000100"
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(folder)).read_metadata().storage_data
    last = next(info.relative_path for index, info in storage.items() if index.fqn == "output_layer.weight")
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "distconv", "export", "--load", str(root), "--save", str(out), *SLOW]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _wait_mid_run(proc, out)
        (folder / last).unlink()
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode != 0
    errors = [l for l in stderr.splitlines() if l.startswith("distconv: error:")]
    assert len(errors) == 1 and last in errors[0] and "No such file" in errors[0], stderr[-3000:]
    # torchelastic's error file is written: torchrun's summary carries the message, not <N/A>
    assert re.search(r"error_file: /\S+", stderr) and "DistconvError: reading" in stderr, stderr[-3000:]
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", stderr))
    assert sorted(codes) == ["0", "1"] and all(int(c) != 0 for c in codes.values()), stderr[-3000:]
    _assert_nothing_complete(out)
