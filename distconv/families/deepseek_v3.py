"""DeepSeek-V3: multi-latent attention, sigmoid routing with expert bias and groups, shared experts.

Megatron's MLA rotates the rope slice de-interleaved, which is HF's ``rope_interleave=True``:
the weights copy unchanged. The router is ``moe.SIGMOID_*``'s (shared with GLM-4.5).
HF's latent q/kv RMSNorms use a fixed epsilon of 1e-6, megatron-core one epsilon for every norm.

transformers ignores ``topk_method``, ``scoring_func`` and ``moe_layer_freq``, but vLLM and SGLang
read them as DeepSeek's own configs write them: ``noaux_tc`` (the expert bias exists and takes
part in selection only), ``sigmoid`` scores, and MoE in every layer after the dense ones.
"""

from __future__ import annotations

from transformers import DeepseekV3Config

from distconv.families.base import Family, Rule
from distconv.families.llama import RULES, H, L
from distconv.families.moe import SIGMOID_FIELDS, SIGMOID_REQUIRES, SIGMOID_RULES, fields

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


DEEPSEEK_V3 = Family(
    architecture="DeepseekV3ForCausalLM",
    config_class=DeepseekV3Config,
    rules=RULES + MLA_RULES + SIGMOID_RULES,
    requires={
        **SIGMOID_REQUIRES,
        "multi_latent_attention": True,
        "position_embedding": lambda p: p in ("rope", "none"),  # MLA applies its own rope either way
        "qk_layernorm": True,  # HF always normalises the latent q and kv
        "norm_epsilon": lambda eps: abs(eps - 1e-6) <= 1e-15,  # ... with eps 1e-6, whatever rms_norm_eps says
    },
    config_fields=fields(drop=("head_dim", "num_key_value_heads")) + SIGMOID_FIELDS + (
        ("num_key_value_heads", lambda s: s.num_attention_heads),
        ("rope_interleave", lambda s: True),
        ("attention_bias", lambda s: False),
        ("q_lora_rank", lambda s: s.q_lora_rank),
        ("kv_lora_rank", lambda s: s.kv_lora_rank),
        ("qk_nope_head_dim", lambda s: s.qk_head_dim),
        ("qk_rope_head_dim", lambda s: s.qk_pos_emb_head_dim),
        ("v_head_dim", lambda s: s.v_head_dim),
        ("topk_method", lambda s: "noaux_tc"),  # selection on sigmoid + e_score_correction_bias
        ("scoring_func", lambda s: s.moe_score_function),
        ("moe_layer_freq", lambda s: 1),  # with first_k_dense_replace: every layer after the dense ones
    ),
    detect=lambda spec: spec.multi_latent_attention,
    nullable=("q_lora_rank",),  # None: a plain q_proj
)
