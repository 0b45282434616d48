"""GPT-2: learned absolute positions, LayerNorm with bias, GELU, biases everywhere.

HF's ``Conv1D`` stores matrices as ``[in, out]``, so every matrix is transposed, and
``c_attn`` holds ``[q; k; v]`` (each all heads) where megatron-core groups rows per head.
"""

from __future__ import annotations

import torch

from distconv.families.base import QKV, VOCAB, Family, Rule, Tensors, Transform
from distconv.spec import ModelSpec

L = "decoder.layers.{layer}."
H = "transformer.h.{layer}."


class Conv1D(Transform):
    """A Megatron ``[out, in]`` matrix is HF Conv1D's ``[in, out]``."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        return (t.transpose(0, 1),)

    def import_(self, ts: Tensors, spec: ModelSpec) -> torch.Tensor:
        return ts[0].transpose(0, 1)


class FusedQKV(Transform):
    """Megatron ``[np, (q, k, v), hn]`` rows -> HF ``[q; k; v]``; weights also transposed."""

    def export(self, t: torch.Tensor, spec: ModelSpec) -> Tensors:
        fused = torch.cat(QKV.export(t, spec), dim=0)
        return (fused.transpose(0, 1) if fused.dim() == 2 else fused,)

    def import_(self, ts: Tensors, spec: ModelSpec) -> torch.Tensor:
        fused = ts[0].transpose(0, 1) if ts[0].dim() == 2 else ts[0]
        return QKV.import_(tuple(fused.chunk(3, dim=0)), spec)


CONV1D = Conv1D()
FUSED_QKV = FusedQKV()

RULES = (
    Rule("embedding.word_embeddings.weight", "transformer.wte.weight", VOCAB),
    Rule("embedding.position_embeddings.weight", "transformer.wpe.weight"),
    Rule(L + "self_attention.linear_qkv.layer_norm_weight", H + "ln_1.weight"),
    Rule(L + "self_attention.linear_qkv.layer_norm_bias", H + "ln_1.bias"),
    Rule(L + "self_attention.linear_qkv.weight", H + "attn.c_attn.weight", FUSED_QKV),
    Rule(L + "self_attention.linear_qkv.bias", H + "attn.c_attn.bias", FUSED_QKV),
    Rule(L + "self_attention.linear_proj.weight", H + "attn.c_proj.weight", CONV1D),
    Rule(L + "self_attention.linear_proj.bias", H + "attn.c_proj.bias"),
    Rule(L + "mlp.linear_fc1.layer_norm_weight", H + "ln_2.weight"),
    Rule(L + "mlp.linear_fc1.layer_norm_bias", H + "ln_2.bias"),
    Rule(L + "mlp.linear_fc1.weight", H + "mlp.c_fc.weight", CONV1D),
    Rule(L + "mlp.linear_fc1.bias", H + "mlp.c_fc.bias"),
    Rule(L + "mlp.linear_fc2.weight", H + "mlp.c_proj.weight", CONV1D),
    Rule(L + "mlp.linear_fc2.bias", H + "mlp.c_proj.bias"),
    Rule("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
    Rule("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
    Rule("output_layer.weight", "lm_head.weight", VOCAB),
)

GPT2 = Family(
    architecture="GPT2LMHeadModel",
    config_class="GPT2Config",
    rules=RULES,
    requires=dict(
        normalization="LayerNorm",
        gated_mlp=False,
        activation=lambda a: a in ("gelu", "gelu_new", "gelu_fast"),
        position_embedding="learned_absolute",
        add_bias_linear=True,
        qk_layernorm=False,
        zero_centered_gamma=False,
        window_size=None,
        plain_mha=True,
        attention_output_gate=False,
        experimental_attention_variant=None,
        hybrid_pattern="",  # a hybrid (Mamba) model: families.nemotron_h
        softmax_type="vanilla",
        activation_clamp=None,
        glu_linear_offset=0.0,
    ),
    config_fields=(
        ("vocab_size", lambda s: s.vocab_size or s.padded_vocab_size),
        ("n_positions", lambda s: s.max_position_embeddings),
        ("n_embd", lambda s: s.hidden_size),
        ("n_layer", lambda s: s.num_layers),
        ("n_head", lambda s: s.num_attention_heads),
        ("n_inner", lambda s: s.ffn_hidden_size),
        ("activation_function", lambda s: s.activation),
        ("layer_norm_epsilon", lambda s: s.norm_epsilon),
        ("tie_word_embeddings", lambda s: s.tie_embeddings),
        ("initializer_range", lambda s: s.init_std),
    ),
    detect=lambda spec: spec.position_embedding == "learned_absolute" and spec.normalization == "LayerNorm",
)
