"""DeepSeek-V3: multi-latent attention, sigmoid routing with expert bias and groups, shared experts.

Megatron's MLA rotates the rope slice de-interleaved, which is HF's ``rope_interleave=True``:
the weights copy unchanged. The router is ``moe.SIGMOID_*``'s (shared with GLM-4.5).
HF's latent q/kv RMSNorms use a fixed epsilon of 1e-6, megatron-core one epsilon for every norm.
HF's ``qk_head_dim`` is the whole query/key head (no-rope + rope part), megatron-core's the no-rope
part only (``qk_nope_head_dim``).

Import reads YaRN RoPE only with the settings Megatron-LM 0.16 can pass on (it has no flags for
``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``: MLATransformerConfig's
defaults 4096, 32, 1). MTP layers (``num_nextn_predict_layers``) convert both ways (``moe.MTP_RULES``).

transformers ignores ``topk_method``, ``scoring_func`` and ``moe_layer_freq``, but vLLM and SGLang
read them as DeepSeek's own configs write them: ``noaux_tc`` (the expert bias exists and takes
part in selection only), ``sigmoid`` scores, and MoE in every layer after the dense ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distconv.errors import DistconvError
from distconv.families.base import Family, Rule
from distconv.families.llama import RULES, H, L, spec_fields
from distconv.families.moe import (
    SIGMOID_FIELDS, SIGMOID_REQUIRES, SIGMOID_RULES, SIGMOID_SPEC, fields, with_fields, with_mtp,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

A = L + "self_attention."
HA = H + "self_attn."

MLA_RULES = (
    Rule(A + "linear_q_proj.weight", HA + "q_proj.weight", fp8=True),
    Rule(A + "linear_q_down_proj.weight", HA + "q_a_proj.weight", fp8=True),
    Rule(A + "linear_q_up_proj.layer_norm_weight", HA + "q_a_layernorm.weight"),
    Rule(A + "linear_q_up_proj.weight", HA + "q_b_proj.weight", fp8=True),
    Rule(A + "linear_kv_down_proj.weight", HA + "kv_a_proj_with_mqa.weight", fp8=True),
    Rule(A + "linear_kv_up_proj.layer_norm_weight", HA + "kv_a_layernorm.weight"),
    Rule(A + "linear_kv_up_proj.weight", HA + "kv_b_proj.weight", fp8=True),
)

# what Megatron-LM 0.16 builds MLA's YaRN with, whatever the args say (no flags for these)
YARN_FIXED = {"original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}


def yarn_from_hf(config: PretrainedConfig) -> dict[str, Any] | None:
    """HF DeepSeek RoPE as ``ModelSpec.rope_scaling``: None (plain RoPE) or MLA's YaRN (``spec._rope_scaling``'s keys)."""
    scaling = dict(getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    known = {"rope_type", "type", "rope_theta", "factor", "mscale", "mscale_all_dim", *YARN_FIXED}
    yarn = {"rope_type": "yarn", "factor": float(scaling.get("factor") or 0.0),
            **{k: float(scaling.get(k) or v) for k, v in YARN_FIXED.items()},
            "mscale": float(scaling.get("mscale") or 1.0), "mscale_all_dim": float(scaling.get("mscale_all_dim") or 0.0)}
    yarn["original_max_position_embeddings"] = int(yarn["original_max_position_embeddings"])
    extra = sorted(k for k in scaling if k not in known and not (k == "truncate" and scaling[k] is True))
    if kind != "yarn" or extra or yarn["factor"] <= 0 or any(yarn[k] != v for k, v in YARN_FIXED.items()):
        raise DistconvError(f"RoPE scaling {scaling!r} has no Megatron-LM equivalent for MLA (supported: yarn with a "
                            "factor, mscale, mscale_all_dim, and original_max_position_embeddings 4096, beta_fast 32, "
                            "beta_slow 1)")
    return yarn


DEEPSEEK_V3 = Family(
    architecture="DeepseekV3ForCausalLM",
    config_class="DeepseekV3Config",
    # Llama's rules without the fused q/k/v (its q_proj would be MLA's own when there is no q LoRA)
    rules=with_mtp(tuple(r for r in RULES if r.megatron != L + "self_attention.linear_qkv.weight")
                   + MLA_RULES + SIGMOID_RULES),
    requires={
        **SIGMOID_REQUIRES,
        "multi_latent_attention": True,
        "experimental_attention_variant": None,  # DSA: families.dsa
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
    spec_fields=with_fields(
        spec_fields(
            num_query_groups=lambda c: c.num_attention_heads,  # num_key_value_heads is checked equal
            head_dim=lambda c: c.hidden_size // c.num_attention_heads,  # kv_channels: unused by MLA
            add_bias_linear=lambda c: False,  # attention_bias is checked False
            add_qkv_bias=lambda c: False,
            qk_layernorm=lambda c: True,
            rope_scaling=yarn_from_hf,
        ),
        **SIGMOID_SPEC,
        multi_latent_attention=lambda c: True,
        q_lora_rank=lambda c: c.q_lora_rank,
        kv_lora_rank=lambda c: c.kv_lora_rank,
        qk_head_dim=lambda c: c.qk_nope_head_dim,
        qk_pos_emb_head_dim=lambda c: c.qk_rope_head_dim,
        v_head_dim=lambda c: c.v_head_dim,
    ),
)
