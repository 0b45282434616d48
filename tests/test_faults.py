"""Faults mid-run: a rank killed, a disk that fills up, a source file that disappears.

Each must end every rank non-zero within the distributed timeout, with an error naming the
cause, and leave no output folder that looks complete. To be caught mid-run, the exports use
``--window 1KB`` (one small group per tensor, each read and gathered on its own) and
``--max-shard-size 20KB`` (a file per tensor or two), and the fault is injected once the
third output file has appeared in the hidden partial folder.

The second half puts ``import`` and ``reshard`` through the same faults (see the note there).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, distconv_cli, subprocess_env
from fixtures.build import layout_dir

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
    """Rank 1 SIGKILLed mid-gather: every rank ends non-zero soon after (rank 0 learns from the
    closed connection, not at --timeout), with one message, from rank 0; nothing looks complete.
    The ranks see no GPU, and --device auto says once, from rank 0, that it gathers over gloo."""
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee", "3",
           "-m", "distconv", "export", "--load", str(layout_dir(built, "llama", 2, 2)), "--save", str(out), *SLOW]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _wait_mid_run(proc, out)
        rank1 = [pid for pid, env in _children(proc.pid).items() if env.get("RANK") == "1"]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = proc.communicate(timeout=180)
        took = time.monotonic() - killed
    finally:
        proc.kill()
    assert proc.returncode != 0
    # torchrun's summary names the cause and every rank's exit status
    assert "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", stderr))
    assert sorted(codes) == ["0", "1"] and all(int(c) != 0 for c in codes.values()), stderr[-3000:]
    assert took < 45, f"the job ended {took:.0f} s after the kill (--timeout 60): rank 0 waited it out"
    lines = _worker_lines(stdout + stderr)
    errors = [(rank, line) for rank, line in lines if line.startswith("distconv: error:")]
    assert len(errors) == 1 and errors[0][0] == 0, f"want one error line, from rank 0:\n{stderr[-4000:]}"
    notes = [(rank, line) for rank, line in lines if "gathering over gloo on the CPU: no rank sees a CUDA device" in line]
    assert [rank for rank, _ in notes] == [0], f"want one note on the gloo fallback, from rank 0: {notes}"
    _assert_nothing_complete(out)


def test_peer_stuck_mid_run(built, tmp_path):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0 gives up at its --timeout (a transfer, an agreement
    or a load that never finishes), not at NCCL's or gloo's later ones and never hanging, and exits
    with one message; once rank 1 runs again it ends too, non-zero. Nothing looks complete."""
    out = tmp_path / "hf"
    timeout = 20
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee", "3",
           "-m", "distconv", "export", "--load", str(layout_dir(built, "llama", 2, 2)), "--save", str(out),
           *SLOW[:-1], str(timeout)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    workers: dict[int, int] = {}
    try:
        _wait_mid_run(proc, out)
        workers = {int(env["RANK"]): pid for pid, env in _children(proc.pid).items() if "RANK" in env}
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while workers[0] in _children(proc.pid) and time.monotonic() - stopped < 4 * timeout + 30:
            time.sleep(0.2)
        took = time.monotonic() - stopped
        os.kill(workers[1], signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            for pid in workers.values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
    assert took < 2 * timeout + 20, f"rank 0 was still running {took:.0f} s after its peer froze (--timeout {timeout})"
    _every_rank_failed(stderr)
    message = _assert_one_error(proc, stdout + stderr)
    assert f"within {timeout} s" in message or "lost contact" in message or "timed out" in message.lower(), message
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


# --- import (HF -> Megatron torch_dist) and reshard (torch_dist -> torch_dist) -----------------
#
# The same faults through the real CLI under torchrun (2 ranks). Worker output is tagged by
# torchrun (``--tee 3``: each line ``[default<rank>]:...``), so "one message, from rank 0" and
# "no traceback from a worker" can be told apart from torchrun's own failure summary. What
# looks complete is a tracker file, a DCP ``.metadata`` or a ``distconv.json`` anywhere at or
# next to --save (its parent holds nothing else).
#
# A rank is killed mid-run without slowing the code down and without naming its modules: once
# a non-empty ``.distcp`` exists under --save's parent (the run is writing its output and has
# not committed it), both workers are frozen with SIGSTOP, the output is checked to be
# unfinished, rank 1 is SIGKILLed and rank 0 resumed. The sources are a few times larger than
# the fixtures (~19 MB of weights) so that writing is not over before it is seen.

TRACKER = "latest_checkpointed_iteration.txt"
COMPLETE = {TRACKER, ".metadata", "distconv.json"}
LAYOUT = {"import": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
          "reshard": ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]}
KINDS = ["import", "reshard"]


def _cli(kind: str, load: Path, save: Path, *extra: str) -> list[str]:
    """``torchrun --nproc-per-node 2 --tee 3 -m distconv KIND ...`` (a 60 s distributed timeout)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee", "3",
            "-m", "distconv", kind, "--load", str(load), "--save", str(save), *LAYOUT[kind], "--timeout", "60", *extra]


def _worker_lines(text: str) -> list[tuple[int, str]]:
    """(rank, line) of each line a worker printed (torchrun's ``--tee`` prefix)."""
    return [(int(m[1]), m[2]) for m in re.finditer(r"^\[default(\d+)\]:(.*)$", text, re.M)]


def _assert_one_error(proc: subprocess.CompletedProcess | subprocess.Popen, output: str, *needles: str) -> str:
    """Non-zero exit, one ``distconv: error:`` line, printed by rank 0, naming ``needles``; no
    worker printed a traceback. Returns the message."""
    assert proc.returncode != 0, output[-3000:]
    lines = _worker_lines(output)
    errors = [(rank, line) for rank, line in lines if line.startswith("distconv: error:")]
    assert len(errors) == 1 and errors[0][0] == 0, f"want one error line, from rank 0:\n{output[-4000:]}"
    message = errors[0][1]
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    spam = [f"[{rank}] {line}" for rank, line in lines if "Traceback" in line]
    assert not spam, "a worker printed a traceback:\n" + "\n".join(spam) + "\n" + output[-4000:]
    return message


def _every_rank_failed(stderr: str) -> None:
    codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", stderr))
    assert sorted(codes) == ["0", "1"] and all(int(c) != 0 for c in codes.values()), stderr[-3000:]


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root``: size, mtime and SHA-256."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_nothing_complete_at(save: Path, before: dict | None = None) -> None:
    """--save absent (or, given ``before``, exactly as it was); nothing next to it looks complete."""
    if before is None:
        assert not save.exists(), f"--save {save} must not appear: {sorted(map(str, save.rglob('*')))}"
    else:
        assert _snapshot(save) == before, "--save must be left as it was"
    for p in save.parent.rglob("*"):
        if before is not None and (p == save or save in p.parents):
            continue
        assert p.name not in COMPLETE, f"{p} looks like a finished checkpoint"


def _hf_source(folder: Path) -> Path:
    """A random Llama (8 layers, hidden 256, ~19 MB fp32) saved as several shards with an index."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=250, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder), max_shard_size="5MB")
    assert len(list(folder.glob("*.safetensors"))) >= 3 and (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory) -> Path:
    return _hf_source(tmp_path_factory.mktemp("big_hf") / "llama")


@pytest.fixture(scope="module")
def big_meg(big_hf, tmp_path_factory) -> Path:
    """The big HF source as a Megatron torch_dist root at TP2 PP2 (one plain ``distconv import``)."""
    root = tmp_path_factory.mktemp("big_meg") / "llama_tp2pp2"
    proc = distconv_cli("import", "--load", str(big_hf), "--save", str(root), "--tensor-model-parallel-size", "2",
                        "--pipeline-model-parallel-size", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _iteration_folder(root: Path) -> Path:
    tracked = (root / TRACKER).read_text().strip()
    return root / ("release" if tracked == "release" else f"iter_{int(tracked):07d}")


def _damaged_copy(kind: str, built: Path, big_hf: Path, dst: Path) -> tuple[Path, Path, int]:
    """A copy of the source to damage, the file in it the run must read, and a size to cut it
    to that leaves part of a needed tensor out: an HF shard named by the index, or the
    ``.distcp`` holding ``output_layer.weight`` (cut inside that tensor's bytes)."""
    if kind == "import":
        shutil.copytree(big_hf, dst)
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        victim = dst / sorted(set(index["weight_map"].values()))[1]
        return dst, victim, victim.stat().st_size // 2
    shutil.copytree(layout_dir(built, "llama", 2, 2), dst)
    folder = _iteration_folder(dst)
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(folder)).read_metadata().storage_data
    info = next(s for i, s in storage.items() if i.fqn == "output_layer.weight")
    return dst, folder / info.relative_path, info.offset + info.length // 2


@pytest.mark.parametrize("kind", KINDS)
def test_engine_missing_source_file(kind, built, big_hf, tmp_path):
    """A source file the run needs is gone before it starts (an HF shard the index names; a
    ``.distcp``): one error from rank 0 naming the file, no traceback, --save never appears."""
    source, victim, _ = _damaged_copy(kind, built, big_hf, tmp_path / "src")
    victim.unlink()
    save = tmp_path / "out" / "meg"
    save.parent.mkdir()
    proc = subprocess.run(_cli(kind, source, save), env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    _assert_one_error(proc, proc.stdout + proc.stderr, victim.name)
    _assert_nothing_complete_at(save)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_truncated_source_file(kind, built, big_hf, tmp_path):
    """A source file cut short: one error from rank 0 naming the file, no traceback; an existing
    --save given with --overwrite is left exactly as it was."""
    source, victim, size = _damaged_copy(kind, built, big_hf, tmp_path / "src")
    os.truncate(victim, size)
    save = tmp_path / "out" / "meg"
    (save / "release").mkdir(parents=True)  # what an earlier run left there
    (save / TRACKER).write_text("release")
    (save / "release" / "earlier.txt").write_text("an earlier checkpoint")
    before = _snapshot(save)
    proc = subprocess.run(_cli(kind, source, save, "--overwrite"), env=subprocess_env(), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    _assert_one_error(proc, proc.stdout + proc.stderr, victim.name)
    _assert_nothing_complete_at(save, before)


def _signal_workers(proc: subprocess.Popen, workers: dict[int, int], sig: int) -> None:
    """Send ``sig`` to those of this torchrun's workers that are still its children."""
    alive = _children(proc.pid)
    for pid in workers.values():
        if pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _wait_writing(proc: subprocess.Popen, folder: Path) -> dict[int, int]:
    """Wait until a non-empty ``.distcp`` exists under ``folder``; the workers' pids by rank."""
    end = time.monotonic() + 300
    workers: dict[int, int] = {}
    while True:
        assert proc.poll() is None, f"the run ended before the fault could be injected:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < end, "the run never started writing"
        if len(workers) < 2:
            workers = {int(env["RANK"]): pid for pid, env in _children(proc.pid).items() if "RANK" in env}
        elif any(p.suffix == ".distcp" and _size(p) for p in folder.rglob("*")):
            return workers
        time.sleep(0.002)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # renamed or removed meanwhile
        return 0


@pytest.mark.parametrize("kind", KINDS)
def test_engine_rank_killed_mid_run(kind, big_hf, big_meg, tmp_path):
    """Rank 1 SIGKILLed while the output is being written: every rank ends non-zero within the
    timeout, and nothing at or next to --save looks complete."""
    source = big_hf if kind == "import" else big_meg
    save = tmp_path / "out" / "meg"
    save.parent.mkdir()
    proc = subprocess.Popen(_cli(kind, source, save), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    workers: dict[int, int] = {}
    try:
        workers = _wait_writing(proc, save.parent)
        _signal_workers(proc, workers, signal.SIGSTOP)  # frozen mid-write
        try:
            assert not save.exists() and not list(save.parent.rglob(TRACKER)), "already finished: no fault injected"
            os.kill(workers[1], signal.SIGKILL)
        finally:
            _signal_workers(proc, workers, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            _signal_workers(proc, workers, signal.SIGKILL)
            proc.kill()
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    _every_rank_failed(stderr)
    _assert_nothing_complete_at(save)


@pytest.mark.parametrize("kind", KINDS)
def test_engine_disk_fills_up(kind, big_hf, big_meg, tmp_path):
    """--save on a nearly full file system: one error from rank 0 naming the cause and where,
    every rank non-zero, the partial output removed, the source untouched."""
    source = big_hf if kind == "import" else big_meg
    before = _snapshot(source)
    disk, needles, preexec = _size_capped(tmp_path)
    save = disk / "meg"
    try:
        proc = subprocess.run(_cli(kind, source, save), env=subprocess_env(), capture_output=True, text=True,
                              timeout=300, cwd=ROOT, preexec_fn=preexec)
        message = _assert_one_error(proc, proc.stdout + proc.stderr)
        assert any(n in message for n in needles) and str(disk) in message, message
        _every_rank_failed(proc.stderr)
        assert list(disk.iterdir()) == [], f"the partial output must be removed: {sorted(map(str, disk.rglob('*')))}"
    finally:
        if preexec is None:
            subprocess.run(["umount", str(disk)], check=False)
    assert _snapshot(source) == before, "the source must be left untouched"
