"""Running distconv in practice: run report and marker, --dry-run, the launch script on one and
on two "nodes", --watch over a training run's save root, and ``distconv verify``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distconv.cli import _dispatch, _parser, export_keywords
from distconv.directions.export import ExportOptions
from distconv.errors import DistconvError
from distconv.watch import target

from conftest import ROOT, distconv_cli, hf_logits, subprocess_env
from fixtures.build import layout_dir

TOL = 1e-4


def _max_diff(built: Path, folder: Path, name: str = "llama") -> float:
    ref = torch.load(built / "refs" / f"{name}.pt")
    logits = hf_logits(folder, ref["tokens"])
    return (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item()


@pytest.fixture(scope="module")
def reported(built, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One plain single-process export with ``--report``."""
    d = tmp_path_factory.mktemp("reported")
    out, report = d / "hf", d / "report.json"
    proc = distconv_cli("export", "--load", str(layout_dir(built, "llama", 2, 2)), "--save", str(out),
                        "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, report, proc


def test_report_counts_what_was_written(reported, built):
    out, report_path, _ = reported
    report = json.loads(report_path.read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert report["tensors"] == len(index["weight_map"])
    assert report["bytes_written"] == index["metadata"]["total_size"]
    assert report["bytes_read_planned"] >= report["bytes_written"]  # the padded vocab rows are read, then trimmed
    assert report["ranks"][0]["bytes_read_planned"] == report["bytes_read_planned"]
    if Path("/proc/self/io").exists():  # measured; 0 when the fixture was in the page cache
        assert isinstance(report["bytes_read"], int) and report["bytes_read"] == report["ranks"][0]["bytes_read"] >= 0
    assert set(report["seconds"]) == {"plan", "convert", "finish", "total"}
    assert [r["rank"] for r in report["ranks"]] == [0] and report["ranks"][0]["peak_rss_bytes"] > 100e6
    assert report["nonfinite"] == {}  # the one warning: args name the fixtures' tokenizer, outside the checkpoint
    assert [w.split(" lies outside the checkpoint")[0] for w in report["warnings"]] == [f"args.tokenizer_model {built / 'tokenizer'}"]


def test_bytes_read_is_measured_or_null(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from distconv.engine import progress

    io = tmp_path / "io"  # the layout of /proc/self/io
    io.write_text("rchar: 900000\nwchar: 10\nsyscr: 5\nsyscw: 1\nread_bytes: 8192\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n")
    assert progress.storage_bytes_read(str(io)) == 8192  # read_bytes (storage), not rchar
    assert progress.storage_bytes_read(str(tmp_path / "absent")) is None
    if Path("/proc/self/io").exists():
        before = progress.storage_bytes_read()
        assert isinstance(before, int) and progress.storage_bytes_read() >= before
    plan = SimpleNamespace(tensors=3, files=["model.safetensors"], total_bytes=1000, world=1,
                           bytes_read_by=lambda rank: 1200, bytes_written_by=lambda rank: 1000,
                           gathered_bytes=0)

    def run(counters):
        monkeypatch.setattr(progress, "storage_bytes_read", lambda: next(counters))
        tracker = progress.Tracker(0, 1, None, quiet=True)
        tracker.planned(plan)
        tracker.converted(1000)
        return tracker.report()

    report = run(iter([5000, 5000 + 4096]))  # the delta over the conversion
    assert report["bytes_read"] == report["ranks"][0]["bytes_read"] == 4096
    assert report["bytes_read_planned"] == report["ranks"][0]["bytes_read_planned"] == 1200
    report = run(iter([None, None]))  # no /proc/self/io: null, never the plan's figure
    assert report["bytes_read"] is None and report["ranks"][0]["bytes_read"] is None and report["read_gbps"] is None
    assert report["bytes_read_planned"] == 1200


def test_the_command_line_exits_without_the_last_collection():
    """``python -m distconv`` ends through ``exit_process``: the exit status is kept, ``atexit``
    handlers still run, and the objects are frozen first (``gc.freeze``), out of reach of the
    interpreter's final garbage collection."""
    code = ("import atexit, gc\nfrom distconv.cli import exit_process\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
            "exit_process(3)")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout.strip() == "frozen True", (proc.stdout, proc.stderr[-2000:])
    assert "exit_process(main())" in (ROOT / "distconv" / "__main__.py").read_text()


def test_padded_vocab_kept_with_a_warning(built, tmp_path):
    """qwen3's args name no tokenizer and no vocab_size: the padded rows stay, and the run says how to trim them."""
    out, report = tmp_path / "hf", tmp_path / "report.json"
    proc = distconv_cli("export", "--load", str(layout_dir(built, "qwen3", 1, 1)), "--save", str(out), "--quiet",
                        "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l.removeprefix("distconv: warning: ") for l in proc.stderr.splitlines() if l.startswith("distconv: warning:")]
    assert len(warnings) == 1 and "--vocab-size" in warnings[0] and "--hf-config" in warnings[0], proc.stderr[-3000:]
    data, marker = json.loads(report.read_text()), json.loads((out / "distconv.json").read_text())
    assert data["warnings"] == marker["report"]["warnings"] == warnings
    assert data["vocab_size"] == marker["source"]["options"]["vocab_size"] == 256  # qwen3's padded rows
    assert data["vocab_source"] == marker["source"]["options"]["vocab_source"]
    assert "padded size kept" in data["vocab_source"]


def test_progress_bars_only_on_a_terminal(reported, built, tmp_path):
    _, _, piped = reported
    assert "read+gather" not in piped.stderr  # stderr was a pipe: no bars
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "distconv", "export", "--load", str(layout_dir(built, "qwen3", 1, 1)),
                             "--save", str(tmp_path / "hf")], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=slave, cwd=ROOT)
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, data.decode(errors="replace")[-3000:]
    text = data.decode(errors="replace")
    assert "read+gather" in text and "write" in text and "100%" in text and "B/s" in text, text[-3000:]


def test_marker_checksums_match_the_files(reported):
    out, _, _ = reported
    marker = json.loads((out / "distconv.json").read_text())
    files = sorted(p.name for p in out.iterdir() if p.name != "distconv.json")
    assert sorted(marker["files"]) == files
    for name in files:
        assert marker["files"][name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert marker["source"]["iteration"] == 100 and marker["source"]["path"].endswith("tp2pp2/iter_0000100")


def test_finished_export_is_skipped_and_other_options_are_not(reported, built):
    out, _, _ = reported
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    load = str(layout_dir(built, "llama", 2, 2))
    again = distconv_cli("export", "--load", load, "--save", str(out))
    assert again.returncode == 0 and "already holds this export" in again.stdout, again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other = distconv_cli("export", "--load", load, "--save", str(out), "--dtype", "bf16")
    assert other.returncode != 0 and "exists and is not empty" in other.stderr


def test_dry_run_reads_no_tensor(built, tmp_path):
    """Through launch/export.sh (2 processes from the TP2 PP1 layout): the plan, while every
    tensor file is garbage of the right size, and no output."""
    root = tmp_path / "ckpt"
    shutil.copytree(layout_dir(built, "llama", 2, 1), root)
    for f in (root / "iter_0000100").glob("*.distcp"):
        f.write_bytes(b"\0" * f.stat().st_size)
    out = tmp_path / "hf"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "export.sh"), str(root), str(out), "--dry-run"],
                          env={**subprocess_env(), "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s) would read" in proc.stdout
    assert "  rank 0: " in proc.stdout and "  rank 1: " in proc.stdout
    assert "model-00001-of-00001.safetensors: 39 tensors" in proc.stdout
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_launch_script_on_two_nodes(built, tmp_path, rendezvous):
    """Two launch/export.sh "nodes" (one process each) meet through torchrun's c10d rendezvous,
    or a static one when each node is given its NODE_RANK."""
    out = tmp_path / "hf"
    cmd = ["bash", str(ROOT / "launch" / "export.sh"), str(layout_dir(built, "llama", 1, 2)), str(out)]
    for attempt in range(3):  # the free port may be taken by another process before torchrun binds it
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        env = {**subprocess_env(), "PYTHON": sys.executable, "NNODES": "2", "NPROC": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_ID": "test-two-nodes"}
        node_env = [env, env] if rendezvous == "c10d" else [{**env, "NODE_RANK": str(r)} for r in range(2)]
        nodes = [subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
                 for e in node_env]
        end = time.monotonic() + 600
        while any(n.poll() is None for n in nodes) and not any(n.poll() for n in nodes) and time.monotonic() < end:
            time.sleep(0.2)
        for n in nodes:  # once one node failed, the other would wait for it until the rendezvous times out
            if n.poll() is None and any(m.poll() for m in nodes):
                n.terminate()
        results = [n.communicate(timeout=120) for n in nodes]
        if not any("EADDRINUSE" in e for _, e in results):
            break
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(e[-3000:] for _, e in results)
    assert sum("plan        2 rank(s)" in o for o, _ in results) == 1  # rank 0 alone prints
    assert _max_diff(built, out) <= TOL


def test_watch_exports_each_new_iteration(built, tmp_path):
    root, save = tmp_path / "run", tmp_path / "hf"
    shutil.copytree(layout_dir(built, "llama", 1, 1), root)
    watcher = subprocess.Popen(  # 2 ranks: rank 0 looks, both export
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "distconv", "export", "--watch", str(root), "--save", str(save), "--poll", "0.2", "--watch-timeout", "10"],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        end = time.monotonic() + 300
        while not (save / "iter_0000100" / "distconv.json").exists():
            assert watcher.poll() is None and time.monotonic() < end, watcher.communicate()[1][-3000:]
            time.sleep(0.1)
        # training saves iteration 200: the folder first, the tracker last (the same weights will do)
        shutil.copytree(root / "iter_0000100", root / "iter_0000200")
        (root / "latest_checkpointed_iteration.txt").write_text("200")
        stdout, stderr = watcher.communicate(timeout=300)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, stderr[-3000:]
    assert "iteration 100 -> " in stdout and "iteration 200 -> " in stdout
    assert stdout.count("plan        2 rank(s)") == 2  # rank 0 alone prints, once per export
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000100", "iter_0000200"]
    assert json.loads((save / "iter_0000200" / "distconv.json").read_text())["source"]["iteration"] == 200

    once = ["export", "--watch", str(root), "--save", str(save), "--once"]
    skipped = distconv_cli(*once)
    assert skipped.returncode == 0 and "already holds this export" in skipped.stdout, skipped.stderr[-2000:]
    (save / "iter_0000200" / "model-00001-of-00001.safetensors").unlink()  # an unfinished/damaged export
    redone = distconv_cli(*once)
    assert redone.returncode == 0 and "redoing an unfinished export" in redone.stdout, redone.stderr[-2000:]
    assert _max_diff(built, save / "iter_0000200") <= TOL


def test_watch_applies_every_export_option(built, tmp_path):
    root, save = layout_dir(built, "llama", 1, 1), tmp_path / "hf"
    once = ["export", "--watch", str(root), "--save", str(save), "--once", "--format", "torch"]
    first = distconv_cli(*once)
    assert first.returncode == 0, first.stderr[-3000:]
    out = save / "iter_0000100"
    assert sorted(p.name for p in out.glob("model*")) == ["model.pt"]
    assert json.loads((out / "distconv.json").read_text())["source"]["options"]["format"] == "torch"
    before = (out / "model.pt").stat().st_mtime_ns
    again = distconv_cli(*once, "--overwrite")  # redoes a finished export, as a plain export would
    assert again.returncode == 0 and "already holds" not in again.stdout and "wrote " in again.stdout, again.stderr[-3000:]
    assert (out / "model.pt").stat().st_mtime_ns != before


@pytest.mark.parametrize("tracker,extra,needle", [
    ("100", ["--iteration", "100"], "--iteration does not combine with --watch"),
    ("garbage\n", [], "latest_checkpointed_iteration.txt holds 'garbage', neither an iteration number nor 'release'"),
])
def test_watch_refusals(tmp_path, tracker, extra, needle):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text(tracker)
    proc = distconv_cli("export", "--watch", str(tmp_path / "run"), "--save", str(tmp_path / "hf"), "--once", *extra)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("distconv: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "hf").exists()


def test_every_export_option_reaches_export():
    """Each ``export`` flag but the source, target and watch-only ones is a keyword of ``distconv.export``."""
    opts = _parser().parse_args(["export", "--load", "x", "--save", "y"])
    flags = set(vars(opts)) - {"command", "load", "watch", "save", "poll", "watch_timeout", "once"}
    keywords = {f.name for f in dataclasses.fields(ExportOptions)} - {"save"}
    assert {"timeout_s" if f == "timeout" else f for f in flags} == set(export_keywords(opts)) == keywords
    with pytest.raises(DistconvError, match="--watch-timeout, --once: only with --watch"):
        _dispatch(_parser().parse_args(["export", "--load", "x", "--save", "y", "--once", "--watch-timeout", "5"]))


def test_watch_targets():
    assert target("/o", 1200) == Path("/o/iter_0001200")
    assert target("/o", "release") == Path("/o/release")
    assert target("/o/hf-{iteration}", 1200) == Path("/o/hf-1200")
    assert target("/o/{name}-hf", 7) == Path("/o/iter_0000007-hf")


def test_verify_accepts_a_good_export_and_rejects_a_wrong_one(reported, built, tmp_path):
    out, _, _ = reported
    load = str(layout_dir(built, "llama", 1, 2))  # the same weights, saved at another layout
    good = distconv_cli("verify", "--load", load, "--hf", str(out), "--tol", "1e-4", "--json")
    assert good.returncode == 0, good.stderr[-3000:]
    result = json.loads(good.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert result["format"] == "torch_dist"

    wrong = tmp_path / "wrong"
    shutil.copytree(out, wrong)
    shard = wrong / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    a, b = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, shard, metadata={"format": "pt"})
    bad = distconv_cli("verify", "--load", load, "--hf", str(wrong), "--tol", "1e-4")
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "MISMATCH" in bad.stdout and "(torch_dist checkpoint)" in bad.stdout


def test_verify_moe_export_from_an_expert_parallel_layout(built, tmp_path):
    out = tmp_path / "hf"
    export = distconv_cli("export", "--load", str(layout_dir(built, "mixtral", 1, 1)), "--save", str(out), "--quiet")
    assert export.returncode == 0, export.stderr[-3000:]
    check = distconv_cli("verify", "--load", str(layout_dir(built, "mixtral", 2, 1, 2)), "--hf", str(out), "--tol", "1e-4", "--json")
    assert check.returncode == 0, check.stderr[-3000:]
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["top1_agreement"] == 1.0


def test_verify_leaves_torch_and_megatron_as_they_were(built, tmp_path):
    """verify's CPU stand-ins for megatron-core's CUDA calls are undone: an export in the same
    process afterwards runs, and torch's and megatron-core's functions are the originals."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.transformer import multi_latent_attention

    import distconv
    from distconv.verify import verify

    def state() -> dict:
        tracker = tensor_parallel.get_cuda_rng_tracker()
        return {"synchronize": torch.cuda.synchronize, "current_device": torch.cuda.current_device,
                "Tensor.cuda": torch.Tensor.cuda, "rng fork": vars(tracker).get("fork"),
                "HAVE_TE": multi_latent_attention.HAVE_TE}

    load = layout_dir(built, "llama", 2, 2)
    first = distconv.export(load, tmp_path / "hf", quiet=True)
    before = state()
    result = verify(load, tmp_path / "hf", tol=1e-4)
    assert result["ok"], result
    assert state() == before
    again = distconv.export(load, tmp_path / "hf2", quiet=True)
    assert again["tensors"] == first["tensors"]
    if not torch.cuda.is_available():  # without CUDA, tensors really cannot move to a GPU again
        with pytest.raises((AssertionError, RuntimeError)):
            torch.ones(1).cuda()
