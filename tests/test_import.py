"""Import (HF and MindSpore safetensors -> Megatron torch_dist) and reshard, end to end.

Source models are tiny random transformers models made here. Everything distributed runs in
ONE torchrun launch (tests/import_jobs.py); the proof for each written checkpoint is
megatron-core itself: the chunks a ``GPTModel`` built at the target layout saves equal the
stored chunks, a ``RAISE_ALL`` strict load succeeds, and the loaded model's logits equal
transformers' logits of the source model (fp32, <= 1e-4).

The MindSpore sources are synthetic: an HF model's tensors renamed to MindSpore Transformers'
parameter names (no MindSpore install is needed or used), so they carry the same values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distconv.errors import DistconvError

from conftest import ROOT, distconv_cli, hf_tensors, torchrun
from fixtures.build import FIXTURES
from kimi import FP8, KIMI_ROPE, hub_config, transformers_copy, write_release
from mtp_reference import hf_mtp_logits

TOL = 1e-4
VOCAB = 250
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(11)).tolist()
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=128, rms_norm_eps=1e-6)
MODELS = {  # name -> (config class name, config overrides, dtype)
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False), torch.float32),
    "llama_mha": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0), torch.float32),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True), torch.bfloat16),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False), torch.float32),
    # the window (64) is longer than the test sequence, so megatron-core's full attention agrees
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=64, tie_word_embeddings=False), torch.float32),
}
IMPORTS = [("llama", 2, 2), ("llama_mha", 2, 2), ("qwen2", 2, 2), ("qwen3", 2, 1), ("mistral", 1, 2), ("qwen3_5", 2, 2)]
# and as block-wise FP8 releases (Qwen3.5's table has no FP8 layout)
FP8_IMPORTS = [c for c in IMPORTS if c[0] != "qwen3_5"]
# MoE imports: (name, TP, PP, EP, ETP (None: = TP), grouped GEMM, --transformer-impl); every layout
# fits the launch's 4 ranks. transformer_engine (the default) is checked against megatron-core's TE
# spec (under fixtures.te_spec's stand-ins), local against its local spec.
TE, LOCAL = "transformer_engine", "local"
MOE_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe")
MOE_IMPORTS = [(n, *layout, TE) for n in MOE_NAMES for layout in
               ((1, 1, 2, None, False), (1, 2, 2, None, False), (2, 1, 2, 2, False), (2, 1, 2, 1, False))] + [
    ("mixtral", 1, 1, 4, None, False, TE),  # EP4: one expert per rank
    # grouped GEMM: the local GroupedMLP's chunks; TE's TEGroupedMLP saves SequentialMLP's
    ("mixtral", 2, 1, 2, 1, True, LOCAL), ("qwen2_moe", 1, 2, 2, None, True, LOCAL), ("qwen3_moe", 2, 1, 2, 2, True, TE),
    ("glm4_moe", 1, 1, 2, None, False, TE), ("glm4_moe", 2, 1, 2, 1, False, TE),
    ("deepseek_v3", 1, 1, 2, None, False, TE), ("deepseek_v3", 2, 1, 2, 1, False, TE),
    ("deepseek_v3", 1, 2, 2, None, False, TE), ("glm4_moe", 2, 2, 1, None, False, TE),  # MTP on the last stage
    ("deepseek_v3_q_proj", 2, 1, 2, None, False, TE),
    # DeepSeek-V3.2 and GLM-5: DeepSeek-V3 with the DSA indexer (megatron-core's TE spec is its only one)
    ("deepseek_v32", 2, 1, 2, 1, False, TE), ("glm_moe_dsa", 2, 1, 2, 1, False, TE),
    # gated delta net layers (megatron-core builds them from its TE spec only): TP2 x EP2, PP2 x EP2
    ("qwen3_next", 2, 1, 2, None, False, TE), ("qwen3_next", 1, 2, 2, None, False, TE),
    ("qwen3_5_moe", 2, 1, 2, 1, False, TE),
    # gpt-oss: expert biases only at expert TP 1; the TE spec's attention saves an extra state beside the sinks
    ("gpt_oss", 2, 1, 2, 1, False, TE), ("gpt_oss", 1, 2, 2, None, False, TE), ("gpt_oss", 1, 1, 2, None, False, LOCAL),
    # Nemotron-H (megatron-core's hybrid MambaModel, its TE spec only): TP2 (the Mamba mixer's split keys), PP2
    ("nemotron_h", 2, 1, 1, None, False, TE), ("nemotron_h", 1, 2, 1, None, False, TE),
]
# block-wise FP8 MoE releases (every expert's and attention's projections quantized, the router,
# norms, embeddings and MTP layers' own projection in high precision), imported at EP x ETP:
# (name, TP, PP, EP, ETP)
FP8_MOE_IMPORTS = [("qwen3_moe", 2, 1, 2, 1), ("qwen2_moe", 1, 2, 2, None), ("deepseek_v3", 2, 1, 2, 1),
                   ("glm4_moe", 1, 2, 2, None), ("mixtral", 1, 1, 4, None), ("deepseek_v32", 1, 2, 2, None)]
# exported back and compared with the source: each family at its most split layout, and each chunking
MOE_ROUND_TRIPS = [c for c in MOE_IMPORTS if c[3:5] == (2, 1) or c[5] or c[3] == 4 or c[0] in ("qwen3_next", "nemotron_h")]
MOE = dict(intermediate_size=32)  # the experts' width (Mixtral); Qwen's dense layers keep SMALL's 128
MODELS.update({
    "mixtral": ("MixtralConfig", dict(MOE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      tie_word_embeddings=False), torch.float32),
    # a dense first layer, a gated shared expert, q/k/v biases, softmax over all experts then top-k
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, mlp_only_layers=[0], norm_topk_prob=False,
                                         tie_word_embeddings=False), torch.float32),
    # 8 experts, top-3 renormalised, q/k norms, head_dim 32 (not hidden / heads), tied embeddings
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=3,
                                         moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=True),
                  torch.float32),
    # GLM-4.5: q/k/v biases, q/k norms, half of head_dim 32 rotated, a dense first layer, two shared
    # experts' width, sigmoid top-2 within 1 of 2 groups, scaled, a random expert bias, two MTP layers
    "glm4_moe": ("Glm4MoeConfig", dict(num_key_value_heads=2, head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
                                       moe_intermediate_size=16, n_shared_experts=2, first_k_dense_replace=1, n_group=2,
                                       topk_group=1, routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
                                       partial_rotary_factor=0.5, num_nextn_predict_layers=2, tie_word_embeddings=False),
                 torch.float32),
    # DeepSeek-V3: MLA with q LoRA and YaRN (the export fixture's), a dense first layer, one shared
    # expert, sigmoid top-2 within 1 of 2 groups, scaled, a random expert bias, one MTP layer; the
    # routing keys the hub configs carry (transformers ignores them)
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, q_lora_rank=24, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=16384, rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1, topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1,
        tie_word_embeddings=False), torch.float32),
})
# Qwen3-Next: gated delta net layers (2 key heads, 4 value heads of 16) alternating with gated attention
# (head_dim 32, a quarter rotated), a dense first layer, a gated shared expert, zero-centred norms
# (HF's linear_attn.norm plain); Qwen3.5's text MoE model: the same without the dense layer
QWEN3_NEXT = dict(num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                  linear_value_head_dim=16, full_attention_interval=2, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, shared_expert_intermediate_size=48, tie_word_embeddings=False)
MODELS["qwen3_next"] = ("Qwen3NextConfig", dict(QWEN3_NEXT, mlp_only_layers=[0]), torch.float32)
MODELS["qwen3_5_moe"] = ("Qwen3_5MoeTextConfig", dict(QWEN3_NEXT, num_experts=8, num_experts_per_tok=3), torch.float32)
# Nemotron-H: Mamba (8 heads of 16, 2 groups, state 16), attention without RoPE (head_dim 16), squared-ReLU
# MLP and MoE layers (sigmoid top-2 of 4 scaled 2.5 with a random e_score_correction_bias, a shared
# expert), a Mamba layer on each of two PP stages
NEMOTRON_H_PATTERN = "M*-EME"
MODELS["nemotron_h"] = ("NemotronHConfig", dict(
    hybrid_override_pattern=NEMOTRON_H_PATTERN, num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16,
    n_groups=2, ssm_state_size=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    layer_norm_epsilon=1e-5, tie_word_embeddings=False), torch.float32)
# dense Qwen3.5: the same gated delta net and attention layers, every MLP dense, a pattern that is no
# interval (Megatron-LM's linear_attention_freq as a list), tied embeddings
MODELS["qwen3_5"] = ("Qwen3_5TextConfig", dict(
    {k: v for k, v in QWEN3_NEXT.items() if k.startswith(("linear_", "num_key_value", "head_dim"))}, tie_word_embeddings=True,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"]), torch.float32)
# gpt-oss (bf16, as released): sinks, a 4-token window on every other layer, YaRN (transformers' default),
# biases everywhere, a GLU clamped at 0.5; and with square experts (F == H == 64), two layers
MODELS["gpt_oss"] = ("GptOssConfig", dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                          num_key_value_heads=2, head_dim=16, sliding_window=4, swiglu_limit=0.5,
                                          tie_word_embeddings=False), torch.bfloat16)
MODELS["gpt_oss_square"] = ("GptOssConfig", dict(MODELS["gpt_oss"][1], intermediate_size=64, num_hidden_layers=2),
                            torch.bfloat16)
# DeepSeek-V3.2: DeepSeek-V3's model (no rope_interleave field) with the DSA indexer, 2 heads of 16
# keeping 4 of the test's 12 tokens; GLM-5: the same model as GlmMoeDsa (interleaved indexer RoPE).
# bf16, as released, imported to float32 (``IMPORT_DTYPES``), where the indexer's gamma fold
# (``families.dsa``) is exact, and exported back as float32 (the source's values, every one exactly)
DSA = dict({k: v for k, v in MODELS["deepseek_v3"][1].items() if k != "rope_interleave"}, index_n_heads=2,
           index_head_dim=16, index_topk=4)
MODELS["deepseek_v32"] = ("DeepseekV32Config", DSA, torch.bfloat16)
MODELS["glm_moe_dsa"] = ("GlmMoeDsaConfig", {k: v for k, v in DSA.items() if k not in ("topk_method", "scoring_func",
                                                                                         "moe_layer_freq")}, torch.bfloat16)
IMPORT_DTYPES = {"deepseek_v32": "fp32", "glm_moe_dsa": "fp32"}  # name -> import --dtype
# the other MLA query path (q_proj, no q LoRA), plain RoPE, one group, every layer MoE (stacked keys)
MODELS["deepseek_v3_q_proj"] = ("DeepseekV3Config", dict(
    MODELS["deepseek_v3"][1], q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1,
    max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), torch.float32)

# Kimi-K2 (its FP8 release, kimi_k2) and Moonlight (bf16, deepseek_v3; no q LoRA, rms_norm_eps 1e-5, two
# shared experts' width, no RoPE scaling): DeepSeek-V3's model with one group, no MTP layers
KIMI_ROPE_V5 = {"rope_type": "yarn", "rope_theta": 50000.0, **{k: v for k, v in KIMI_ROPE.items() if k != "type"}}
MODELS["kimi_k2"] = ("DeepseekV3Config", dict(
    MODELS["deepseek_v3"][1], n_group=1, topk_group=1, routed_scaling_factor=2.827, num_nextn_predict_layers=0,
    max_position_embeddings=131072, rope_parameters=KIMI_ROPE_V5), torch.float32)
MODELS["moonlight"] = ("DeepseekV3Config", dict(
    MODELS["deepseek_v3"][1], q_lora_rank=None, n_group=1, topk_group=1, routed_scaling_factor=2.446, n_shared_experts=2,
    num_nextn_predict_layers=0, rms_norm_eps=1e-5, max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 50000.0}), torch.bfloat16)


def to_release(hf: Path, out: Path) -> Path:
    """Kimi-K2's or Moonlight's HF model as its release writes it (``tests/kimi.py``): the hub config
    (``kimi_k2`` with YaRN's old spelling, or ``deepseek_v3``), an ``auto_map`` and the release's code
    files; bf16 but for Kimi-K2's expert bias (float32) and the weights its FP8 release quantizes
    (``to_fp8``), Moonlight's expert bias bf16 too, as on the hub."""
    c = {**SMALL, **MODELS[hf.name][1]}
    kimi = hf.name == "kimi_k2"
    config = hub_config(
        model_type="kimi_k2" if kimi else "deepseek_v3", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
        dense_layers=c["first_k_dense_replace"], experts=c["n_routed_experts"], topk=c["num_experts_per_tok"],
        expert_width=c["moe_intermediate_size"], shared=c["n_shared_experts"], q_lora_rank=c["q_lora_rank"],
        kv_lora_rank=c["kv_lora_rank"], nope=c["qk_nope_head_dim"], rope=c["qk_rope_head_dim"], v=c["v_head_dim"],
        scaling=c["routed_scaling_factor"], rope_theta=c["rope_parameters"]["rope_theta"],
        rope_scaling=KIMI_ROPE if kimi else None, eps=c["rms_norm_eps"], max_positions=c["max_position_embeddings"])
    folder = write_release(out / f"{hf.name}_release", config)
    state = {k: v if kimi and k.endswith("e_score_correction_bias") else v.bfloat16() for k, v in hf_tensors(hf).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def moe_dir(name: str, tp: int, pp: int, ep: int, etp: int | None, grouped: bool, impl: str = TE) -> str:
    return (f"{name}_tp{tp}pp{pp}ep{ep}" + (f"etp{etp}" if etp not in (None, tp) else "") + ("_gg" if grouped else "")
            + ("_local" if impl == LOCAL else ""))


# MoE reshards: name -> (source, target TP, PP, EP, ETP, grouped GEMM (None: the source's),
# --transformer-impl (None: the source's)); a source is an output of MOE_IMPORTS or of an earlier
# reshard, or ("fx/...") megatron-core's own save among the test fixtures (local spec)
MOE_RESHARDS = {
    "mixtral_ep2_to_ep1": ("mixtral_tp1pp1ep2", 1, 1, 1, None, None, None),
    "mixtral_ep1_to_pp2ep2_gg": ("mixtral_ep2_to_ep1", 1, 2, 2, None, True, None),  # EP1 -> EP2, sequential -> grouped
    "qwen3_moe_tp2etp2_to_tp1etp1": ("qwen3_moe_tp2pp1ep2", 1, 1, 1, None, None, LOCAL),  # TE -> local
    # PP2 -> PP1, EP2 -> EP4, TP1 -> TP2 with ETP1, grouped -> sequential, local -> TE
    "qwen2_moe_gg_to_tp2ep4etp1": ("qwen2_moe_tp1pp2ep2_gg_local", 2, 1, 4, 1, False, TE),
    "fx_mixtral_to_pp2ep2": ("fx/mixtral/tp2pp1ep2etp1", 1, 2, 2, None, None, None),
    "fx_qwen3_moe_to_ep4_gg": ("fx/qwen3_moe/tp2pp1ep2", 1, 1, 4, None, True, None),
    # MLA: TP2 -> TP1 and EP2 -> EP4; megatron-core's own local-spec save -> the transformer-engine spec
    "deepseek_v3_tp2etp1_to_ep4": ("deepseek_v3_tp2pp1ep2etp1", 1, 1, 4, None, None, None),
    "fx_deepseek_v3_to_tp2ep2etp1": ("fx/deepseek_v3/tp1pp1ep2", 2, 1, 2, 1, None, TE),
    # MTP layers: from the last of two stages to TP2 at PP1 (GLM-4.5, two MTP layers)
    "fx_glm4_moe_pp2_to_tp2etp1": ("fx/glm4_moe/tp1pp2ep2", 2, 1, 2, 1, None, TE),
    # gated delta net layers: megatron-core's own TP2 x EP2 save -> PP2 x EP2, and an import TP2 -> TP1
    "fx_qwen3_next_to_pp2ep2": ("fx/qwen3_next/tp2pp1ep2", 1, 2, 2, None, None, None),
    "qwen3_next_tp2_to_tp1ep4": ("qwen3_next_tp2pp1ep2", 1, 1, 4, None, None, None),
    # gpt-oss: PP2 -> TP2 (sinks split by heads), megatron-core's local-spec save -> the TE spec
    "fx_gpt_oss_pp2_to_tp2etp1": ("fx/gpt_oss/tp1pp2ep2", 2, 1, 2, 1, None, TE),
    # the DSA indexer (replicated): megatron-core's own TP2 x PP2 x EP2 x ETP1 save (MTP on the last stage) -> EP4
    "fx_deepseek_v32_to_ep4": ("fx/deepseek_v32/tp2pp2ep2etp1", 1, 1, 4, None, None, None),
    # hybrid (Mamba) models: megatron-core's own TP2 x PP2 save -> TP2 x PP1
    "fx_nemotron_h_to_tp2": ("fx/nemotron_h/tp2pp2", 2, 1, 1, None, None, None),
}


def moe_model(key: str) -> str:
    """The model an MoE import or reshard output holds."""
    while key in MOE_RESHARDS:
        key = MOE_RESHARDS[key][0]
    return key.split("/")[1] if key.startswith("fx/") else max((n for n in MODELS if key.startswith(n + "_")), key=len)


@torch.no_grad()
def make_hf(folder: Path, name: str) -> Path:
    """A random HF model (norms and biases random too, so a swapped mapping shows), with random
    MTP layers where the config has them (transformers' model does not hold them)."""
    import transformers

    cls_name, overrides, dtype = MODELS[name]
    config = getattr(transformers, cls_name)(**{**SMALL, **overrides})
    config.architectures = [cls_name.replace("TextConfig", "Config").replace("Config", "ForCausalLM")]
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(len(name))
    for pname, p in sorted(model.named_parameters()):
        base = 1.0 if "norm" in pname else 0.0
        p.copy_(base + (0.2 if "norm" in pname else 0.05) * torch.randn(p.shape, generator=gen))
    for bname, b in sorted(model.named_buffers()):  # sigmoid routers' expert bias (a buffer; HF's zeros)
        if bname.endswith("e_score_correction_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    model.to(dtype).save_pretrained(str(folder / name))
    depth = getattr(config, "num_mtp_layers", 0) or getattr(config, "num_nextn_predict_layers", 0) or 0
    if depth:  # as DeepSeek's releases store them: after the last layer, shaped like it, plus their own tensors
        path = folder / name / "model.safetensors"
        state = load_file(str(path))
        n, hidden = config.num_hidden_layers, config.hidden_size
        last = f"model.layers.{n - 1}."
        for layer in range(n, n + depth):
            at = f"model.layers.{layer}."
            own = {at + k.removeprefix(last): t.shape for k, t in state.items() if k.startswith(last)}
            own.update({at + "enorm.weight": (hidden,), at + "hnorm.weight": (hidden,),
                        at + "shared_head.norm.weight": (hidden,), at + "eh_proj.weight": (hidden, 2 * hidden)})
            for pname, shape in sorted(own.items()):
                base = 1.0 if "norm" in pname else 0.0
                state[pname] = (base + (0.2 if "norm" in pname else 0.05) * torch.randn(shape, generator=gen)).to(dtype)
            state[at + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
            state[at + "shared_head.head.weight"] = state["lm_head.weight"].clone()
        save_file(state, str(path), metadata={"format": "pt"})
    return folder / name


def hf_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits



LEGACY_MS = [("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"), (".self_attn.q_proj.", ".attention.wq."),
             (".self_attn.k_proj.", ".attention.wk."), (".self_attn.v_proj.", ".attention.wv."),
             (".self_attn.o_proj.", ".attention.wo."), (".input_layernorm.", ".attention_norm."),
             (".post_attention_layernorm.", ".ffn_norm."), (".mlp.gate_proj.", ".feed_forward.w1."),
             (".mlp.down_proj.", ".feed_forward.w2."), (".mlp.up_proj.", ".feed_forward.w3."),
             ("model.norm.weight", "model.norm_out.weight")]
MCORE_MS = [("model.embed_tokens.", "embedding.word_embeddings."), (".self_attn.q_proj.", ".self_attention.linear_q."),
            (".self_attn.k_proj.", ".self_attention.linear_k."), (".self_attn.v_proj.", ".self_attention.linear_v."),
            (".self_attn.o_proj.", ".self_attention.linear_proj."), (".self_attn.q_norm.", ".self_attention.q_layernorm."),
            (".self_attn.k_norm.", ".self_attention.k_layernorm."), (".mlp.gate_proj.", ".mlp.gating."),
            (".mlp.down_proj.", ".mlp.linear_fc2."), (".mlp.up_proj.", ".mlp.hidden."),
            (".post_attention_layernorm.", ".pre_mlp_layernorm."), ("model.norm.", "decoder.final_layernorm."),
            ("lm_head.", "output_layer."), ("model.layers.", "decoder.layers.")]


def to_mindspore(hf: Path, out: Path, table: list[tuple[str, str]], extra: dict | None = None) -> Path:
    """Write the HF model's tensors under MindSpore Transformers names into one file."""
    renamed = {}
    for name, t in hf_tensors(hf).items():
        for a, b in table:
            name = name.replace(a, b)
        renamed[name] = t
    renamed.update(extra or {})
    out.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out / "model.safetensors"))
    return out


FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj", "q_b_proj",
               "kv_a_proj_with_mqa", "kv_b_proj", "wq_b")  # the DSA indexer's wq_b (vLLM quantizes it; not wk, weights_proj)


def to_mxfp4(hf: Path, out: Path) -> Path:
    """The HF gpt-oss model as its hub release stores it: the experts' weights MXFP4 (quantized by the
    test's own reference, see test_mxfp4) as ``*_blocks``/``*_scales`` of their transpose."""
    from test_mxfp4 import ref_quantize

    quantized = {}
    for name, t in hf_tensors(hf).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            quantized[name + "_blocks"], quantized[name + "_scales"] = ref_quantize(t.transpose(-1, -2).float())
        else:
            quantized[name] = t
    folder = out / f"{hf.name}_mxfp4"
    folder.mkdir(parents=True)
    save_file(quantized, str(folder / "model.safetensors"))
    config = json.loads((hf / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}}))
    return folder


def to_fp8(hf: Path, out: Path) -> tuple[Path, Path]:
    """The HF model as a block-wise FP8 release (quantized by the test's own reference, see
    test_fp8) and, beside it, that release dequantized by the definition to a float32 folder."""
    from test_fp8 import ref_dequantize, ref_quantize

    config = json.loads((hf / "config.json").read_text())
    fp8, deq = {}, {}
    for name, t in hf_tensors(hf).items():
        if name.endswith(".weight") and name.split(".")[-2] in FP8_LINEARS:
            q, scale = ref_quantize(t)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            deq[name] = ref_dequantize(q, scale)
        else:
            fp8[name], deq[name] = t, t.float()
    folders = (out / f"{hf.name}_fp8", out / f"{hf.name}_dequantized")
    for folder, data, extra in zip(folders, (fp8, deq), ({"quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}},
            {"dtype": "float32", "torch_dtype": "float32"})):
        folder.mkdir(parents=True)
        save_file(data, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
    return folders


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, built, legacy_built) -> dict:
    """Build the sources, run every distributed job in one launch, return paths and results."""
    work = tmp_path_factory.mktemp("import")
    hf = {name: make_hf(work / "hf", name) for name in MODELS}
    ms_legacy = to_mindspore(hf["llama"], work / "ms_legacy", LEGACY_MS)
    ms_mcore = to_mindspore(hf["qwen3"], work / "ms_mcore", MCORE_MS)
    (work / "ms_qwen3.json").write_text(json.dumps(dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, kv_channels=32,
        max_position_embeddings=128, norm_epsilon=1e-6, swiglu=True, qk_layernorm=True, rotary_base=10000)))
    meg = lambda name, tp, pp: str(work / "meg" / f"{name}_tp{tp}pp{pp}")  # noqa: E731
    job_list: list[dict] = []
    index: dict[str, int] = {}

    def add(key: str, **job) -> None:
        index[key] = len(job_list)
        job_list.append(job)

    for name, tp, pp in IMPORTS:
        add(f"import {name}", op="import", load=str(hf[name]), save=meg(name, tp, pp), tp=tp, pp=pp, divisible_by=64)
        add(f"check {name}", op="check", root=meg(name, tp, pp), tp=tp, pp=pp, tokens=TOKENS, logits_out=str(work / f"{name}.pt"))
        add(f"export {name}", op="export", load=meg(name, tp, pp), save=str(work / "back" / name))
    for name, tp, pp in FP8_IMPORTS:  # block-wise FP8 releases, imported to fp32
        fp8, deq = to_fp8(hf[name], work / "fp8")
        for kind, folder in (("fp8", fp8), ("dequantized", deq)):
            add(f"import {name} {kind}", op="import", load=str(folder), save=meg(f"{name}_{kind}", tp, pp), tp=tp, pp=pp,
                divisible_by=64, dtype="fp32")
            add(f"export {name} {kind}", op="export", load=meg(f"{name}_{kind}", tp, pp), save=str(work / "back" / f"{name}_{kind}"))
        add(f"check {name} fp8", op="check", root=meg(f"{name}_fp8", tp, pp), tp=tp, pp=pp, tokens=TOKENS,
            logits_out=str(work / f"{name}_fp8.pt"))
        hf[f"{name} dequantized"] = deq
    add("import ms_legacy", op="import_ms", load=str(ms_legacy), save=meg("ms_legacy", 2, 2), tp=2, pp=2, divisible_by=64,
        ms_config=None, flags=dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                   num_query_groups=2, seq_length=128, norm_epsilon=1e-6, swiglu=True))
    add("check ms_legacy", op="check", root=meg("ms_legacy", 2, 2), tp=2, pp=2, tokens=TOKENS, logits_out=str(work / "ms_legacy.pt"))
    add("import ms_mcore", op="import_ms", load=str(ms_mcore / "model.safetensors"), save=meg("ms_mcore", 1, 4), tp=1, pp=4,
        divisible_by=64, ms_config=str(work / "ms_qwen3.json"), flags={})
    add("check ms_mcore", op="check", root=meg("ms_mcore", 1, 4), tp=1, pp=4, tokens=TOKENS, logits_out=str(work / "ms_mcore.pt"))
    # reshard: the base llama fixture (TP2 PP2, with optimizer state) -> TP1 PP4; an imported MHA model -> TP4 PP1
    fx = str(built / "llama" / "tp2pp2")
    ref = torch.load(built / "refs" / "llama.pt")
    add("reshard fx", op="reshard", load=fx, save=meg("fx_llama", 1, 4), tp=1, pp=4)
    add("check fx", op="check", root=meg("fx_llama", 1, 4), tp=1, pp=4, tokens=ref["tokens"].tolist(), logits_out=str(work / "fx_llama.pt"))
    add("export fx orig", op="export", load=fx, save=str(work / "back" / "fx_orig"))
    add("export fx resharded", op="export", load=meg("fx_llama", 1, 4), save=str(work / "back" / "fx_tp1pp4"))
    add("reshard mha", op="reshard", load=meg("llama_mha", 2, 2), save=meg("llama_mha", 4, 1), tp=4, pp=1)
    add("check mha", op="check", root=meg("llama_mha", 4, 1), tp=4, pp=1, tokens=TOKENS, logits_out=str(work / "mha_tp4.pt"))
    add("export mha resharded", op="export", load=meg("llama_mha", 4, 1), save=str(work / "back" / "mha_tp4pp1"))
    # dense Qwen3.5 (megatron-core's own TP2 x PP2 save) -> TP1 x PP4: one gated delta net or attention layer a stage
    q35 = str(built / "qwen3_5" / "tp2pp2")
    add("reshard fx qwen3_5", op="reshard", load=q35, save=meg("fx_qwen3_5", 1, 4), tp=1, pp=4)
    add("check fx qwen3_5", op="check", root=meg("fx_qwen3_5", 1, 4), tp=1, pp=4,
        tokens=torch.load(built / "refs" / "qwen3_5.pt")["tokens"].tolist(), logits_out=str(work / "fx_qwen3_5.pt"))
    add("export qwen3_5_mtp", op="export", load=q35, save=str(work / "back" / "qwen3_5_mtp"))
    add("export fx qwen3_5 resharded", op="export", load=meg("fx_qwen3_5", 1, 4), save=str(work / "back" / "fx_qwen3_5_tp1pp4"))
    # Qwen3-Next's MTP layer as its release lays it out: megatron-core's PP2 x EP2 save exported, imported at TP2 x EP2
    q3m = str(work / "back" / "qwen3_next_mtp")
    add("export qwen3_next_mtp", op="export", load=str(built / "qwen3_next_mtp" / "tp1pp2ep2"), save=q3m)
    add("import qwen3_next_mtp", op="import", load=q3m, save=meg("qwen3_next_mtp", 2, 1), tp=2, pp=1, ep=2, divisible_by=64)
    add("check qwen3_next_mtp", op="check", root=meg("qwen3_next_mtp", 2, 1), tp=2, pp=1, ep=2,
        tokens=torch.load(built / "refs" / "qwen3_next_mtp.pt")["tokens"].tolist(), logits_out=str(work / "qwen3_next_mtp.pt"))
    add("export qwen3_next_mtp back", op="export", load=meg("qwen3_next_mtp", 2, 1), save=q3m + "_back")
    # dense Qwen3.5's (exported above)
    add("import qwen3_5_mtp", op="import", load=str(work / "back" / "qwen3_5_mtp"), save=meg("qwen3_5_mtp", 2, 2), tp=2, pp=2,
        divisible_by=64)
    add("check qwen3_5_mtp", op="check", root=meg("qwen3_5_mtp", 2, 2), tp=2, pp=2,
        tokens=torch.load(built / "refs" / "qwen3_5.pt")["tokens"].tolist(), logits_out=str(work / "qwen3_5_mtp.pt"))
    add("export qwen3_5_mtp back", op="export", load=meg("qwen3_5_mtp", 2, 2), save=str(work / "back" / "qwen3_5_mtp_back"))
    # ... and as Qwen3.5's MoE model (its HF config names the export; the import reads the folder's)
    from distconv.families.qwen3_next import QWEN3_5_MOE
    from distconv.megatron.args import spec_from_args
    from fixtures.megatron_cpu import megatron_args as fixture_args

    q35m_config = work / "qwen3_5_moe_mtp.json"
    q35m_config.write_text(QWEN3_5_MOE.hf_config(
        spec_from_args(fixture_args(**FIXTURES["qwen3_next_mtp"].args)).with_vocab(256)).to_json_string())
    q35m = str(work / "back" / "qwen3_5_moe_mtp")
    add("export qwen3_5_moe_mtp", op="export", load=str(built / "qwen3_next_mtp" / "tp1pp2ep2"), save=q35m,
        hf_config=str(q35m_config))
    add("import qwen3_5_moe_mtp", op="import", load=q35m, save=meg("qwen3_5_moe_mtp", 2, 1), tp=2, pp=1, ep=2, divisible_by=64)
    add("check qwen3_5_moe_mtp", op="check", root=meg("qwen3_5_moe_mtp", 2, 1), tp=2, pp=1, ep=2,
        tokens=torch.load(built / "refs" / "qwen3_next_mtp.pt")["tokens"].tolist(), logits_out=str(work / "qwen3_5_moe_mtp.pt"))
    add("export qwen3_5_moe_mtp back", op="export", load=meg("qwen3_5_moe_mtp", 2, 1), save=q35m + "_back",
        hf_config=str(q35m_config))
    # legacy mp_rank_* (Llama-style, TP2 PP2) -> torch_dist TP1 PP2
    legacy = str(legacy_built / "llama_v3" / "tp2pp2")
    add("reshard legacy", op="reshard", load=legacy, save=meg("legacy_llama", 1, 2), tp=1, pp=2)
    add("export legacy orig", op="export", load=legacy, save=str(work / "back" / "legacy_orig"))
    add("export legacy resharded", op="export", load=meg("legacy_llama", 1, 2), save=str(work / "back" / "legacy_tp1pp2"))
    # MoE: import at EP (x ETP) layouts, check in megatron-core at that layout, export back
    for name, tp, pp, ep, etp, grouped, impl in MOE_IMPORTS:
        key = moe_dir(name, tp, pp, ep, etp, grouped, impl)
        root = str(work / "meg" / key)
        add(f"import {key}", op="import", load=str(hf[name]), save=root, tp=tp, pp=pp, ep=ep, etp=etp,
            moe_grouped_gemm=grouped, transformer_impl=impl, divisible_by=64,
            **({"dtype": IMPORT_DTYPES[name]} if name in IMPORT_DTYPES else {}))
        add(f"check {key}", op="check", root=root, tp=tp, pp=pp, ep=ep, etp=etp, tokens=TOKENS,
            logits_out=str(work / f"{key}.pt"))
        if (name, tp, pp, ep, etp, grouped, impl) in MOE_ROUND_TRIPS:  # Qwen3.5, GLM-5: named by their HF config
            add(f"export {key}", op="export", load=root, save=str(work / "back" / key),
                **({"hf_config": str(hf[name])} if name in ("qwen3_5_moe", "glm_moe_dsa") else {}))
    for key, (source, tp, pp, ep, etp, grouped, impl) in MOE_RESHARDS.items():
        if source.startswith("fx/"):
            load = str(built / source.removeprefix("fx/"))
            tokens = torch.load(built / "refs" / f"{moe_model(key)}.pt")["tokens"].tolist()
            add(f"export {source}", op="export", load=load, save=str(work / "back" / source.replace("/", "_")))
        else:
            load, tokens = str(work / "meg" / source), TOKENS
        add(f"reshard {key}", op="reshard", load=load, save=str(work / "meg" / key), tp=tp, pp=pp, ep=ep, etp=etp,
            moe_grouped_gemm=grouped, transformer_impl=impl)
        add(f"check {key}", op="check", root=str(work / "meg" / key), tp=tp, pp=pp, ep=ep, etp=etp, tokens=tokens,
            logits_out=str(work / f"{key}.pt"))
        add(f"export {key}", op="export", load=str(work / "meg" / key), save=str(work / "back" / key))
    for name, tp, pp, ep, etp in FP8_MOE_IMPORTS:
        fp8, deq = to_fp8(hf[name], work / "fp8")
        for kind, folder in (("fp8", fp8), ("dequantized", deq)):
            add(f"import {name} {kind}", op="import", load=str(folder), save=meg(f"{name}_{kind}", tp, pp), tp=tp, pp=pp,
                ep=ep, etp=etp, divisible_by=64, dtype="fp32")
            add(f"export {name} {kind}", op="export", load=meg(f"{name}_{kind}", tp, pp), save=str(work / "back" / f"{name}_{kind}"))
        add(f"check {name} fp8", op="check", root=meg(f"{name}_fp8", tp, pp), tp=tp, pp=pp, ep=ep, etp=etp, tokens=TOKENS,
            logits_out=str(work / f"{name}_fp8.pt"))
        hf[f"{name} dequantized"] = deq
    # refusals
    add("reshard fx tp4", op="reshard", load=fx, save=str(work / "bad1"), tp=4, pp=1)
    add("reshard optimizer", op="reshard", load=fx, save=str(work / "bad2"), tp=1, pp=2, with_optimizer=True)
    add("import pp3", op="import", load=str(hf["llama"]), save=str(work / "bad3"), tp=1, pp=3)
    add("import dense ep2", op="import", load=str(hf["llama"]), save=str(work / "bad4"), tp=1, pp=1, ep=2)
    add("import mixtral ep3", op="import", load=str(hf["mixtral"]), save=str(work / "bad5"), tp=1, pp=1, ep=3)
    add("reshard dense etp", op="reshard", load=fx, save=str(work / "bad6"), tp=2, pp=2, etp=1)
    add("import mla local", op="import", load=str(hf["deepseek_v3"]), save=str(work / "bad7"), tp=1, pp=1, ep=2,
        transformer_impl=LOCAL)
    add("reshard mla to local", op="reshard", load=str(built / "deepseek_v3" / "tp1pp1"), save=str(work / "bad8"), tp=1, pp=1)
    copy = work / "hf" / "glm4_moe_mtp_copy"  # an MTP layer's embedding that is not the model's
    copy.mkdir()
    state = load_file(str(hf["glm4_moe"] / "model.safetensors"))
    state["model.layers.5.embed_tokens.weight"][7, 3] += 1.0
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "pt"})
    (copy / "config.json").write_text((hf["glm4_moe"] / "config.json").read_text())
    add("import mtp copy differs", op="import", load=str(copy), save=str(work / "bad9"), tp=1, pp=1, ep=2)
    bare = work / "hf" / "glm4_moe_no_copies"  # as GLM-4.6 releases its MTP layers: no embedding or head copies
    bare.mkdir()
    save_file({k: v for k, v in state.items() if not k.endswith(("layers.4.embed_tokens.weight", "layers.5.embed_tokens.weight",
                                                               "shared_head.head.weight"))},
              str(bare / "model.safetensors"), metadata={"format": "pt"})
    (bare / "config.json").write_text((hf["glm4_moe"] / "config.json").read_text())
    # a bf16 DeepSeek-V3 folder as transformers saves one: the router weight and the expert bias
    # stay float32 (``_keep_in_fp32_modules_strict``); the bias holds values bf16 cannot
    mixed = work / "hf" / "deepseek_v3_bf16"
    mixed.mkdir()
    kept = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
    ds = {k: v if k.endswith(kept) else v.bfloat16() for k, v in load_file(str(hf["deepseek_v3"] / "model.safetensors")).items()}
    assert any(not torch.equal(v, v.bfloat16().float()) for k, v in ds.items() if k.endswith(kept[1]))
    save_file(ds, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    (mixed / "config.json").write_text((hf["deepseek_v3"] / "config.json").read_text())
    hf["deepseek_v3_bf16"] = mixed
    add("import ds bf16", op="import", load=str(mixed), save=meg("deepseek_v3_bf16", 1, 1), tp=1, pp=1, ep=2)
    add("export ds bf16", op="export", load=meg("deepseek_v3_bf16", 1, 1), save=str(work / "back" / "deepseek_v3_bf16"))
    add("import mtp no copies", op="import", load=str(bare), save=meg("glm4_moe_no_copies", 2, 1), tp=2, pp=1, ep=2, etp=1)
    add("export mtp no copies", op="export", load=meg("glm4_moe_no_copies", 2, 1), save=str(work / "back" / "no_copies"))
    # gpt-oss: the hub's MXFP4 release at TP2 x EP2 x ETP1, back as bf16 and as MXFP4
    hf["gpt_oss mxfp4"] = mx = to_mxfp4(hf["gpt_oss"], work / "mxfp4")
    add("import gpt_oss mxfp4", op="import", load=str(mx), save=meg("gpt_oss_mxfp4", 2, 1), tp=2, pp=1, ep=2, etp=1)
    add("check gpt_oss mxfp4", op="check", root=meg("gpt_oss_mxfp4", 2, 1), tp=2, pp=1, ep=2, etp=1, tokens=TOKENS,
        logits_out=str(work / "gpt_oss_mxfp4.pt"))
    for dtype in ("auto", "mxfp4"):
        add(f"export gpt_oss mxfp4 {dtype}", op="export", load=meg("gpt_oss_mxfp4", 2, 1), dtype=dtype,
            save=str(work / "back" / f"gpt_oss_mxfp4_{dtype}"))
    add("import gpt_oss etp2", op="import", load=str(hf["gpt_oss"]), save=str(work / "bad10"), tp=2, pp=1, ep=2)
    # the deliberately wrong down_proj mapping, made the same way both ways (square experts)
    add("import gpt_oss wrong", op="import", load=str(hf["gpt_oss_square"]), save=meg("gpt_oss_wrong", 1, 1), tp=1, pp=1,
        ep=2, wrong_mapping="down_not_transposed")
    add("check gpt_oss wrong", op="check", root=meg("gpt_oss_wrong", 1, 1), tp=1, pp=1, ep=2, tokens=TOKENS,
        logits_out=str(work / "gpt_oss_wrong.pt"))
    add("export gpt_oss wrong", op="export", load=meg("gpt_oss_wrong", 1, 1), save=str(work / "back" / "gpt_oss_wrong"),
        wrong_mapping="down_not_transposed")
    # Nemotron-H's Mamba in_proj with z and x swapped, the same way both ways, at TP2
    add("import nemotron_h wrong", op="import", load=str(hf["nemotron_h"]), save=meg("nemotron_h_wrong", 2, 1), tp=2, pp=1,
        divisible_by=64, wrong_mapping="mamba_z_x_swapped")
    add("check nemotron_h wrong", op="check", root=meg("nemotron_h_wrong", 2, 1), tp=2, pp=1, tokens=TOKENS,
        logits_out=str(work / "nemotron_h_wrong.pt"))
    add("export nemotron_h wrong", op="export", load=meg("nemotron_h_wrong", 2, 1),
        save=str(work / "back" / "nemotron_h_wrong"), wrong_mapping="mamba_z_x_swapped")

    # Kimi-K2's FP8 release at EP2 (fp32), back under its own config and resharded to TP2 x EP2 x ETP1;
    # Moonlight's bf16 release at PP2 x EP2
    kimi_fp8, kimi_deq = to_fp8(to_release(hf["kimi_k2"], work / "release"), work / "fp8")
    write_release(kimi_fp8, json.loads((kimi_fp8 / "config.json").read_text()))
    hf["kimi_k2 fp8"], hf["kimi_k2 dequantized"] = kimi_fp8, kimi_deq
    add("import kimi fp8", op="import", load=str(kimi_fp8), save=meg("kimi_fp8", 1, 1), tp=1, pp=1, ep=2, dtype="fp32",
        divisible_by=64)
    add("check kimi fp8", op="check", root=meg("kimi_fp8", 1, 1), tp=1, pp=1, ep=2, tokens=TOKENS,
        logits_out=str(work / "kimi_fp8.pt"))
    add("export kimi fp8", op="export", load=meg("kimi_fp8", 1, 1), save=str(work / "back" / "kimi_fp8"), hf_config=str(kimi_fp8))
    add("export kimi fp8 again", op="export", load=meg("kimi_fp8", 1, 1), save=str(work / "back" / "kimi_fp8_again"),
        hf_config=str(kimi_fp8), dtype="fp8")
    add("reshard kimi", op="reshard", load=meg("kimi_fp8", 1, 1), save=meg("kimi_resharded", 2, 1), tp=2, pp=1, ep=2, etp=1)
    add("export kimi resharded", op="export", load=meg("kimi_resharded", 2, 1), save=str(work / "back" / "kimi_resharded"),
        hf_config=str(kimi_fp8))
    add("import kimi wrong", op="import", load=str(kimi_fp8), save=meg("kimi_wrong", 1, 1), tp=1, pp=1, ep=2, dtype="fp32",
        divisible_by=64, wrong_mapping="expert_bias_zeroed")  # the deliberately wrong mapping, import side
    add("check kimi wrong", op="check", root=meg("kimi_wrong", 1, 1), tp=1, pp=1, ep=2, tokens=TOKENS,
        logits_out=str(work / "kimi_wrong.pt"))
    hf["moonlight release"] = moon = to_release(hf["moonlight"], work / "release")
    add("import moonlight", op="import", load=str(moon), save=meg("moonlight", 1, 2), tp=1, pp=2, ep=2, divisible_by=64)
    add("check moonlight", op="check", root=meg("moonlight", 1, 2), tp=1, pp=2, ep=2, tokens=TOKENS,
        logits_out=str(work / "moonlight.pt"))
    add("export moonlight", op="export", load=meg("moonlight", 1, 2), save=str(work / "back" / "moonlight"), hf_config=str(moon))

    jobs_file, results_file = work / "jobs.json", work / "results.json"
    jobs_file.write_text(json.dumps(job_list))
    torchrun(4, str(ROOT / "tests" / "import_jobs.py"), str(jobs_file), str(results_file), timeout=2400)
    results = json.loads(results_file.read_text())
    return {"work": work, "hf": hf, "ref": ref, "built": built, "results": {k: results[i] for k, i in index.items()}}


def ok(jobs: dict, key: str) -> dict:
    result = jobs["results"][key]
    assert result["ok"], f"{key}: {result.get('error')}"
    return result["report"]


@pytest.mark.parametrize("name,tp,pp", IMPORTS)
def test_import_loads_strictly_in_megatron_with_hf_logits(jobs, name, tp, pp):
    ok(jobs, f"import {name}")
    report = ok(jobs, f"check {name}")
    assert report["layout_equal"], report
    assert (report["args_tp"], report["args_pp"]) == (tp, pp)
    megatron = torch.load(jobs["work"] / f"{name}.pt")
    assert megatron.shape[-1] == 256  # 250 padded to a multiple of 64 x TP
    expected = hf_logits(jobs["hf"][name])
    assert (megatron[..., :VOCAB] - expected).abs().max().item() <= TOL
    assert torch.count_nonzero(megatron[..., VOCAB:]) == 0  # padding rows are zero


@pytest.mark.parametrize("name", [n for n, _, _ in IMPORTS])
def test_hf_megatron_hf_round_trip_is_bit_exact(jobs, name):
    ok(jobs, f"export {name}")
    source, back = hf_tensors(jobs["hf"][name]), hf_tensors(jobs["work"] / "back" / name)
    assert sorted(source) == sorted(back)
    for key, t in source.items():
        assert back[key].dtype == t.dtype, key
        assert torch.equal(back[key], t), key


@pytest.mark.parametrize("name,tp,pp", FP8_IMPORTS + [c[:3] for c in FP8_MOE_IMPORTS])
def test_fp8_release_imports_as_its_dequantized_weights(jobs, name, tp, pp):
    """A block-wise FP8 release of each family (MoE ones at EP2): megatron-core's logits equal
    transformers' on the release dequantized by the definition (fp32), and the weights equal
    importing that dequantized folder, bit for bit."""
    for kind in ("fp8", "dequantized"):
        ok(jobs, f"import {name} {kind}")
        ok(jobs, f"export {name} {kind}")
    assert ok(jobs, f"check {name} fp8")["layout_equal"]
    megatron = torch.load(jobs["work"] / f"{name}_fp8.pt")
    assert (megatron[..., :VOCAB] - hf_logits(jobs["hf"][f"{name} dequantized"])).abs().max().item() <= TOL
    from_fp8, from_dequantized = (hf_tensors(jobs["work"] / "back" / f"{name}_{k}") for k in ("fp8", "dequantized"))
    assert sorted(from_fp8) == sorted(from_dequantized)
    for key, t in from_dequantized.items():
        assert from_fp8[key].dtype == t.dtype == torch.float32 and torch.equal(from_fp8[key], t), key


@pytest.mark.parametrize("name,hf_name", [("ms_legacy", "llama"), ("ms_mcore", "qwen3")])
def test_mindspore_import_matches_hf_logits(jobs, name, hf_name):
    ok(jobs, f"import {name}")
    report = ok(jobs, f"check {name}")
    assert report["layout_equal"], report
    megatron = torch.load(jobs["work"] / f"{name}.pt")
    assert (megatron[..., :VOCAB] - hf_logits(jobs["hf"][hf_name])).abs().max().item() <= TOL


def test_reshard_fixture_tp2pp2_to_tp1pp4(jobs):
    ok(jobs, "reshard fx")
    report = ok(jobs, "check fx")
    assert report["layout_equal"], report
    megatron = torch.load(jobs["work"] / "fx_llama.pt")
    assert (megatron - jobs["ref"]["logits"]).abs().max().item() <= TOL
    ok(jobs, "export fx orig")
    ok(jobs, "export fx resharded")
    orig, new = hf_tensors(jobs["work"] / "back" / "fx_orig"), hf_tensors(jobs["work"] / "back" / "fx_tp1pp4")
    assert sorted(orig) == sorted(new) and all(torch.equal(orig[k], new[k]) for k in orig)


def test_reshard_dense_qwen3_5_tp2pp2_to_tp1pp4(jobs):
    """megatron-core's own dense Qwen3.5 save (gated delta nets split per component over TP, an MTP
    layer) at TP1 x PP4: the chunks megatron-core declares, its logits and MTP logits, and the same
    exported tensors bit for bit."""
    ok(jobs, "reshard fx qwen3_5")
    report = ok(jobs, "check fx qwen3_5")
    assert report["layout_equal"], report
    megatron, ref = torch.load(jobs["work"] / "fx_qwen3_5.pt"), torch.load(jobs["built"] / "refs" / "qwen3_5.pt")
    assert (megatron - ref["logits"]).abs().max().item() <= TOL
    assert (torch.load(jobs["work"] / "fx_qwen3_5.pt.mtp")[0] - ref["mtp_logits"][0]).abs().max().item() <= TOL
    ok(jobs, "export qwen3_5_mtp")
    ok(jobs, "export fx qwen3_5 resharded")
    orig, new = (hf_tensors(jobs["work"] / "back" / k) for k in ("qwen3_5_mtp", "fx_qwen3_5_tp1pp4"))
    assert sorted(orig) == sorted(new) and all(torch.equal(orig[k], new[k]) for k in orig)


@pytest.mark.parametrize("name,fixture", [("qwen3_next_mtp", "qwen3_next_mtp"), ("qwen3_5_moe_mtp", "qwen3_next_mtp"),
                                          ("qwen3_5_mtp", "qwen3_5")])
def test_qwen3_next_mtp_layer_imports_and_exports_back(jobs, name, fixture):
    """Qwen3-Next's export with its MTP layer (``mtp.*``, as released), and Qwen3.5's (MoE and dense),
    imports (TP2 x EP2; dense: TP2 x PP2): megatron-core declares exactly the stored chunks, and its
    logits and MTP logits equal those of the checkpoint the folder was exported from; exported again,
    the folder is the same bit for bit."""
    ok(jobs, f"export {name}")
    ok(jobs, f"import {name}")
    report = ok(jobs, f"check {name}")
    assert report["layout_equal"], report
    assert any(k.startswith("mtp.layers.0.transformer_layer.") for k in report["keys"])
    ref = torch.load(jobs["built"] / "refs" / f"{fixture}.pt")
    logits, mtp = (torch.load(jobs["work"] / f"{name}.pt{suffix}") for suffix in ("", ".mtp"))
    assert len(mtp) == len(ref["mtp_logits"]) == 1
    for ours, theirs in zip([logits] + mtp, [ref["logits"]] + ref["mtp_logits"]):
        assert (ours - theirs).abs().max().item() <= TOL
    ok(jobs, f"export {name} back")
    orig, again = (hf_tensors(jobs["work"] / "back" / folder) for folder in (name, f"{name}_back"))
    assert sorted(orig) == sorted(again) and any(k.startswith("mtp.") for k in orig)
    assert all(torch.equal(orig[k], again[k]) for k in orig)


def test_reshard_tp2pp2_to_tp4pp1(jobs):
    ok(jobs, "reshard mha")
    report = ok(jobs, "check mha")
    assert report["layout_equal"], report
    assert (torch.load(jobs["work"] / "mha_tp4.pt")[..., :VOCAB] - hf_logits(jobs["hf"]["llama_mha"])).abs().max().item() <= TOL
    ok(jobs, "export mha resharded")
    orig, new = hf_tensors(jobs["work"] / "back" / "llama_mha"), hf_tensors(jobs["work"] / "back" / "mha_tp4pp1")
    assert sorted(orig) == sorted(new) and all(torch.equal(orig[k], new[k]) for k in orig)


REFUSALS = {  # job -> (words of its error, the folder it must not leave)
    "reshard fx tp4": ("num_query_groups 2 is not divisible by TP 4", "bad1"),
    "reshard optimizer": ("--with-optimizer", "bad2"),
    "import pp3": ("num_layers 4 is not divisible by PP 3", "bad3"),
    "import dense ep2": ("the LlamaForCausalLM model has no experts", "bad4"),
    "import mixtral ep3": ("num_experts 4 is not divisible by EP 3", "bad5"),
    "reshard dense etp": ("EP and expert TP need a model with experts", "bad6"),
    "import mla local": ("--transformer-impl local: multi-latent attention", "bad7"),
    "reshard mla to local": ("--transformer-impl local: multi-latent attention", "bad8"),  # the source's spec
    # found while the chunk is read, on the rank that reads it
    "import mtp copy differs": ("model.layers.5.embed_tokens.weight differs from model.embed_tokens.weight", "bad9"),
    "import gpt_oss etp2": ("expert biases (add_bias_linear) need expert TP 1, not 2", "bad10"),
}


@pytest.mark.parametrize("key", REFUSALS)
def test_refusals_are_one_clear_error(jobs, key):
    words, folder = REFUSALS[key]
    result = jobs["results"][key]
    assert not result["ok"] and words in result["error"], result
    assert not (jobs["work"] / folder).exists()


def test_cli_import_single_process_without_cuda_patches(tmp_path):
    """``python -m distconv import`` as one rank writing all four ranks' chunks; no test patches."""
    hf = make_hf(tmp_path, "llama")
    out = tmp_path / "meg"
    proc = distconv_cli("import", "--load", str(hf), "--save", str(out), "--tensor-model-parallel-size", "2",
                        "--pipeline-model-parallel-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert {p.name for p in (out / "release").iterdir()} >= {"metadata.json", ".metadata", "common.pt"}
    from distconv.megatron.args import spec_from_args
    from distconv.megatron.source import describe

    ckpt = describe(out)
    assert spec_from_args(ckpt.args).padded_vocab_size == 256  # 250 -> multiple of 128 x TP2
    assert ckpt.tensors["decoder.layers.mlp.linear_fc1.weight"].shape == (4, 256, 64)
    assert len(ckpt.tensors["decoder.layers.mlp.linear_fc1.weight"].chunks) == 4 * 4  # layers x (gate, up) x TP
    again = distconv_cli("import", "--load", str(hf), "--save", str(out))
    assert again.returncode == 1 and again.stderr.count("distconv: error:") == 1 and "--overwrite" in again.stderr


def test_mindspore_unmapped_names_are_listed(tmp_path):
    from distconv.mindspore.source import MindSporeSource

    hf = make_hf(tmp_path, "llama")
    moe = {"model.layers.0.feed_forward.router.dense.weight": torch.zeros(2, 2), "model.layers.0.feed_forward.routed_experts.ffn.w1.weight": torch.zeros(2, 2)}
    ms = to_mindspore(hf, tmp_path / "ms", LEGACY_MS, moe)
    with pytest.raises(DistconvError, match=r"no mapping: model\.layers\.0\.feed_forward\.routed_experts\.ffn\.w1\.weight, model\.layers\.0\.feed_forward\.router"):
        MindSporeSource(ms)


def test_mindspore_flags_and_config_file_from_the_command_line(tmp_path):
    from distconv.cli import _parser
    from distconv.mindspore.source import model_settings

    (tmp_path / "m.json").write_text(json.dumps({"num_layers": 2, "hidden_size": 8, "norm_epsilon": 1e-6}))
    opts = _parser().parse_args(["import", "--source", "mindspore", "--load", "x", "--save", "y", "--ms-config",
                                 str(tmp_path / "m.json"), "--num-layers", "4", "--ffn-hidden-size", "16",
                                 "--num-attention-heads", "2", "--swiglu", "--tensor-model-parallel-size", "2"])
    values = model_settings(opts.ms_config, opts)
    assert values == {"num_layers": 4, "hidden_size": 8, "norm_epsilon": 1e-6, "ffn_hidden_size": 16,
                      "num_attention_heads": 2, "swiglu": True}
    assert opts.tensor_model_parallel_size == 2
    (tmp_path / "bad.json").write_text(json.dumps({"num_layer": 2}))
    with pytest.raises(DistconvError, match="unknown keys num_layer"):
        model_settings(str(tmp_path / "bad.json"), opts)


def test_import_refuses_what_megatron_cannot_express(tmp_path):
    from transformers import LlamaConfig

    from distconv.families.llama import LLAMA

    config = LlamaConfig(**SMALL, num_key_value_heads=2, attention_bias=True)
    with pytest.raises(DistconvError, match="add_bias_linear=True"):
        LLAMA.spec_from_hf_config(config, 256, torch.float32)
    config = LlamaConfig(**SMALL, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(DistconvError, match="no megatron-core equivalent"):
        LLAMA.spec_from_hf_config(config, 256, torch.float32)


def test_reshard_legacy_mp_rank_to_torch_dist(jobs):
    """Legacy TP2 x PP2 files -> torch_dist TP1 PP2: exports of both are the same tensors."""
    ok(jobs, "reshard legacy")
    ok(jobs, "export legacy orig")
    ok(jobs, "export legacy resharded")
    orig, new = hf_tensors(jobs["work"] / "back" / "legacy_orig"), hf_tensors(jobs["work"] / "back" / "legacy_tp1pp2")
    assert sorted(orig) == sorted(new) and all(torch.equal(orig[k], new[k]) for k in orig)


def test_cli_bad_input_under_torchrun_is_one_error(tmp_path):
    proc = distconv_cli("import", "--source", "mindspore", "--load", str(tmp_path), "--save", str(tmp_path / "out"),
                        "--num-layers", "4", nproc=2)
    assert proc.returncode != 0
    assert proc.stderr.count("distconv: error:") == 1 and "--hidden-size" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_import_args_read_back_as_the_same_spec():
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    from distconv.families.llama import LLAMA
    from distconv.families.mistral import MISTRAL
    from distconv.families.qwen3 import QWEN3
    from distconv.megatron.args import megatron_args, spec_from_args
    from distconv.megatron.catalogue import Target

    cases = [
        (QWEN3, Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32)),
        (MISTRAL, MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=64)),
        (LLAMA, LlamaConfig(**SMALL, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
        (LLAMA, LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ]
    for family, config in cases:
        spec = family.spec_from_hf_config(config, 256, torch.bfloat16)
        assert spec_from_args(megatron_args(spec, Target(2, 2, 1), divisible_by=64, tokenizer=None)).with_vocab(VOCAB) == spec, family.architecture


@pytest.mark.parametrize("name", MOE_NAMES + ("qwen3_moe_sparse_step",))
def test_moe_import_args_read_back_as_the_same_spec(name):
    """The MoE args Megatron-LM rebuilds the model from: ``spec_from_args`` reads the same spec,
    and the layout and router args are Megatron-LM's own."""
    import transformers

    from distconv.families import FAMILIES, pick_family
    from distconv.megatron.args import megatron_args, spec_from_args
    from distconv.megatron.catalogue import Target, per_layer_keys

    cls_name, overrides, _ = MODELS[name.removesuffix("_sparse_step")]
    if name.endswith("_sparse_step"):  # layers 1 and 3 sparse, spelled differently from what export writes
        overrides = {**overrides, "decoder_sparse_step": 2, "mlp_only_layers": []}
    config = getattr(transformers, cls_name)(**{**SMALL, **overrides})
    config.architectures = [cls_name.replace("Config", "ForCausalLM")]
    family = pick_family(FAMILIES, architecture=config.architectures[0], importing=True)
    spec = family.spec_from_hf_config(config, 256, torch.float32)
    args = megatron_args(spec, Target(2, 1, 2, 1), divisible_by=64, tokenizer=None, grouped_gemm=True)
    assert spec_from_args(args).with_vocab(VOCAB) == spec
    assert (args.expert_model_parallel_size, args.expert_tensor_parallel_size, args.moe_grouped_gemm) == (2, 1, True)
    assert (args.world_size, args.data_parallel_size, args.transformer_impl) == (2, 1, "transformer_engine")
    # no tokenizer: no tokenizer type for Megatron-LM's --use-checkpoint-args to take over the job's own
    assert args.tokenizer_type is None and args.tokenizer_model is None
    expected = {"mixtral": (4, 2, False, None, 1), "qwen2_moe": (4, 2, True, 48, [0, 1, 1, 1]),
                "qwen3_moe": (8, 3, False, None, 1), "qwen3_moe_sparse_step": (8, 3, False, None, [0, 1, 0, 1])}[name]
    assert (args.num_experts, args.moe_router_topk, args.moe_router_pre_softmax,
            args.moe_shared_expert_intermediate_size, args.moe_layer_freq) == expected
    assert per_layer_keys(args.moe_layer_freq, True) == (expected[-1] != 1)
    family.check_config(family.hf_config(spec), spec)  # export writes the same layers another way


def test_deepseek_v3_import_args_and_refusals():
    """The MLA and MTP args read back as the same spec; what Megatron-LM cannot carry is one clear
    error: MTP layers with tied embeddings, RoPE other than MLA's YaRN, YaRN settings MLA has no
    place for, HF's non-interleaved rope weights. YaRN's betas and original length carry into args."""
    import transformers

    from distconv.families import FAMILIES, pick_family
    from distconv.megatron.args import megatron_args, spec_from_args
    from distconv.megatron.catalogue import Target

    _, overrides, _ = MODELS["deepseek_v3"]
    make = lambda **changes: transformers.DeepseekV3Config(**{**SMALL, **overrides, **changes})  # noqa: E731
    config = make()
    config.architectures = ["DeepseekV3ForCausalLM"]
    family = pick_family(FAMILIES, architecture=config.architectures[0], importing=True)
    spec = family.spec_from_hf_config(config, 256, torch.float32)
    assert (spec.q_lora_rank, spec.kv_lora_rank, spec.qk_head_dim, spec.qk_pos_emb_head_dim, spec.v_head_dim) == (24, 32, 16, 8, 16)
    assert spec.rope_scaling["factor"] == 4.0 and spec.moe_layers == (False, True, True, True)
    args = megatron_args(spec, Target(2, 1, 2, 1), divisible_by=64, tokenizer=None)
    assert spec_from_args(args).with_vocab(VOCAB) == spec
    assert (args.multi_latent_attention, args.rope_type, args.rotary_scaling_factor, args.mscale_all_dim) == (True, "yarn", 4.0, 1.0)
    assert (args.moe_router_num_groups, args.moe_router_group_topk, args.moe_layer_freq) == (2, 1, [0, 1, 1, 1])
    family.check_config(family.hf_config(spec), spec)  # export writes the same model
    plain = make(q_lora_rank=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    spec = family.spec_from_hf_config(plain, 256, torch.float32)
    assert spec.q_lora_rank is None and spec_from_args(megatron_args(spec, Target(), divisible_by=64, tokenizer=None)).with_vocab(VOCAB) == spec
    assert spec.mtp_num_layers == 1 and args.mtp_num_layers == 1  # the hub configs have one MTP layer
    with pytest.raises(DistconvError, match="mtp_conflict='MTP layers with tied embeddings'"):
        family.spec_from_hf_config(make(tie_word_embeddings=True), 256, torch.float32)
    yarn = dict(overrides["rope_parameters"])
    other = {**yarn, "beta_fast": 1.0, "beta_slow": 2.0, "original_max_position_embeddings": 8192}  # carried in args
    spec = family.spec_from_hf_config(make(rope_parameters=other), 256, torch.float32)
    args = megatron_args(spec, Target(), divisible_by=64, tokenizer=None)
    assert (args.beta_fast, args.beta_slow, args.original_max_position_embeddings) == (1.0, 2.0, 8192)
    assert spec_from_args(args).with_vocab(VOCAB) == spec
    for bad in ({**yarn, "attention_factor": 1.2}, {**yarn, "original_max_position_embeddings": 4096.5},
                {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}):
        with pytest.raises(DistconvError, match="no Megatron-LM equivalent for MLA"):
            family.spec_from_hf_config(make(rope_parameters=bad), 256, torch.float32)
    with pytest.raises(DistconvError, match="rope_interleave"):
        family.spec_from_hf_config(make(rope_interleave=False), 256, torch.float32)


def test_qwen_moe_layers_are_compared_by_meaning():
    from transformers import Qwen3MoeConfig

    from distconv.families.qwen3_moe import QWEN3_MOE

    base = {**SMALL, **MODELS["qwen3_moe"][1]}
    spec = QWEN3_MOE.spec_from_hf_config(Qwen3MoeConfig(**{**base, "decoder_sparse_step": 2}), 256, torch.float32)
    assert spec.moe_layers == (False, True, False, True)
    QWEN3_MOE.check_config(Qwen3MoeConfig(**{**base, "mlp_only_layers": [0, 2]}), spec)
    with pytest.raises(DistconvError, match=r"decoder_sparse_step/mlp_only_layers: .* means moe_layers=\(False, True, True, True\)"):
        QWEN3_MOE.check_config(Qwen3MoeConfig(**{**base, "mlp_only_layers": [0]}), spec)


def test_moe_layout_flags_reach_the_options():
    from distconv.cli import _parser

    opts = _parser().parse_args(["reshard", "--load", "x", "--save", "y", "--expert-model-parallel-size", "2",
                                 "--expert-tensor-parallel-size", "1", "--no-moe-grouped-gemm"])
    assert (opts.expert_model_parallel_size, opts.expert_tensor_parallel_size, opts.moe_grouped_gemm) == (2, 1, False)
    assert opts.transformer_impl is None  # import: transformer_engine; reshard: the source's
    opts = _parser().parse_args(["import", "--load", "x", "--save", "y", "--moe-grouped-gemm", "--transformer-impl", "local"])
    assert (opts.expert_tensor_parallel_size, opts.moe_grouped_gemm, opts.transformer_impl) == (None, True, "local")


# ---- MoE: import at EP x ETP, reshard across EP / ETP / TP / PP ----------------------------------

def _grouped(key: str) -> bool:
    """Whether an MoE output's experts are chunked as GroupedMLP saves them."""
    if key in MOE_RESHARDS:
        source, grouped = MOE_RESHARDS[key][0], MOE_RESHARDS[key][5]
        return _grouped(source) if grouped is None else grouped
    return "_gg" in key  # imports are named by moe_dir; the fixtures are sequential


def _impl(key: str) -> str:
    """The --transformer-impl an MoE output is saved for."""
    if key in MOE_RESHARDS:
        source, impl = MOE_RESHARDS[key][0], MOE_RESHARDS[key][6]
        return _impl(source) if impl is None else impl
    if key.startswith("fx/"):  # megatron-core's own saves: the spec the fixture's args name
        return FIXTURES[key.split("/")[1]].args.get("transformer_impl", LOCAL)
    return LOCAL if key.endswith("_local") else TE


def _check_layout(jobs: dict, key: str, tp: int, pp: int, ep: int, etp: int | None) -> None:
    """megatron-core's model at the layout (and spec) the args name declares exactly the stored chunks;
    an MoE layer's pre-MLP norm is stored under the spec's key."""
    report = ok(jobs, f"check {key}")
    assert report["layout_equal"], report
    args = (report["args_tp"], report["args_pp"], report["args_ep"], report["args_etp"], report["args_grouped"],
            report["args_impl"])
    assert args == (tp, pp, ep, etp or tp, _grouped(key), _impl(key))
    te_norm = [k for k in report["keys"] if k.endswith("pre_mlp_layernorm.weight")]
    local_norm = [k for k in report["keys"] if k.endswith("mlp.linear_fc1.layer_norm_weight")]
    hybrid = moe_model(key) == "nemotron_h"
    pattern = NEMOTRON_H_PATTERN if key.startswith("nemotron_h") else FIXTURES["nemotron_h"].args["hybrid_override_pattern"]
    dense = tuple(f"decoder.layers.{i}." for i, c in enumerate(pattern) if c == "-") if hybrid else ("decoder.layers.0.",)
    if _impl(key) == TE:
        # (qwen2_moe's dense layer 0, a hybrid model's MLP layers keep the fused norm in either spec)
        assert te_norm and all(k.startswith(dense) for k in local_norm), report["keys"]
    else:
        assert local_norm and not te_norm, report["keys"]


@pytest.mark.parametrize("case", MOE_IMPORTS, ids=[moe_dir(*c) for c in MOE_IMPORTS])
def test_moe_import_loads_strictly_in_megatron_with_hf_logits(jobs, case):
    """megatron-core built at the target TP x PP x EP x ETP (sequential experts, or its local
    GroupedMLP) declares exactly the stored chunks, loads them with RAISE_ALL, and its logits
    equal transformers' on the HF source."""
    name, tp, pp, ep, etp, *_ = case
    key = moe_dir(*case)
    ok(jobs, f"import {key}")
    _check_layout(jobs, key, tp, pp, ep, etp)
    megatron = torch.load(jobs["work"] / f"{key}.pt")
    assert megatron.shape[-1] == 256 and torch.count_nonzero(megatron[..., VOCAB:]) == 0
    assert (megatron[..., :VOCAB] - hf_logits(jobs["hf"][name])).abs().max().item() <= TOL
    _check_mtp(jobs, key, name)


def _check_mtp(jobs: dict, key: str, name: str) -> None:
    """megatron-core's MTP layers, loaded from the checkpoint, against the published MTP formula on
    the HF source's tensors (``mtp_reference``), depth by depth."""
    mtp = torch.load(jobs["work"] / f"{key}.pt.mtp")
    config = __import__("transformers").AutoConfig.from_pretrained(str(jobs["hf"][name]), trust_remote_code=False)
    depth = getattr(config, "num_mtp_layers", 0) or getattr(config, "num_nextn_predict_layers", 0)
    assert len(mtp) == depth
    if depth:
        _, expected = hf_mtp_logits(jobs["hf"][name], torch.tensor(TOKENS))
        for ours, theirs in zip(mtp, expected):
            assert (ours[..., :VOCAB] - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("case", MOE_ROUND_TRIPS, ids=[moe_dir(*c) for c in MOE_ROUND_TRIPS])
def test_moe_hf_megatron_hf_round_trip_is_bit_exact(jobs, case):
    key = moe_dir(*case)
    ok(jobs, f"export {key}")
    source, back = hf_tensors(jobs["hf"][case[0]]), hf_tensors(jobs["work"] / "back" / key)
    assert sorted(source) == sorted(back)
    for name, t in source.items():
        if case[0] in IMPORT_DTYPES:  # imported to, so exported as, float32: the same values
            t = t.to(back[name].dtype)
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


@pytest.mark.parametrize("key", MOE_RESHARDS)
def test_moe_reshard_loads_strictly_and_exports_the_same_tensors(jobs, key):
    """The resharded checkpoint is what megatron-core declares at the new layout, gives the same
    logits, and exports to the same HF tensors bit for bit as its source (an imported HF model,
    or megatron-core's own save)."""
    source, tp, pp, ep, etp, *_ = MOE_RESHARDS[key]
    ok(jobs, f"reshard {key}")
    _check_layout(jobs, key, tp, pp, ep, etp)
    ok(jobs, f"export {key}")
    megatron, name = torch.load(jobs["work"] / f"{key}.pt"), moe_model(key)
    if source.startswith("fx/"):
        ok(jobs, f"export {source}")
        ref = torch.load(jobs["built"] / "refs" / f"{name}.pt")
        mtp = torch.load(jobs["work"] / f"{key}.pt.mtp")
        assert len(mtp) == len(ref["mtp_logits"])
        for ours, theirs in zip([megatron] + mtp, [ref["logits"]] + ref["mtp_logits"]):
            assert (ours[..., : theirs.shape[-1]] - theirs).abs().max().item() <= TOL
        orig = hf_tensors(jobs["work"] / "back" / source.replace("/", "_"))
    else:
        assert (megatron[..., :VOCAB] - hf_logits(jobs["hf"][name])).abs().max().item() <= TOL
        _check_mtp(jobs, key, name)
        orig = hf_tensors(jobs["hf"][name])
    new = hf_tensors(jobs["work"] / "back" / key)
    assert sorted(orig) == sorted(new)
    assert all(torch.equal(orig[k], new[k]) for k in orig)


def test_te_spec_stand_in_undoes_itself():
    """The stand-ins for transformer-engine's modules live only inside the context."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import multi_latent_attention

    from fixtures.te_spec import te_spec_stand_in

    places = [(gpt_layer_specs, "TESpecProvider"), (gpt_layer_specs, "TENorm"), (multi_latent_attention, "TELinear")]
    state = lambda: [(n in vars(m), vars(m).get(n)) for m, n in places]  # noqa: E731
    before = state()
    with te_spec_stand_in():
        assert all(vars(m).get(n) not in (None, had[1]) for (m, n), had in zip(places, before))
    assert state() == before


@pytest.mark.parametrize("key", ["mixtral_tp2pp1ep2etp1", "qwen2_moe_tp2pp1ep2etp1", "deepseek_v3_tp2pp1ep2etp1",
                                 "glm4_moe_tp2pp1ep2etp1", "qwen3_next_tp2pp1ep2", "qwen3_5_moe_tp2pp1ep2etp1",
                                 "gpt_oss_tp2pp1ep2etp1", "deepseek_v32_tp2pp1ep2etp1", "glm_moe_dsa_tp2pp1ep2etp1",
                                 "nemotron_h_tp2pp1ep1"])
def test_verify_reads_a_transformer_engine_moe_import(jobs, key):
    """``distconv verify`` (a local-spec model, on CPU) loads the TE spec's ``pre_mlp_layernorm`` keys,
    MLA's fused latent norms, MTP layers, and gpt-oss's sinks (beside TE's attention's extra state),
    windows, YaRN and clamped GLU; gated delta net models (megatron-core's TE spec, its fla and
    transformer-engine calls stood in for on the CPU) are checked the same way."""
    from distconv.verify import verify

    ok(jobs, f"export {key}")
    result = verify(jobs["work"] / "meg" / key, jobs["work"] / "back" / key, sequences=1, length=8, tol=TOL)
    assert result["ok"], result


def test_mtp_layers_without_copies_import(jobs):
    """MTP layers without their copies of the embedding and output head (GLM-4.6's releases) import;
    the export writes the copies back, equal to the folder that had them, bit for bit."""
    ok(jobs, "import mtp no copies")
    ok(jobs, "export mtp no copies")
    source, back = hf_tensors(jobs["hf"]["glm4_moe"]), hf_tensors(jobs["work"] / "back" / "no_copies")
    assert sorted(source) == sorted(back) and "model.layers.5.shared_head.head.weight" in back
    assert all(torch.equal(source[k], back[k]) for k in source)


def test_bf16_deepseek_folder_keeps_its_float32_expert_bias(jobs):
    """A bf16 folder whose router weight and expert bias are float32 (as transformers saves DeepSeek-V3
    and GLM-4.5) imports with ``--dtype auto`` as a bf16 model whose ``expert_bias`` is float32, as
    megatron-core keeps it, holding the source's values exactly; the export writes the bias float32
    again, bit for bit, and the rest as the checkpoint stores it (the router weight in bf16)."""
    ok(jobs, "import ds bf16")
    ok(jobs, "export ds bf16")
    from distconv.megatron.source import describe

    ckpt = describe(jobs["work"] / "meg" / "deepseek_v3_bf16_tp1pp1")
    assert ckpt.args.bf16 and ckpt.args.params_dtype == torch.bfloat16
    stored = {k: t.dtype for k, t in ckpt.tensors.items()}
    assert {d for k, d in stored.items() if k.endswith("router.expert_bias")} == {torch.float32}
    assert {d for k, d in stored.items() if not k.endswith("router.expert_bias")} == {torch.bfloat16}
    source, back = hf_tensors(jobs["hf"]["deepseek_v3_bf16"]), hf_tensors(jobs["work"] / "back" / "deepseek_v3_bf16")
    assert sorted(source) == sorted(back)
    for name, t in source.items():
        if name.endswith(".mlp.gate.weight"):
            assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], t.bfloat16()), name
        else:
            assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


# ---- gpt-oss ---------------------------------------------------------------------------------------

def test_gpt_oss_mxfp4_release_imports_dequantized_and_exports_back(jobs):
    """The hub's MXFP4 layout, dequantized as it streams into TP2 x EP2 x ETP1: megatron-core's logits
    equal transformers' on the release (which dequantizes it on CPU); the bf16 export is exactly the
    parameters transformers loads from the release; ``--dtype mxfp4`` gives the release back, bytes
    and all (the test's reference quantizer made it, and MXFP4 values requantize to themselves)."""
    from transformers import AutoModelForCausalLM

    ok(jobs, "import gpt_oss mxfp4")
    assert ok(jobs, "check gpt_oss mxfp4")["layout_equal"]
    release = jobs["hf"]["gpt_oss mxfp4"]
    megatron = torch.load(jobs["work"] / "gpt_oss_mxfp4.pt")
    assert (megatron[..., :VOCAB] - hf_logits(release)).abs().max().item() <= TOL
    for dtype in ("auto", "mxfp4"):
        ok(jobs, f"export gpt_oss mxfp4 {dtype}")
    loaded = AutoModelForCausalLM.from_pretrained(str(release), dtype=torch.bfloat16, trust_remote_code=False).state_dict()
    bf16 = hf_tensors(jobs["work"] / "back" / "gpt_oss_mxfp4_auto")
    assert sorted(bf16) == sorted(loaded)
    # (transformers loads the norms float32, ``_keep_in_fp32_modules``: the release holds them bf16)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], loaded[k].bfloat16()) for k in loaded)
    again, source = hf_tensors(jobs["work"] / "back" / "gpt_oss_mxfp4_mxfp4"), hf_tensors(release)
    assert sorted(again) == sorted(source)
    assert all(again[k].dtype == t.dtype and torch.equal(again[k], t) for k, t in source.items())
    assert json.loads((jobs["work"] / "back" / "gpt_oss_mxfp4_mxfp4" / "config.json").read_text())["quantization_config"] == \
        json.loads((release / "config.json").read_text())["quantization_config"]


def test_a_wrong_gpt_oss_mapping_survives_the_round_trip_but_not_the_logits(jobs):
    """down_proj left untransposed both ways (square experts: every shape agrees) passes HF -> Megatron
    -> HF bit for bit, as Megatron-Bridge's did; megatron-core's forward on the imported checkpoint
    misses transformers' logits on the source, so the import proof rejects it."""
    ok(jobs, "import gpt_oss wrong")
    assert ok(jobs, "check gpt_oss wrong")["layout_equal"]
    ok(jobs, "export gpt_oss wrong")
    source, back = hf_tensors(jobs["hf"]["gpt_oss_square"]), hf_tensors(jobs["work"] / "back" / "gpt_oss_wrong")
    assert sorted(source) == sorted(back) and all(torch.equal(source[k], back[k]) for k in source)
    megatron = torch.load(jobs["work"] / "gpt_oss_wrong.pt")
    diff = (megatron[..., :VOCAB] - hf_logits(jobs["hf"]["gpt_oss_square"])).abs().max().item()
    print(f"gpt-oss imported with down_proj untransposed: max |logit difference| = {diff:.3e}")
    assert diff > 100 * TOL


def test_a_wrong_nemotron_h_mapping_survives_the_round_trip_but_not_the_logits(jobs):
    """The Mamba in_proj's z and x swapped both ways (every shape agrees) passes HF -> Megatron -> HF
    bit for bit; megatron-core's forward on the TP2 import misses transformers' logits on the source."""
    ok(jobs, "import nemotron_h wrong")
    assert ok(jobs, "check nemotron_h wrong")["layout_equal"]
    ok(jobs, "export nemotron_h wrong")
    source, back = hf_tensors(jobs["hf"]["nemotron_h"]), hf_tensors(jobs["work"] / "back" / "nemotron_h_wrong")
    assert sorted(source) == sorted(back) and all(torch.equal(source[k], back[k]) for k in source)
    megatron = torch.load(jobs["work"] / "nemotron_h_wrong.pt")
    diff = (megatron[..., :VOCAB] - hf_logits(jobs["hf"]["nemotron_h"])).abs().max().item()
    print(f"Nemotron-H imported with the Mamba in_proj's z and x swapped: max |logit difference| = {diff:.3e}")
    assert diff > 100 * TOL


def _release_logits(folder: Path, scratch: Path, latent_eps: float | None = None) -> torch.Tensor:
    """transformers' logits (fp32) of a Kimi-K2 or Moonlight release, from a copy whose model_type is
    deepseek_v3 (transformers has no kimi_k2; ``tests/kimi.py``); ``latent_eps`` replaces the 1e-6 of
    the latent q/kv RMSNorms."""
    from transformers import AutoModelForCausalLM

    copy = transformers_copy(folder, scratch / folder.name)
    model = AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32, trust_remote_code=False).eval()
    if latent_eps is not None:
        for name, module in model.named_modules():
            if name.endswith(("q_a_layernorm", "kv_a_layernorm")):
                module.variance_epsilon = latent_eps
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


def test_kimi_fp8_release_imports_and_exports_back(jobs, tmp_path):
    """Kimi-K2's FP8 release (kimi_k2, its auto_map and code files, YaRN beta 1/1 in the old spelling)
    imports at EP2 without its code: megatron-core's logits equal transformers' on the release
    dequantized by the definition; its args carry the YaRN betas; the export under the release's config
    is those dequantized weights bit for bit, named kimi_k2, ``--dtype fp8`` gives the release back byte
    for byte (FP8 weights, scales, bf16 and float32 tensors), and a TP2 x EP2 x ETP1 reshard exports the same."""
    report = ok(jobs, "import kimi fp8")
    assert any("auto_map" in w for w in report["warnings"]) and any("kimi_k2" in w for w in report["warnings"])
    check = ok(jobs, "check kimi fp8")
    assert check["layout_equal"], check
    from distconv.megatron.source import describe

    args = describe(jobs["work"] / "meg" / "kimi_fp8_tp1pp1").args
    assert (args.rope_type, args.beta_fast, args.beta_slow, args.mscale, args.mscale_all_dim, args.rotary_scaling_factor,
            args.original_max_position_embeddings, args.moe_router_topk_scaling_factor) == (
        "yarn", 1.0, 1.0, 1.0, 1.0, 32.0, 4096, 2.827)
    megatron = torch.load(jobs["work"] / "kimi_fp8.pt")
    diff = (megatron[..., :VOCAB] - _release_logits(jobs["hf"]["kimi_k2 dequantized"], tmp_path)).abs().max().item()
    print(f"Kimi-K2 FP8 release: megatron-core - transformers (dequantized) max |logits| {diff:.2e}")
    assert diff <= TOL
    ok(jobs, "export kimi fp8")
    back, source = hf_tensors(jobs["work"] / "back" / "kimi_fp8"), hf_tensors(jobs["hf"]["kimi_k2 dequantized"])
    assert sorted(back) == sorted(source) and all(torch.equal(back[k], source[k]) for k in source)
    config = json.loads((jobs["work"] / "back" / "kimi_fp8" / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and "auto_map" not in config and "quantization_config" not in config
    ok(jobs, "export kimi fp8 again")  # --dtype fp8: the release itself, byte for byte
    again, release = hf_tensors(jobs["work"] / "back" / "kimi_fp8_again"), hf_tensors(jobs["hf"]["kimi_k2 fp8"])
    assert sorted(again) == sorted(release) and any(t.dtype == torch.float8_e4m3fn for t in release.values())
    for key, t in release.items():
        assert again[key].dtype == t.dtype and torch.equal(again[key].view(torch.uint8), t.view(torch.uint8)), key
    config = json.loads((jobs["work"] / "back" / "kimi_fp8_again" / "config.json").read_text())
    assert config["quantization_config"] == FP8 and config["model_type"] == "kimi_k2"
    ok(jobs, "reshard kimi")
    ok(jobs, "export kimi resharded")
    resharded = hf_tensors(jobs["work"] / "back" / "kimi_resharded")
    assert sorted(resharded) == sorted(back) and all(torch.equal(resharded[k], back[k]) for k in back)


def test_moonlight_bf16_release_round_trip(jobs, tmp_path):
    """Moonlight's bf16 release (deepseek_v3 with an auto_map; its expert bias bf16, as on the hub) at
    PP2 x EP2 and back: every tensor bit for bit, the bias float32 (megatron-core's and transformers'
    dtype for it) holding the same values. megatron-core normalises the latent q/kv with the model's
    1e-5 where transformers uses 1e-6 (the import and the export warn): with transformers' latent
    epsilon set to 1e-5 the logits agree, and the difference the epsilon makes is printed."""
    report = ok(jobs, "import moonlight")
    assert any("auto_map" in w for w in report["warnings"])
    assert any("latent q and kv" in w for w in report["warnings"])
    check = ok(jobs, "check moonlight")
    assert check["layout_equal"], check
    megatron = torch.load(jobs["work"] / "moonlight.pt")[..., :VOCAB]
    release = jobs["hf"]["moonlight release"]
    same_eps = (megatron - _release_logits(release, tmp_path / "a", latent_eps=1e-5)).abs().max().item()
    hf_eps = (megatron - _release_logits(release, tmp_path / "b")).abs().max().item()
    print(f"Moonlight: megatron-core - transformers max |logits| {same_eps:.2e} (latent eps 1e-5), {hf_eps:.2e} (HF's 1e-6)")
    assert same_eps <= TOL
    export = ok(jobs, "export moonlight")
    assert any("latent q and kv" in w for w in export["warnings"])
    back, source = hf_tensors(jobs["work"] / "back" / "moonlight"), hf_tensors(release)
    assert sorted(back) == sorted(source)
    for key, t in source.items():
        if key.endswith("e_score_correction_bias"):
            assert t.dtype == torch.bfloat16 and back[key].dtype == torch.float32 and torch.equal(back[key], t.float()), key
        else:
            assert back[key].dtype == t.dtype and torch.equal(back[key], t), key
    config = json.loads((jobs["work"] / "back" / "moonlight" / "config.json").read_text())
    assert (config["model_type"], config["rms_norm_eps"], config["q_lora_rank"]) == ("deepseek_v3", 1e-5, None)


def test_kimi_zeroed_expert_bias_import_fails_the_logits(jobs, tmp_path):
    """The wrong mapping on import (e_score_correction_bias read as zeros, Megatron-Bridge #4657): the
    checkpoint loads strictly in megatron-core, every chunk in place; only its logits show the error."""
    ok(jobs, "import kimi wrong")
    check = ok(jobs, "check kimi wrong")
    assert check["layout_equal"], check
    megatron = torch.load(jobs["work"] / "kimi_wrong.pt")
    diff = (megatron[..., :VOCAB] - _release_logits(jobs["hf"]["kimi_k2 dequantized"], tmp_path)).abs().max().item()
    print(f"Kimi-K2 imported with the expert bias zeroed: megatron-core - transformers max |logits| {diff:.3g}")
    assert diff > 10 * TOL


def test_a_kept_open_source_file_is_opened_again_after_its_budget(tmp_path, monkeypatch):
    """``SafetensorsFiles.kept_open(budget)``, which import reads through: one opening of a file per
    ``budget`` bytes read, not one per read, and the same values as reads that each open the file."""
    from distconv.hf.source import SafetensorsFiles

    tensors = {f"t{i}": torch.arange(256, dtype=torch.float32) * (i + 1.5) + 0.25 * i for i in range(6)}  # 1 KiB each
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = SafetensorsFiles(tmp_path)
    opened: list[Path] = []
    real = SafetensorsFiles._open
    monkeypatch.setattr(SafetensorsFiles, "_open", staticmethod(lambda f: opened.append(f) or real(f)))
    box = (slice(8, 200),)  # 768 bytes a read

    def read_all() -> list[torch.Tensor]:
        return [files.read(n, box) for n in tensors]

    plain = read_all()
    assert len(opened) == 6
    with files.kept_open(2048):  # reopened after the third read of each opening: 2304 bytes >= 2048
        budgeted = read_all()
    assert len(opened) == 6 + 2
    with files.kept_open():
        kept = read_all()
    assert len(opened) == 6 + 2 + 1
    for name, a, b, c in zip(tensors, plain, budgeted, kept):
        assert torch.equal(a, tensors[name][box]) and torch.equal(b, a) and torch.equal(c, a)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)  # the file spoilt after it was planned
    with pytest.raises(DistconvError, match="not a readable safetensors file"):
        with files.kept_open(2048):
            files.read("t0", box)
