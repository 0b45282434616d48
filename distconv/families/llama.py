"""Llama: RMSNorm, SwiGLU, RoPE, GQA/MQA, no biases. The base table for its relatives."""

from __future__ import annotations

from distconv.families.base import GATE_UP, QKV, VOCAB, Family, Rule, _hf_value, rope_from_hf

L = "decoder.layers.{layer}."
H = "model.layers.{layer}."

RULES = (
    Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB),
    Rule(L + "self_attention.linear_qkv.layer_norm_weight", H + "input_layernorm.weight"),
    Rule(L + "self_attention.linear_qkv.weight", (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"), QKV, fp8=True),
    Rule(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight", fp8=True),
    Rule(L + "mlp.linear_fc1.layer_norm_weight", H + "post_attention_layernorm.weight"),
    Rule(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), GATE_UP, fp8=True),
    Rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", fp8=True),
    Rule("decoder.final_layernorm.weight", "model.norm.weight"),
    Rule("output_layer.weight", "lm_head.weight", VOCAB),
)

REQUIRES = dict(
    normalization="RMSNorm",
    gated_mlp=True,
    activation="silu",
    position_embedding="rope",
    add_bias_linear=False,
    add_qkv_bias=False,
    qk_layernorm=False,
    rotary_percent=1.0,
    rotary_interleaved=False,
    zero_centered_gamma=False,
    window_size=None,
    window_layers=None,
    num_experts=None,
    multi_latent_attention=False,
    mtp_num_layers=0,
    attention_output_gate=False,
    experimental_attention_variant=None,
    hybrid_pattern="",  # a hybrid (Mamba) model: families.nemotron_h
    softmax_type="vanilla",  # gpt-oss's attention sinks, clamped and offset GLU: no other family has them
    activation_clamp=None,
    glu_linear_offset=0.0,
)

CONFIG_FIELDS = (
    ("vocab_size", lambda s: s.vocab_size or s.padded_vocab_size),
    ("hidden_size", lambda s: s.hidden_size),
    ("intermediate_size", lambda s: s.ffn_hidden_size),
    ("num_hidden_layers", lambda s: s.num_layers),
    ("num_attention_heads", lambda s: s.num_attention_heads),
    ("num_key_value_heads", lambda s: s.num_query_groups),
    ("head_dim", lambda s: s.head_dim),
    ("hidden_act", lambda s: s.activation),
    ("rms_norm_eps", lambda s: s.norm_epsilon),
    ("max_position_embeddings", lambda s: s.max_position_embeddings),
    ("tie_word_embeddings", lambda s: s.tie_embeddings),
    ("initializer_range", lambda s: s.init_std),
    ("rope_theta", lambda s: s.rotary_base),
    ("rope_scaling", lambda s: s.rope_scaling),
)

# ModelSpec field <- HF config (import); padded_vocab_size and train_dtype come from the importer
SPEC_FIELDS = (
    ("num_layers", lambda c: c.num_hidden_layers),
    ("hidden_size", lambda c: c.hidden_size),
    ("ffn_hidden_size", lambda c: c.intermediate_size),
    ("num_attention_heads", lambda c: c.num_attention_heads),
    ("num_query_groups", lambda c: c.num_key_value_heads or c.num_attention_heads),
    ("head_dim", lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
    ("max_position_embeddings", lambda c: c.max_position_embeddings),
    ("normalization", lambda c: "RMSNorm"),
    ("norm_epsilon", lambda c: c.rms_norm_eps),
    ("gated_mlp", lambda c: True),
    ("activation", lambda c: c.hidden_act),
    ("add_bias_linear", lambda c: bool(getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False))),
    ("add_qkv_bias", lambda c: bool(getattr(c, "attention_bias", False))),
    ("qk_layernorm", lambda c: False),
    ("tie_embeddings", lambda c: bool(c.tie_word_embeddings)),
    ("position_embedding", lambda c: "rope"),
    ("rotary_base", lambda c: float(_hf_value(c, "rope_theta"))),
    ("rotary_percent", lambda c: 1.0),
    ("rotary_interleaved", lambda c: False),
    ("rope_scaling", rope_from_hf),
    ("window_size", lambda c: None),
    ("zero_centered_gamma", lambda c: False),
    ("init_std", lambda c: c.initializer_range),
    ("vocab_size", lambda c: c.vocab_size),
)


def spec_fields(**overrides) -> tuple:
    """``SPEC_FIELDS`` with some fields replaced (for relatives of Llama)."""
    return tuple((name, overrides.get(name, fn)) for name, fn in SPEC_FIELDS)


LLAMA = Family(
    architecture="LlamaForCausalLM",
    config_class="LlamaConfig",
    rules=RULES,
    requires=REQUIRES,
    config_fields=CONFIG_FIELDS + (("attention_bias", lambda s: False), ("mlp_bias", lambda s: False)),
    spec_fields=SPEC_FIELDS,
)
