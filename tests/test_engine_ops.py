"""``import`` and ``reshard`` run like ``export`` does (tests/test_operations.py): ``--dry-run``
prints the plan and writes nothing; ``--report FILE`` writes the JSON run report with the bytes
each rank really read; a finished run leaves a ``distconv.json`` marker in --save (every file's
size and SHA-256), so a second identical run is skipped while the marker checks out and
``--overwrite`` redoes it; ``--quiet`` prints nothing on success.

Acceptance tests for the streaming import/reshard engine: written before it, they fail on the
code they were written against wherever the feature does not exist yet.

Everything runs through the real CLI: 2-rank runs under torchrun with ``--tee 3`` (each worker
line tagged ``[default<rank>]:``, so what rank 0 alone prints can be told), plus a few plain
one-process runs where the world size does not matter. One run sequence per command is shared
by the tests of this file (see ``runs``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_import import make_hf

from conftest import ROOT, distconv_cli, subprocess_env
from fixtures.build import layout_dir

KINDS = ["import", "reshard"]
TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "distconv.json"


def _layout(tp: int, pp: int) -> list[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


LAYOUT = {"import": _layout(2, 2), "reshard": _layout(1, 2)}  # what the runs write
OTHER = {"import": _layout(1, 1), "reshard": _layout(2, 1)}  # another target: not the same run


def _torchrun(kind: str, load: Path, save: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee", "3",
           "-m", "distconv", kind, "--load", str(load), "--save", str(save), *LAYOUT[kind], *extra]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def _worker_lines(text: str) -> list[tuple[int, str]]:
    """(rank, line) of each line a worker printed (torchrun's ``--tee`` prefix)."""
    return [(int(m[1]), m[2]) for m in re.finditer(r"^\[default(\d+)\]:(.*)$", text, re.M)]


def _said(proc: subprocess.CompletedProcess) -> str:
    """What a run said: its ``distconv:`` lines first (torchrun's summary can bury them), then the tails."""
    mine = [line for line in (proc.stdout + proc.stderr).splitlines() if "distconv: " in line]
    return (f"rc {proc.returncode}\n--- distconv lines\n" + "\n".join(mine[:20])
            + f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root`` (relative path): size, mtime and SHA-256."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _marker_checks_out(save: Path) -> dict:
    """The marker lists every other file under --save with its size and SHA-256."""
    marker = json.loads((save / MARKER).read_text())
    files = {k: v for k, v in _snapshot(save).items() if k != MARKER}
    assert sorted(marker["files"]) == sorted(files), "the marker must list every file of the checkpoint"
    for name, (size, _, sha) in files.items():
        assert marker["files"][name]["bytes"] == size and marker["files"][name]["sha256"] == sha, name
    return marker


def _iteration_folder(root: Path) -> Path:
    tracked = (root / TRACKER).read_text().strip()
    return root / ("release" if tracked == "release" else f"iter_{int(tracked):07d}")


def _dcp_tensor_bytes(folder: Path, optimizer: bool = False) -> int:
    """Bytes of the model's tensors a DCP folder's ``.metadata`` describes, or of its optimizer state."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return sum(math.prod(m.size) * m.properties.dtype.itemsize for k, m in meta.items()
               if isinstance(m, TensorStorageMetadata) and k.startswith("optimizer.") == optimizer)


def _safetensors_bytes(folder: Path) -> int:
    """Bytes of tensor data in a folder's ``.safetensors`` files (each file less its header)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (header,) = struct.unpack("<Q", fh.read(8))
        total += f.stat().st_size - 8 - header
    return total


@pytest.fixture(scope="module")
def sources(built, tmp_path_factory) -> dict[str, Path]:
    """import: a small random HF Llama; reshard: the llama fixture at TP2 PP2 (with optimizer state)."""
    work = tmp_path_factory.mktemp("engine_ops_sources")
    return {"import": make_hf(work, "llama"), "reshard": layout_dir(built, "llama", 2, 2)}


@pytest.fixture(scope="module", params=KINDS)
def runs(request, sources, tmp_path_factory) -> dict:
    """One sequence per command, on one --save (its parent holds nothing else):

    1. ``--quiet`` (2 ranks);  2. the same again without ``--quiet`` (2 ranks): skipped;
    3. another target layout (1 rank): not skipped, refused;  4. one output byte flipped, then
    the first run's options (1 rank): not skipped;  5. ``--overwrite --report FILE`` (2 ranks).
    The snapshot of --save is taken after each."""
    kind = request.param
    work = tmp_path_factory.mktemp(f"engine_ops_{kind}")
    load, save, report = sources[kind], work / "out" / "meg", work / "report.json"
    save.parent.mkdir()
    out: dict = {"kind": kind, "load": load, "save": save, "report": report}
    out["quiet"] = _torchrun(kind, load, save, "--quiet")
    out["after_quiet"] = _snapshot(save)
    out["marker1"] = (save / MARKER).read_text() if (save / MARKER).is_file() else None
    out["again"] = _torchrun(kind, load, save)
    out["after_again"] = _snapshot(save)
    out["other"] = distconv_cli(kind, "--load", str(load), "--save", str(save), *OTHER[kind])
    out["after_other"] = _snapshot(save)
    out["damaged_file"] = None
    shards = sorted(save.rglob("*.distcp"), key=lambda p: p.stat().st_size)
    if shards:
        victim = shards[-1]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        out["damaged_file"] = victim.relative_to(save).as_posix()
    out["after_damage"] = _snapshot(save)
    out["damaged"] = distconv_cli(kind, "--load", str(load), "--save", str(save), *LAYOUT[kind])
    out["after_damaged"] = _snapshot(save)
    out["redo"] = _torchrun(kind, load, save, "--overwrite", "--report", str(report))
    out["after_redo"] = _snapshot(save)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_dry_run_prints_a_plan_and_writes_nothing(kind, sources, tmp_path):
    """Rank 0 alone prints what each of the 2 ranks would read and what would be written; no
    file appears. For reshard every ``.distcp`` is zeros of the right size, so reading a tensor
    would fail (as export's dry-run test does)."""
    load = sources[kind]
    if kind == "reshard":
        load = tmp_path / "ckpt"
        shutil.copytree(sources[kind], load)
        for f in load.rglob("*.distcp"):
            f.write_bytes(b"\0" * f.stat().st_size)
    save = tmp_path / "out" / "meg"
    save.parent.mkdir()
    proc = _torchrun(kind, load, save, "--dry-run")
    assert proc.returncode == 0, _said(proc)
    lines = _worker_lines(proc.stdout)
    assert {rank for rank, _ in lines} == {0}, "rank 0 alone prints the plan:\n" + _said(proc)
    text = "\n".join(line for _, line in lines)
    assert "2 rank(s) would read" in text, text
    source_file = ".safetensors" if kind == "import" else ".distcp"
    for rank in (0, 1):
        mine = [line for line in text.splitlines() if line.startswith(f"  rank {rank}: ")]
        assert len(mine) == 1 and source_file in mine[0], f"rank {rank}'s reads, naming its files:\n{text}"
    assert "would write" in text and str(save) in text, text
    assert list(save.parent.iterdir()) == [], "a dry run writes nothing"


def test_quiet_prints_nothing_on_success(runs):
    proc = runs["quiet"]
    assert proc.returncode == 0, _said(proc)
    assert _worker_lines(proc.stdout + proc.stderr) == [] and proc.stdout.strip() == "", _said(proc)
    assert (runs["save"] / TRACKER).exists()


def test_marker_checksums_match_the_files(runs):
    """``distconv.json`` in --save after the first run: every other file's size and SHA-256, the
    source, the run report."""
    assert runs["quiet"].returncode == 0, _said(runs["quiet"])
    assert runs["marker1"] is not None, f"no {MARKER} in --save: {sorted(runs['after_quiet'])}"
    marker = json.loads(runs["marker1"])
    files = {k: v for k, v in runs["after_quiet"].items() if k != MARKER}
    assert sorted(marker["files"]) == sorted(files), "the marker must list every file of the checkpoint"
    assert any(k.endswith(".distcp") for k in files) and TRACKER in files
    for name, (size, _, sha) in files.items():
        assert marker["files"][name]["bytes"] == size and marker["files"][name]["sha256"] == sha, name
    assert str(Path(runs["load"]).resolve()) in json.dumps(marker["source"]), marker["source"]
    assert "report" in marker


def test_identical_run_is_skipped(runs):
    """The same command again: rank 0 says once that --save already holds it; nothing is touched."""
    proc = runs["again"]
    assert proc.returncode == 0, _said(proc)
    said = [(rank, line) for rank, line in _worker_lines(proc.stdout) if "already holds this" in line]
    assert len(said) == 1 and said[0][0] == 0, _said(proc)
    assert runs["after_again"] == runs["after_quiet"] != {}, "a skipped run touches nothing"
    assert [p.name for p in runs["save"].parent.iterdir()] == ["meg"]


def test_other_options_are_not_skipped(runs):
    """Another target layout on the finished --save: not skipped, refused without --overwrite."""
    proc = runs["other"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distconv: error:")]
    assert proc.returncode != 0 and "already holds" not in proc.stdout, _said(proc)
    assert len(errors) == 1 and "--overwrite" in errors[0], _said(proc)
    assert runs["after_other"] == runs["after_again"]


def test_damaged_output_is_not_skipped(runs):
    """One byte of a ``.distcp`` flipped (same size): the marker no longer checks out, so the same
    command is not skipped: it is refused without --overwrite (and --save left as it is), or
    redone into a checkpoint whose marker checks out."""
    assert runs["damaged_file"], "the first run wrote no .distcp to damage"
    proc = runs["damaged"]
    assert "already holds" not in proc.stdout, _said(proc)
    if proc.returncode == 0:
        _marker_checks_out(runs["save"])  # redone (then the redo run below overwrites it again)
    else:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("distconv: error:")]
        assert len(errors) == 1 and "--overwrite" in errors[0], _said(proc)
        assert runs["after_damaged"] == runs["after_damage"]


def test_overwrite_redoes_it(runs):
    """``--overwrite`` on a finished --save: rewritten (no file keeps its mtime), the marker checks
    out again, nothing left beside it."""
    proc = runs["redo"]
    assert proc.returncode == 0, _said(proc)
    assert "already holds" not in proc.stdout and "wrote " in proc.stdout, _said(proc)
    before, after = runs["after_damaged"], runs["after_redo"]
    assert after and not [k for k in after if k in before and after[k][1] == before[k][1]], "every file is rewritten"
    _marker_checks_out(runs["save"])
    assert [p.name for p in runs["save"].parent.iterdir()] == ["meg"]


def test_report_counts_bytes_read_per_rank(runs):
    """``--report FILE``: export's fields; each rank's planned reads (both read, neither everything),
    their sum every needed source byte and not the optimizer state; the measured reads within it."""
    assert runs["redo"].returncode == 0, _said(runs["redo"])
    report = json.loads(Path(runs["report"]).read_text())
    kind, load, save = runs["kind"], Path(runs["load"]), runs["save"]
    if kind == "import":
        needed = _safetensors_bytes(load)  # every HF tensor goes into the checkpoint
    else:
        needed = _dcp_tensor_bytes(_iteration_folder(load))  # the model weights, not the optimizer state
    assert report["world_size"] == 2
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1], ranks
    # the measured figure (/proc/self/io read_bytes while converting) counts only what was not in
    # the page cache; these small sources are warm, so the split per rank is checked on the
    # planned figure beside it, and the measured one as a bound
    assert all(0 < r["bytes_read_planned"] < needed for r in ranks), (needed, ranks)
    assert report["bytes_read_planned"] == sum(r["bytes_read_planned"] for r in ranks)
    assert needed <= report["bytes_read_planned"] <= 1.5 * needed, (needed, report["bytes_read_planned"])
    assert all(r["peak_rss_bytes"] > 0 for r in ranks), ranks
    assert all(isinstance(r["bytes_read"], int) for r in ranks), ranks
    assert report["bytes_read"] == sum(r["bytes_read"] for r in ranks)
    # The measured figure also counts code pages a lazy import faults in mid-run when they have
    # left the page cache (CI saw 0.45 MiB of them on a 0.7 MiB import), so its bound allows that.
    # Reshard: reading the fixture's optimizer state too (twice the weights) would exceed it.
    # Import: every byte at most once, plus such pages.
    if kind == "import":
        bound = 2 * needed
    else:
        optimizer = _dcp_tensor_bytes(_iteration_folder(load), optimizer=True)
        assert optimizer >= 2 * needed, (needed, optimizer)
        bound = needed + optimizer // 2
    assert report["bytes_read"] <= bound, (needed, report["bytes_read"], bound)
    written = _dcp_tensor_bytes(_iteration_folder(save))
    on_disk = sum(size for name, (size, _, _) in runs["after_redo"].items())
    assert written <= report["bytes_written"] <= on_disk, (written, report["bytes_written"], on_disk)
    assert report["seconds"]["total"] > 0
    marker = json.loads((save / MARKER).read_text())
    assert marker["report"]["bytes_read"] == report["bytes_read"]
