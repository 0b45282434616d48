"""gpt-oss's mapping, pure parts (one CPU process): the expert layouts written out by hand, the
config both ways, the sliding-window pattern and YaRN against megatron-core's and transformers' own
functions, and what cannot be expressed. The end-to-end proofs (logits, round trips, MXFP4, the
wrong mappings, vLLM) are in test_moe, test_import and test_vllm."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GptOssConfig

from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.families.gpt_oss import DOWN, GATE_UP, GPT_OSS, _rope_parameters
from distconv.megatron.args import megatron_args, spec_from_args
from distconv.megatron.catalogue import Target, check_layout, shards_of

from fixtures.build import FIXTURES
from fixtures.megatron_cpu import megatron_args as small_args

HF = dict(num_hidden_layers=4, num_local_experts=4, vocab_size=256, hidden_size=64, intermediate_size=32, head_dim=16,
          num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=4096,
          num_experts_per_tok=2, swiglu_limit=0.5, tie_word_embeddings=False)


def _config(**changes) -> GptOssConfig:
    config = GptOssConfig(**{**HF, **changes})
    config.architectures = ["GptOssForCausalLM"]
    return config


def _spec(**changes):
    return GPT_OSS.spec_from_hf_config(_config(**changes), 256, torch.float32)


def test_expert_layouts_written_by_hand():
    """fc1 rows ``[g0, g1, u0, u1]`` of an expert with F = 2, H = 3 are HF's columns ``g0, u0, g1, u1``;
    fc2 ``[H, F]`` is HF's ``down_proj [F, H]`` transposed; both ways."""
    s = _spec()
    rows = {"g0": 10.0, "g1": 20.0, "u0": 30.0, "u1": 40.0}
    fc1 = torch.stack([torch.full((3,), v) + torch.arange(3.0) for v in rows.values()])  # [2F, H]
    (gate_up,) = GATE_UP.export(fc1, s)
    assert gate_up.shape == (3, 4) and gate_up[0].tolist() == [10.0, 30.0, 20.0, 40.0]
    assert torch.equal(gate_up[:, 1], fc1[2]) and torch.equal(GATE_UP.import_((gate_up,), s), fc1)
    (bias,) = GATE_UP.export(torch.tensor([1.0, 2.0, 3.0, 4.0]), s)
    assert bias.tolist() == [1.0, 3.0, 2.0, 4.0] and GATE_UP.import_((bias,), s).tolist() == [1.0, 2.0, 3.0, 4.0]
    fc2 = torch.arange(6.0).reshape(3, 2)  # [H, F]
    (down,) = DOWN.export(fc2, s)
    assert down.shape == (2, 3) and down[1].tolist() == [1.0, 3.0, 5.0] and torch.equal(DOWN.import_((down,), s), fc2)


def test_config_both_ways_and_args_megatron_lm_reads_back():
    """HF config -> spec -> Megatron-LM args -> the same spec, and back to the same HF config; the
    args spell what megatron-core 0.16.1's TransformerConfig and core_v0.19's YaRN flags name."""
    spec = _spec()
    args = megatron_args(spec, Target(2, 1, 2, 1), divisible_by=64, tokenizer=None)
    assert spec_from_args(args).with_vocab(256) == spec
    assert (args.quick_geglu, args.swiglu, args.glu_linear_offset, args.activation_func_clamp_value) == (True, False, 1.0, 0.5)
    assert (args.softmax_type, args.window_size, args.window_attn_skip_freq) == ("learnable", (3, 0), 2)
    assert (args.add_bias_linear, args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk) == (True, 4, 32, 2)
    assert (args.position_embedding_type, args.rotary_base, args.rotary_scaling_factor) == ("yarn", 150000, 32.0)
    assert (args.yarn_original_max_position_embeddings, args.yarn_beta_fast, args.yarn_beta_slow) == (4096, 32.0, 1.0)
    assert (args.mscale, args.mscale_all_dim, args.yarn_correction_range_round_to_int) == (1.0, 0.0, False)
    GPT_OSS.check_config(GPT_OSS.hf_config(spec), spec)
    assert GPT_OSS.hf_config(spec).rope_parameters == _config().rope_parameters


def test_hub_config_spelling_is_read():
    """openai/gpt-oss-120b's config.json spells RoPE the old way (``rope_scaling``, ``rope_theta``)."""
    hub = dict(HF, rope_theta=150000, rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                     "beta_slow": 1.0, "truncate": False,
                                                     "original_max_position_embeddings": 4096},
               experts_per_token=2, initial_context_length=4096, model_type="gpt_oss")
    config = GptOssConfig.from_dict(hub)
    config.architectures = ["GptOssForCausalLM"]
    assert GPT_OSS.spec_from_hf_config(config, 256, torch.float32) == _spec()


S, F = "sliding_attention", "full_attention"


@pytest.mark.parametrize("types,freq", [
    ([S, F] * 2, 2), ([F, S] * 2, [0, 1, 0, 1]), ([S, S, F, S], 3), ([F] * 4, [0, 0, 0, 0]), ([S] * 4, None),
])
def test_layer_types_are_the_layers_megatron_core_windows(types, freq):
    """HF's ``layer_types`` become ``window_attn_skip_freq`` (an int where one fits, else a list),
    which megatron-core's own ``is_layer_window_attention`` reads as the same layers, and back."""
    from megatron.core.transformer.utils import is_layer_window_attention

    spec = _spec(layer_types=types)
    args = megatron_args(spec, Target(), divisible_by=64, tokenizer=None)
    windowed = [is_layer_window_attention(args.window_size, args.window_attn_skip_freq, i + 1) for i in range(4)]
    assert windowed == [t == "sliding_attention" for t in types]
    assert args.window_attn_skip_freq == freq
    assert spec_from_args(args).with_vocab(256) == spec and GPT_OSS.hf_config(spec).layer_types == types


def test_megatron_lm_spellings_of_the_window_pattern():
    """An int N windows layer numbers that are not multiples of N; a string digit is an int; a list is per layer."""
    base = FIXTURES["gpt_oss"].args
    for freq, windowed in ((3, (True, True, False, True)), ("2", (True, False, True, False)), ([0, 1, 1, 0], (False, True, True, False))):
        spec = spec_from_args(small_args(**{**base, "window_attn_skip_freq": freq})).with_vocab(256)
        assert tuple(spec.windowed(i) for i in range(4)) == windowed
    with pytest.raises(DistconvError, match="cannot read window_attn_skip_freq"):
        spec_from_args(small_args(**{**base, "window_attn_skip_freq": [1, 0]}))


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("mscale", [(1.0, 0.0), (1.0, 1.0), (0.707, 1.2)])
def test_yarn_is_the_same_rope_in_megatron_core_and_transformers(truncate, mscale):
    """The export's ``rope_parameters`` give transformers' YaRN the inverse frequencies and attention
    factor megatron-core's ``YarnRotaryEmbedding`` computes from the spec (the one verify builds)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding, _yarn_get_concentration_factor,
    )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from distconv.megatron.model import cpu_compat

    spec = _spec()
    spec = dataclasses.replace(spec, rope_scaling={**spec.rope_scaling, "truncate": truncate, "mscale": mscale[0],
                                                   "mscale_all_dim": mscale[1]})
    y = spec.rope_scaling
    with cpu_compat():
        ours = YarnRotaryEmbedding(kv_channels=spec.head_dim, rotary_base=spec.rotary_base, use_cpu_initialization=True,
                                   scaling_factor=y["factor"], original_max_position_embeddings=y["original_max_position_embeddings"],
                                   beta_fast=y["beta_fast"], beta_slow=y["beta_slow"], mscale=y["mscale"],
                                   mscale_all_dim=y["mscale_all_dim"], correction_range_round_to_int=truncate)
        emb, _ = ours.forward(8)  # megatron-core's angles at positions 0..7: [8, 1, 1, head_dim]
    config = GPT_OSS.hf_config(spec)
    assert config.rope_parameters == _rope_parameters(spec)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    hf = torch.outer(torch.arange(8.0), inv_freq)
    assert torch.allclose(emb[:, 0, 0, : spec.head_dim // 2], hf, rtol=0, atol=1e-6)
    assert factor == pytest.approx(_yarn_get_concentration_factor(y["factor"], y["mscale"], y["mscale_all_dim"]), rel=1e-12)


@pytest.mark.parametrize("change,needle", [
    (dict(swiglu_alpha=1.5), "swiglu_alpha 1.5"),
    (dict(attention_bias=False), "attention_bias false"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                           "attention_factor": 1.2, "rope_theta": 150000.0}), "no attention_factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 150000.0}), "plain RoPE or YaRN"),
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 2), "layer_types"),
])
def test_import_refuses_what_megatron_core_cannot_express(change, needle):
    with pytest.raises(DistconvError, match=needle):
        _spec(**change)


def _fixture_spec(**args):
    return spec_from_args(small_args(**{**FIXTURES["gpt_oss"].args, **args})).with_vocab(256)


@pytest.mark.parametrize("args,named", [
    (dict(mscale=2.0), "rope_scaling"),  # with mscale_all_dim 0 transformers ignores mscale
    (dict(window_size=(3, 2)), "window_size"),
    (dict(activation_func_clamp_value=None), "activation_clamp"),
    (dict(glu_linear_offset=0.0), "glu_linear_offset"),
    (dict(moe_router_pre_softmax=True), "moe_pre_softmax"),
    (dict(moe_router_topk_scaling_factor=2.0), "moe_scaling_factor"),
    (dict(position_embedding_type="rope", use_rope_scaling=True), "rope_scaling"),
])
def test_export_refuses_what_transformers_cannot_express(args, named):
    with pytest.raises(DistconvError, match=named):
        pick_family(FAMILIES, _fixture_spec(**args), "GptOssForCausalLM")


def test_family_inferred_and_sinks_elsewhere_refused():
    assert pick_family(FAMILIES, _fixture_spec(), None).architecture == "GptOssForCausalLM"
    with pytest.raises(DistconvError, match="softmax_type='learnable'"):  # a dense model with sinks: no family has them
        pick_family(FAMILIES, spec_from_args(small_args(softmax_type="learnable")).with_vocab(256), None)
    with pytest.raises(DistconvError, match="softmax_type='vanilla'"):
        pick_family(FAMILIES, _fixture_spec(softmax_type="vanilla"), "GptOssForCausalLM")


def test_expert_biases_are_laid_out_at_expert_tp_1_only():
    """megatron-core asserts "Bias in Moe is only supported when ETP==1" (0.16.1 to 0.19): the layout
    check names it and the flag that avoids it; sinks split over TP with their heads."""
    spec = _fixture_spec()
    with pytest.raises(DistconvError, match=r"expert biases \(add_bias_linear\) need expert TP 1, not 2 .*"
                                           r"--expert-tensor-parallel-size 1"):
        check_layout(spec, Target(2, 1, 2))
    check_layout(spec, Target(2, 1, 2, 1))
    sinks = shards_of("decoder.layers.1.self_attention.core_attention.softmax_offset", (4,), spec, Target(2, 1, 2, 1))
    assert [(s.key, s.offsets, s.box, s.target_rank) for s in sinks] == [
        ("decoder.layers.self_attention.core_attention.softmax_offset", (1, 0), (slice(0, 2),), 0),
        ("decoder.layers.self_attention.core_attention.softmax_offset", (1, 2), (slice(2, 4),), 1)]
