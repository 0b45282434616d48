"""A running vLLM engine that a trainer refits through distconv's ``distconv_gloo`` engine.

Run by the vLLM venv's python (``tests/setup_vllm.sh``) with the repository on ``PYTHONPATH``:

    .venv-vllm/bin/python tests/vllm_live.py WORKDIR [DTYPE]

It waits for ``WORKDIR/hf0/config.json`` (written by the trainer: the served model's config; the
engine starts with vLLM's dummy weights, so nothing but a sync gives it real ones), starts an
in-process ``LLM`` (``DTYPE``: float32 unless given) with ``weight_transfer_config={"backend": "distconv_gloo"}`` and serves its
weight-update calls, plus ``generate``, the log of calls and the last sync's ``update_weights``
infos (``updates``: each one's names and per-tensor sources), to the trainer over XML-RPC on
127.0.0.1 (no pickle): the four calls are those of vLLM's ``VLLMWeightSyncClient``. The port goes
into ``WORKDIR/rpc_port``. ``serve(NAME)`` replaces the engine by one of ``WORKDIR/NAME/config.json``
(the Qwen3-MoE rounds: the same process, a second model). ``stop`` ends it;
``WORKDIR/vllm_live.json`` then holds the call log, the start-up times and the peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from xmlrpc.server import SimpleXMLRPCServer

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    work = Path(sys.argv[1])
    dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
    folder = work / "hf0"
    deadline = time.monotonic() + 600
    while not (folder / "config.json").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {folder}/config.json after 600 s")
        time.sleep(0.2)
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    from distconv.vllm import BACKEND, register

    register()
    engine: list = []
    startup: list[float] = []
    calls: list[str] = []
    updates: list[dict[str, list]] = []  # the update infos since the last start: names and srcs
    done = []

    def serve(name: str) -> None:
        """A fresh engine with dummy weights from ``WORKDIR/name/config.json`` (the old one shut down)."""
        if engine:
            old = engine.pop()
            old.llm_engine.engine_core.shutdown()  # it may be mid-update (a failed sync): never finished
            del old
            cleanup_dist_env_and_memory()
        started = time.perf_counter()
        engine.append(LLM(model=str(work / name), load_format="dummy", dtype=dtype, enforce_eager=True,
                          skip_tokenizer_init=True, max_model_len=64, max_num_seqs=2, seed=0,
                          weight_transfer_config={"backend": BACKEND}))
        startup.append(time.perf_counter() - started)

    serve(folder.name)

    def llm():
        return engine[0]

    def logged(name: str, fn):
        def call(*args: Any) -> Any:
            calls.append(name)
            try:
                result = fn(*args)
            except Exception:
                calls.append(f"{name} failed")
                raise
            return True if result is None else result
        return call

    def start() -> None:
        updates.clear()
        llm().start_weight_update()

    def update(info: dict[str, Any]) -> None:
        updates.append({"names": info["names"], "srcs": info["srcs"]})
        llm().update_weights({"update_info": info})

    def finish(version: str | None = None) -> None:
        llm().finish_weight_update(version)
        llm().reset_prefix_cache()  # KV blocks computed with the old weights must not be reused

    def generate(prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0, detokenize=False)
        try:
            outputs = llm().generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        except Exception as e:  # what the engine serves after a failed sync
            return {"error": f"{type(e).__name__}: {e}"[:2000]}
        return {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                "prompt_logprobs": [[step[tok].logprob for tok, step in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
                                    for o in outputs]}

    server = SimpleXMLRPCServer(("127.0.0.1", 0), allow_none=True, logRequests=False)
    server.register_function(logged("init", lambda info: llm().init_weight_transfer_engine({"init_info": info})),
                             "init_weight_transfer_engine")
    server.register_function(logged("start", start), "start_weight_update")
    server.register_function(logged("update", update), "update_weights")
    server.register_function(logged("finish", finish), "finish_weight_update")
    server.register_function(logged("generate", generate), "generate")
    server.register_function(logged("serve", serve), "serve")
    server.register_function(lambda: list(calls), "calls")
    server.register_function(lambda: list(updates), "updates")
    server.register_function(lambda: done.append(True) or True, "stop")
    (work / "rpc_port.tmp").write_text(str(server.server_address[1]))
    (work / "rpc_port.tmp").rename(work / "rpc_port")
    server.timeout = 1.0
    while not done and time.monotonic() < deadline + 900:
        server.handle_request()
    (work / "vllm_live.json").write_text(json.dumps({"calls": calls, "startup_s": startup,
                                                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # an engine left mid-update (the failure case) is not torn down
