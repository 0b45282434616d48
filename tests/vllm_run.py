"""Load HF folders in vLLM, one after another in this process; record greedy tokens and logprobs.

Run by the vLLM venv's python (``tests/setup_vllm.sh``), not the project's: it imports only vLLM.

    .venv-vllm/bin/python tests/vllm_run.py JOBS.json RESULTS.json

``JOBS.json``: ``{"prompts": [[token ids], ...], "max_tokens": N, "folders": {name: folder}}``; a
folder may be ``[folder, {LLM keyword: value}]`` to change what ``LLM`` is given: a
``speculative_config`` to decode with speculation (e.g. its MTP layers), another ``dtype``.
``RESULTS.json``: per name, ``{"tokens": [[generated ids]], "prompt_logprobs": [[logprob of each
prompt token after the first]], "draft_tokens": N}`` (tokens proposed by speculation), or
``{"error": text}`` when vLLM failed on that folder.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only


def generate(folder: Path, prompts: list[list[int]], max_tokens: int, options: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    has_tokenizer = (folder / "tokenizer_config.json").exists()
    speculative = options.get("speculative_config")
    if json.loads((folder / "config.json").read_text()).get("kv_lora_rank"):
        # MLA: on a CPU with AMX tiles vLLM picks its AMX_MLA backend, which takes bf16 weights only
        # (it fails on these float32 runs); CPU_MLA is the backend it uses on every other CPU
        options = {"attention_backend": "CPU_MLA", **options}
    llm = LLM(**{"model": str(folder), "dtype": "float32", "enforce_eager": True, "skip_tokenizer_init": not has_tokenizer,
                 "max_model_len": 64, "max_num_seqs": len(prompts), "seed": 0, "disable_log_stats": speculative is None,
                 **options})
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0,
                                detokenize=has_tokenizer)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        drafts = [m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_draft_tokens"] if speculative else []
        return {
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "prompt_logprobs": [[step[tok].logprob for tok, step in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
                                for o in outputs],
            "draft_tokens": sum(drafts),
        }
    finally:
        del llm
        _release()


def _release() -> None:
    """Tear down what one LLM set up, so that the next one can start in this process."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results: dict[str, Any] = {}
    for name, folder in jobs["folders"].items():
        folder, options = folder if isinstance(folder, list) else (folder, {})
        try:
            results[name] = generate(Path(folder), jobs["prompts"], jobs["max_tokens"], options)
        except Exception as e:  # recorded per folder: the test names the family and vLLM's error
            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
