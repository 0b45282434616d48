"""DeepSeek-V3: multi-latent attention, sigmoid routing with expert bias and groups, shared experts.

Megatron's MLA rotates the rope slice de-interleaved, which is HF's ``rope_interleave=True``:
the weights copy unchanged. The router is ``moe.SIGMOID_*``'s (shared with GLM-4.5).
HF's latent q/kv RMSNorms use a fixed epsilon of 1e-6, megatron-core one epsilon for every norm:
a model whose ``rms_norm_eps`` is not 1e-6 (Moonlight's 1e-5) converts with a warning, its latent
norms' epsilon differing. HF's ``qk_head_dim`` is the whole query/key head (no-rope + rope part), megatron-core's the no-rope
part only (``qk_nope_head_dim``).

YaRN RoPE carries ``factor``, ``mscale``, ``mscale_all_dim``, ``original_max_position_embeddings``,
``beta_fast`` and ``beta_slow`` (Kimi-K2: 1 and 1) into args of MLATransformerConfig's field names,
which Megatron-LM's ``core_transformer_config_from_args`` copies; Megatron-LM 0.16 has no command-line
flags for the last three (a run other than MLATransformerConfig's defaults 4096, 32, 1 sets them in its
model provider, as Megatron-Bridge's Kimi-K2 provider does). MTP layers (``num_nextn_predict_layers``) convert both ways (``moe.MTP_RULES``).

Kimi-K2's ``config.json`` (``model_type: kimi_k2``, which transformers lacks) is DeepSeek-V3's with
fields of its own (``Family.model_types``); Moonlight's is ``deepseek_v3``. Both name
``DeepseekV3ForCausalLM``, which vLLM loads; their ``auto_map`` is never followed.

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
from distconv.spec import ModelSpec

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

# MLATransformerConfig's defaults for the YaRN settings Megatron-LM 0.16 has no flags for
YARN_DEFAULTS = {"original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}


def yarn_from_hf(config: PretrainedConfig) -> dict[str, Any] | None:
    """HF DeepSeek RoPE as ``ModelSpec.rope_scaling``: None (plain RoPE) or MLA's YaRN (``spec._rope_scaling``'s keys)."""
    scaling = dict(getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    known = {"rope_type", "type", "rope_theta", "factor", "mscale", "mscale_all_dim", *YARN_DEFAULTS}
    given = lambda k, default: default if scaling.get(k) is None else float(scaling[k])  # noqa: E731
    yarn = {"rope_type": "yarn", "factor": given("factor", 0.0),
            **{k: given(k, v) for k, v in YARN_DEFAULTS.items()},
            "mscale": given("mscale", 1.0), "mscale_all_dim": given("mscale_all_dim", 0.0)}
    original = yarn["original_max_position_embeddings"]
    extra = sorted(k for k in scaling if k not in known and not (k == "truncate" and scaling[k] is True))
    if kind != "yarn" or extra or yarn["factor"] <= 0 or original != int(original) or original <= 0:
        raise DistconvError(f"RoPE scaling {scaling!r} has no Megatron-LM equivalent for MLA (supported: yarn with a "
                            "factor, mscale, mscale_all_dim, original_max_position_embeddings, beta_fast and beta_slow)")
    yarn["original_max_position_embeddings"] = int(original)
    return yarn


def _notes(spec: ModelSpec) -> list[str]:
    """The latent norms' epsilon, where the model's is not HF's fixed 1e-6 (Moonlight's 1e-5)."""
    if abs(spec.norm_epsilon - 1e-6) <= 1e-15:
        return []
    return [f"norm epsilon {spec.norm_epsilon:g}: transformers' and vLLM's DeepSeek-V3 normalise the latent q and kv "
            "with 1e-6 whatever rms_norm_eps says, megatron-core with the model's one epsilon: their logits differ "
            "slightly"]


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
        "qk_layernorm": True,  # HF always normalises the latent q and kv (with eps 1e-6: ``_notes``)
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
    notes=_notes,
    model_types=("kimi_k2",),
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
