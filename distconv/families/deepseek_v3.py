"""DeepSeek-V3: multi-latent attention, sigmoid routing with expert bias and groups, shared experts.

Megatron's MLA rotates the rope slice de-interleaved, which is HF's ``rope_interleave=True``:
the weights copy unchanged. HF ranks a group by its top-2 expert scores, megatron-core by its
top ``moe_router_topk / moe_router_group_topk``: the two agree when that is 2 (or with no groups).
HF's latent q/kv RMSNorms use a fixed epsilon of 1e-6, megatron-core one epsilon for every norm.

transformers ignores ``topk_method``, ``scoring_func`` and ``moe_layer_freq``, but vLLM and SGLang
read them as DeepSeek's own configs write them: ``noaux_tc`` (the expert bias exists and takes
part in selection only), ``sigmoid`` scores, and MoE in every layer after the dense ones.
"""

from __future__ import annotations

from transformers import DeepseekV3Config

from distconv.families.base import Family, Rule
from distconv.families.llama import RULES, H, L
from distconv.families.moe import MOE_REQUIRES, dense_layers, expert_rules, fields, shared_expert_rules

A = L + "self_attention."
HA = H + "self_attn."

MLA_RULES = (
    Rule(A + "linear_q_proj.weight", HA + "q_proj.weight", fp8=True),
    Rule(A + "linear_q_down_proj.weight", HA + "q_a_proj.weight", fp8=True),
    Rule((A + "linear_q_up_proj.layer_norm_weight", A + "q_layernorm.weight"), HA + "q_a_layernorm.weight"),
    Rule(A + "linear_q_up_proj.weight", HA + "q_b_proj.weight", fp8=True),
    Rule(A + "linear_kv_down_proj.weight", HA + "kv_a_proj_with_mqa.weight", fp8=True),
    Rule((A + "linear_kv_up_proj.layer_norm_weight", A + "kv_layernorm.weight"), HA + "kv_a_layernorm.weight"),
    Rule(A + "linear_kv_up_proj.weight", HA + "kv_b_proj.weight", fp8=True),
)


def _leading_dense(moe_layers: tuple[bool, ...]) -> bool:
    """HF's first_k_dense_replace: dense layers first, MoE after."""
    return list(moe_layers) == sorted(moe_layers)


DEEPSEEK_V3 = Family(
    architecture="DeepseekV3ForCausalLM",
    config_class=DeepseekV3Config,
    rules=RULES + MLA_RULES + expert_rules("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    + shared_expert_rules("shared_experts")
    + (Rule(L + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias"),),
    requires={
        **MOE_REQUIRES,
        "multi_latent_attention": True,
        "position_embedding": lambda p: p in ("rope", "none"),  # MLA applies its own rope either way
        "qk_layernorm": True,  # HF always normalises the latent q and kv
        "norm_epsilon": lambda eps: abs(eps - 1e-6) <= 1e-15,  # ... with eps 1e-6, whatever rms_norm_eps says
        "moe_layers": _leading_dense,
        "moe_score_function": "sigmoid",
        "moe_expert_bias": True,  # HF always adds e_score_correction_bias
        "moe_group_score_topk": lambda k: k in (None, 2),
        "moe_shared_experts": lambda n: bool(n),
        "moe_shared_gate": False,
    },
    config_fields=fields(drop=("head_dim", "num_key_value_heads")) + (
        ("num_key_value_heads", lambda s: s.num_attention_heads),
        ("rope_interleave", lambda s: True),
        ("attention_bias", lambda s: False),
        ("q_lora_rank", lambda s: s.q_lora_rank),
        ("kv_lora_rank", lambda s: s.kv_lora_rank),
        ("qk_nope_head_dim", lambda s: s.qk_head_dim),
        ("qk_rope_head_dim", lambda s: s.qk_pos_emb_head_dim),
        ("v_head_dim", lambda s: s.v_head_dim),
        ("n_routed_experts", lambda s: s.num_experts),
        ("num_experts_per_tok", lambda s: s.moe_topk),
        ("moe_intermediate_size", lambda s: s.moe_ffn_hidden_size),
        ("n_shared_experts", lambda s: s.moe_shared_experts),
        ("first_k_dense_replace", lambda s: len(dense_layers(s))),
        # megatron-core limits routing to groups only when moe_router_group_topk is set
        ("n_group", lambda s: s.moe_num_groups if s.moe_group_topk else 1),
        ("topk_group", lambda s: s.moe_group_topk or 1),
        ("topk_method", lambda s: "noaux_tc"),  # selection on sigmoid + e_score_correction_bias
        ("scoring_func", lambda s: s.moe_score_function),
        ("moe_layer_freq", lambda s: 1),  # with first_k_dense_replace: every layer after the dense ones
        ("norm_topk_prob", lambda s: s.moe_topk > 1),  # megatron-core renormalises sigmoid scores when k > 1
        ("routed_scaling_factor", lambda s: float(s.moe_scaling_factor or 1.0)),
        ("num_mtp_layers", lambda s: s.mtp_num_layers),
    ),
    detect=lambda spec: spec.multi_latent_attention,
    nullable=("q_lora_rank",),  # None: a plain q_proj
)
