"""Live weight sync benchmark: a live model refitting a running vLLM, against a plain copy of the same bytes.

    python -m tests.benchmarks.live_sync [--gb 2] [--tp 2 | --pp 2] [--dtype bf16] [--window 256MiB] [--workdir DIR]

In one run:

1. starts vLLM (``tests/vllm_live.py`` in the vLLM venv: an in-process engine with the
   ``distconv_gloo`` weight-transfer engine and dummy weights) and a plain receiver process
   (this module with ``--receive``);
2. runs a 2-rank torchrun job (this module with ``--job``) that builds the benchmark's
   Llama-shaped model of ``--gb`` GB of bf16 weights (``make_checkpoint.shape_args``) live at
   ``--tp`` x ``--pp`` with random weights, makes a ``distconv.weights(model=...)`` source,
   then measures, each once, in this order:
   - the pass alone: every group gathered and mapped on rank 0, handed to nothing;
   - the sync: ``GlooSender.send`` into vLLM (start, one ``update_weights`` per group while rank
     0 sends it, finish);
   - the copy: the same bytes moved the way any sync through rank 0 must move them, with
     nothing else done: rank 1's share of the weights to rank 0 (over the job's gloo group, in
     16 MiB blocks) overlapped with every byte of the synced tensors from rank 0 to the receiver
     process (point-to-point over a gloo group like the sync's, in 16 MiB blocks);
3. prints the figures: seconds, GB/s of the synced bytes, sync / copy, the number of groups,
   each rank's peak RSS after building the model and after the sync (``ru_maxrss``), and the vLLM
   process's peak RSS, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16 << 20  # bytes per transfer of the copy


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, timeout_s: float = 900) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {path} after {timeout_s:g} s")
        time.sleep(0.2)
    return path.read_text()


def receive(work: Path) -> None:
    """The copy's receiver: joins rank 0's gloo group and takes ``nbytes`` in ``BLOCK`` pieces."""
    import torch

    from distconv.vllm.link import gloo_group

    port, nbytes = (int(x) for x in _wait_for(work / "copy_port").split())
    group = gloo_group("127.0.0.1", port, 1, 2, 600)
    buf = torch.empty(BLOCK, dtype=torch.uint8)
    for start in range(0, nbytes, BLOCK):
        group.recv([buf[:min(BLOCK, nbytes - start)]], 0, 0).wait()
    (work / "copy_done").write_text("ok")


def job(work: Path, gb: float, tp: int, pp: int, dtype: str, window: str) -> None:
    """One rank of the 2-rank job (under torchrun)."""
    import torch
    import torch.distributed as dist

    import distconv
    from distconv.megatron.model import build_gpt, cpu_compat
    from distconv.vllm.link import gloo_group
    from distconv.vllm.sender import GlooSender, Link
    from tests.benchmarks.make_checkpoint import shape_args
    from tests.fixtures.megatron_cpu import model_parallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {"rank": rank}
    with cpu_compat(), model_parallel(tp, pp):
        args = shape_args(gb, tp, pp, 2)
        model = build_gpt(args, tp, pp, init=False).to(torch.bfloat16)
        gen = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        out["params_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["rss_after_build"] = _rss_peak()
        with distconv.weights(model=model, args=args, dtype=dtype, window=window) as source:
            meta = source.metadata()
            nbytes = sum(torch.Size(m.shape).numel() * m.dtype.itemsize for m in meta)
            out["synced_bytes"], out["tensors"] = nbytes, len(meta)
            client = None
            if rank == 0:
                (work / "hf0").mkdir(exist_ok=True)
                source.config.to_json_file(str(work / "hf0" / "config.json"))
                client = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{_wait_for(work / 'rpc_port')}", allow_none=True)
            dist.barrier()
            started = time.perf_counter()
            groups = sum(1 for _ in source.iter_groups())
            out["pass_s"], out["pass_groups"] = time.perf_counter() - started, groups
            out["rss_after_pass"] = _rss_peak()
            port = [_free_port()]
            dist.broadcast_object_list(port)
            sender = GlooSender(source, client, Link("127.0.0.1", port[0], workers=1, timeout_s=600))
            dist.barrier()
            out["sync"] = sender.send("bench")
            out["rss_after_sync"] = _rss_peak()
            if rank == 0:
                client.stop()

        # the copy: rank 1's share to rank 0, overlapped with every synced byte from rank 0 to the receiver
        share = [out["params_bytes"]]
        dist.broadcast_object_list(share, src=1)
        share_bytes = share[0]
        dist.barrier()
        started = time.perf_counter()
        if rank == 1:
            data = torch.empty(BLOCK, dtype=torch.uint8)
            for start in range(0, share_bytes, BLOCK):
                dist.send(data[:min(BLOCK, share_bytes - start)], 0)
        else:
            blocks: queue.Queue = queue.Queue(maxsize=4)

            def take() -> None:
                for start in range(0, share_bytes, BLOCK):
                    buf = torch.empty(min(BLOCK, share_bytes - start), dtype=torch.uint8)
                    dist.recv(buf, 1)
                    blocks.put(buf)

            port = _free_port()
            (work / "copy_port").write_text(f"{port} {nbytes}")
            group = gloo_group("127.0.0.1", port, 0, 2, 600)
            started = time.perf_counter()
            reader = threading.Thread(target=take)
            reader.start()
            mine = torch.empty(BLOCK, dtype=torch.uint8)
            for start in range(0, nbytes, BLOCK):
                if start < share_bytes:
                    blocks.get()  # rank 1's block arrived before the same block goes on
                group.send([mine[:min(BLOCK, nbytes - start)]], 1, 0).wait()
            while reader.is_alive() or not blocks.empty():  # rank 1's share beyond the synced bytes, if any
                try:
                    blocks.get(timeout=0.1)
                except queue.Empty:
                    pass
            reader.join()
        dist.barrier()
        out["copy_s"] = time.perf_counter() - started
        out["copy_rank1_bytes"] = share_bytes
    (work / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="weight size of the live model (GB of bf16)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", help="distconv.weights' dtype (what travels)")
    parser.add_argument("--window", default="256MiB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distconv-bench/live"))
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--receive", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    work = opts.workdir
    if opts.receive:
        return receive(work)
    if opts.job:
        return job(work, opts.gb, opts.tp, opts.pp, opts.dtype, opts.window)
    if opts.tp * opts.pp != 2:
        raise SystemExit("--tp x --pp must be 2 (the job has 2 ranks)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    vllm_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[opts.dtype]
    logs = {name: open(work / f"{name}.log", "w") for name in ("vllm", "receiver", "job")}
    vllm = subprocess.Popen([str(ROOT / ".venv-vllm" / "bin" / "python"), str(ROOT / "tests" / "vllm_live.py"), str(work),
                             vllm_dtype], env=env, stdout=logs["vllm"], stderr=subprocess.STDOUT, cwd=work)
    receiver = subprocess.Popen([sys.executable, "-m", "tests.benchmarks.live_sync", "--receive", "--workdir", str(work)],
                                env=env, stdout=logs["receiver"], stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "tests.benchmarks.live_sync", "--job", "--gb", str(opts.gb), "--tp", str(opts.tp), "--pp",
                        str(opts.pp), "--dtype", opts.dtype, "--window", opts.window, "--workdir", str(work)],
                       env=env, cwd=ROOT, check=True, stdout=logs["job"], stderr=subprocess.STDOUT)
        vllm.wait(timeout=300)
        receiver.wait(timeout=60)
    finally:
        for proc in (vllm, receiver):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    r0, r1 = (json.loads((work / f"rank{r}.json").read_text()) for r in range(2))
    nbytes, sync = r0["synced_bytes"], r0["sync"]
    vllm_info = json.loads((work / "vllm_live.json").read_text())
    vllm_peak = vllm_info["peak_rss"]
    result = {"gb": opts.gb, "tp": opts.tp, "pp": opts.pp, "dtype": opts.dtype, "window": opts.window,
              "synced_bytes": nbytes, "tensors": r0["tensors"], "groups": sync["groups"], "pass_s": r0["pass_s"],
              "sync_s": sync["seconds"], "copy_s": r0["copy_s"], "copy_rank1_bytes": r0["copy_rank1_bytes"],
              "ranks": [{k: r[k] for k in ("params_bytes", "rss_after_build", "rss_after_pass", "rss_after_sync")}
                        for r in (r0, r1)],
              "vllm_peak_rss": vllm_peak, "vllm_startup_s": vllm_info["startup_s"],
              "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(f"live sync of {nbytes / 1e9:.2f} GB ({opts.dtype}, {r0['tensors']} tensors, {sync['groups']} groups) from TP{opts.tp} "
          f"PP{opts.pp}, --window {opts.window}")
    for name, seconds in (("pass alone (gather + map on rank 0)", r0["pass_s"]), ("sync into vLLM", sync["seconds"]),
                          ("copy of the same bytes", r0["copy_s"])):
        print(f"  {name:38} {seconds:7.2f} s  {nbytes / seconds / 1e9:5.2f} GB/s  x copy {seconds / r0['copy_s']:5.2f}")
    for r, info in enumerate(result["ranks"]):
        print(f"  rank {r}: weights held {info['params_bytes'] / 1e9:.2f} GB, peak RSS after build "
              f"{info['rss_after_build'] / 1e9:.2f} GB, after the pass {info['rss_after_pass'] / 1e9:.2f} GB, "
              f"after the sync {info['rss_after_sync'] / 1e9:.2f} GB")
    print(f"  vLLM process peak RSS {vllm_peak / 1e9:.2f} GB; load average (1 min) {result['load_avg_1m']:.1f} "
          f"on {result['cpus']} CPUs")
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(f"written {work / 'result.json'}")


if __name__ == "__main__":
    main()
