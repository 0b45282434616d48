"""Mappings are pure: checked in one CPU process against layouts written out by hand."""

from __future__ import annotations

import dataclasses
import io
import pickle

import pytest
import torch

from distconv.engine.run import parse_size
from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.families.base import GATE_UP, QKV, VOCAB
from distconv.families.llama import LLAMA
from distconv.megatron.args import spec_from_args
from distconv.megatron.checkpoint import read_dcp_metadata, safe_torch_load
from distconv.spec import ModelSpec

from fixtures.megatron_cpu import megatron_args


def spec(**kw) -> ModelSpec:
    return dataclasses.replace(spec_from_args(megatron_args()), vocab_size=250, **kw)


def test_qkv_split_matches_megatron_group_layout_written_by_hand():
    # 4 query heads in 2 groups, head_dim 3, hidden 5: rows per group are [q, q, k, v]
    s = spec(num_attention_heads=4, num_query_groups=2, head_dim=3)
    rows = []
    for g in range(2):
        rows += [("q", 2 * g), ("q", 2 * g + 1), ("k", g), ("v", g)]
    code = {"q": 100.0, "k": 200.0, "v": 300.0}
    block = lambda name, head: torch.full((3, 5), code[name] + 10 * head) + torch.arange(3.0)[:, None]  # noqa: E731
    t = torch.cat([block(*r) for r in rows])
    q, k, v = QKV.export(t, s)
    for name, out, count in (("q", q, 4), ("k", k, 2), ("v", v, 2)):
        expected = torch.cat([block(name, h) for h in range(count)])
        assert torch.equal(out, expected), name


def test_qkv_mha_equals_legacy_version_2_order():
    # with one head per group, Megatron's order is checkpoint_version>=2.0's [np, 3, hn]
    s = spec(num_attention_heads=4, num_query_groups=4, head_dim=8)
    t = torch.randn(4 * 3 * 8, 16)
    q, k, v = QKV.export(t, s)
    legacy = t.view(4, 3, 8, 16)
    assert torch.equal(q, legacy[:, 0].reshape(32, 16))
    assert torch.equal(k, legacy[:, 1].reshape(32, 16))
    assert torch.equal(v, legacy[:, 2].reshape(32, 16))


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 1)])
def test_qkv_round_trip_weights_and_biases(heads, groups):
    s = spec(num_attention_heads=heads, num_query_groups=groups, head_dim=4)
    for shape in [((heads + 2 * groups) * 4, 12), ((heads + 2 * groups) * 4,)]:
        t = torch.randn(shape)
        q, k, v = QKV.export(t, s)
        assert q.shape[0] == heads * 4 and k.shape[0] == v.shape[0] == groups * 4
        assert torch.equal(QKV.import_((q, k, v), s), t)


def test_gate_up_and_vocab_round_trip():
    s = spec(padded_vocab_size=256)
    fc1 = torch.randn(2 * 7, 5)
    gate, up = GATE_UP.export(fc1, s)
    assert torch.equal(gate, fc1[:7]) and torch.equal(up, fc1[7:])
    assert torch.equal(GATE_UP.import_((gate, up), s), fc1)
    emb = torch.randn(256, 4)
    (trimmed,) = VOCAB.export(emb, s)
    assert torch.equal(trimmed, emb[:250])
    padded = VOCAB.import_((trimmed,), s)
    assert padded.shape == (256, 4) and torch.equal(padded[:250], emb[:250]) and not padded[250:].any()


def test_transforms_work_on_meta_tensors():
    s = spec()
    t = torch.empty(((4 + 2 * 2) * 16, 64), device="meta")
    assert [tuple(x.shape) for x in QKV.export(t, s)] == [(64, 64), (32, 64), (32, 64)]


@pytest.mark.parametrize("changes,arch", [
    ({}, "LlamaForCausalLM"),
    ({"add_qkv_bias": True}, "Qwen2ForCausalLM"),
    ({"qk_layernorm": True}, "Qwen3ForCausalLM"),
    ({"window_size": (4095, 0)}, "MistralForCausalLM"),
])
def test_family_inference(changes, arch):
    assert pick_family(FAMILIES, spec(**changes), None).architecture == arch


@pytest.mark.parametrize("changes,needle", [
    ({"normalization": "LayerNorm"}, "normalization='LayerNorm'"),
    ({"gated_mlp": False, "activation": "gelu"}, "gated_mlp=False"),
    ({"position_embedding": "learned_absolute"}, "position_embedding='learned_absolute'"),
    ({"add_bias_linear": True}, "add_bias_linear=True"),
    ({"rotary_interleaved": True}, "rotary_interleaved=True"),
])
def test_unsupported_combinations_are_errors(changes, needle):
    with pytest.raises(DistconvError, match=needle.replace("(", r"\(")):
        pick_family(FAMILIES, spec(**changes), None)


def test_hf_config_conflicts_name_both_values():
    s = spec()
    config = LLAMA.hf_config(s)
    LLAMA.check_config(config, s)  # its own config agrees
    config.num_hidden_layers = 7
    config.rms_norm_eps = 1e-6
    with pytest.raises(DistconvError) as e:
        LLAMA.check_config(config, s)
    assert "num_hidden_layers: HF config 7, checkpoint 4" in str(e.value)
    assert "rms_norm_eps: HF config 1e-06, checkpoint 1e-05" in str(e.value)


def test_rope_scaling_is_copied_exactly():
    s = spec_from_args(megatron_args(use_rope_scaling=True, rope_scaling_factor=32.0, rotary_base=500000))
    config = LLAMA.hf_config(dataclasses.replace(s, vocab_size=256))
    rope = config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0 and rope["rope_theta"] == 500000.0
    assert (rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]) == (1.0, 4.0, 8192)


def test_old_and_new_arg_spellings():
    old = megatron_args(num_query_groups=1, group_query_attention=False)
    del old.layernorm_epsilon
    old.norm_epsilon = 3e-6
    s = spec_from_args(old)
    # num_query_groups only counts when group_query_attention is set
    assert s.num_query_groups == s.num_attention_heads and s.norm_epsilon == 3e-6


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("200KB") == 200_000
    with pytest.raises(DistconvError):
        parse_size("five")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_metadata_unpickler_refuses_foreign_globals(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DistconvError, match="refusing to unpickle"):
        read_dcp_metadata(tmp_path)


def test_common_state_unpickler_refuses_foreign_globals(tmp_path):
    buf = io.BytesIO()
    torch.save({"args": _Evil()}, buf)
    buf.seek(0)
    with pytest.raises(DistconvError, match="allow-list"):
        safe_torch_load(buf, "common.pt")


@pytest.mark.parametrize("missing,named", [
    (("hidden_size",), "hidden_size"),
    (("num_layers", "num_attention_heads"), "num_layers, num_attention_heads"),
    (("max_position_embeddings", "seq_length"), "max_position_embeddings"),
    (("padded_vocab_size",), "padded_vocab_size"),
])
def test_a_missing_arg_without_a_default_is_an_error_naming_it(missing, named):
    """Reading a checkpoint's args (export, reshard, and the model verify builds): an arg Megatron-LM
    has no default for is named, never filled in with a test model's value."""
    from distconv.megatron.model import transformer_config

    args = megatron_args()
    for name in missing:
        delattr(args, name)
    for read in (spec_from_args, lambda a: transformer_config(a, 1, 1)):
        with pytest.raises(DistconvError, match=f"checkpoint args lack {named}"):
            read(args)


def test_an_absent_arg_reads_as_megatron_lm_defaults_it():
    """What Megatron-LM's own flags default to, not the small test model's values (RMSNorm, SwiGLU,
    RoPE, no linear bias), in the spec and in the model verify builds."""
    from distconv.megatron.model import transformer_config

    args = megatron_args()
    for name in ("normalization", "swiglu", "position_embedding_type", "add_bias_linear", "ffn_hidden_size",
                 "kv_channels", "layernorm_epsilon", "init_method_std", "untie_embeddings_and_output_weights"):
        delattr(args, name)
    spec = spec_from_args(args)
    assert (spec.normalization, spec.gated_mlp, spec.activation, spec.position_embedding) == ("LayerNorm", False, "gelu", "learned_absolute")
    assert (spec.add_bias_linear, spec.ffn_hidden_size, spec.head_dim) == (True, 4 * args.hidden_size, args.hidden_size // args.num_attention_heads)
    assert (spec.norm_epsilon, spec.init_std, spec.tie_embeddings) == (1e-5, 0.02, True)
    config = transformer_config(args, 1, 1)
    assert (config.normalization, config.gated_linear_unit, config.add_bias_linear) == ("LayerNorm", False, True)
    assert (config.ffn_hidden_size, config.kv_channels) == (4 * args.hidden_size, args.hidden_size // args.num_attention_heads)
