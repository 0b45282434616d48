"""Qwen3-Next and Qwen3.5 (gated delta net) in one CPU process: the CPU stand-ins for megatron-core's
fla/Triton calls against transformers' torch path, the tables' layouts written out by hand, the
Megatron-LM args, and what is refused. The end-to-end proofs (export, import, reshard, verify on
real checkpoints) are in test_moe.py and test_import.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.families.qwen3_next import (
    GATED_QKV, PLAIN, QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT, ZERO_CENTERED, PerKeyHead, _ba, _qkvz,
)
from distconv.megatron.args import megatron_args as import_args
from distconv.megatron.args import spec_from_args
from distconv.megatron.catalogue import Target, check_layout, key_of, shards_of
from distconv.megatron.model import stand_ins
from distconv.spec import ModelSpec

from fixtures.build import FIXTURES
from fixtures.megatron_cpu import megatron_args

QN = FIXTURES["qwen3_next"].args
Q35 = FIXTURES["qwen3_5"].args


def _spec(**changes) -> ModelSpec:
    return spec_from_args(megatron_args(**{**QN, **changes})).with_vocab(256)


# ---- the CPU stand-ins, against transformers' torch path ------------------------------------------

@pytest.fixture
def hf_torch_path():
    """transformers' Qwen3-Next module, whose gated delta rule is its torch code (fla absent)."""
    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla is installed: transformers would run fla's kernels, not its torch path")
    from transformers.models.qwen3_next import modeling_qwen3_next

    return modeling_qwen3_next


@pytest.mark.parametrize("seq", [7, 70])  # within one 64-token chunk, and across two
def test_gated_delta_rule_stand_in_equals_transformers_torch_path(hf_torch_path, seq):
    """What megatron-core's GatedDeltaNet calls with the stand-ins (``l2norm`` on q and k, then
    megatron-core's own chunked rule) equals transformers' recurrent and chunked torch rules (which
    l2-normalise inside) on random inputs, value heads sharing key heads as both repeat them."""
    from megatron.core.ssm import gated_delta_net as gdn

    from distconv.megatron.gated_delta_net import kernel_changes

    gen = torch.Generator().manual_seed(seq)
    b, hv, dk, dv = 2, 4, 8, 6
    q, k = (torch.randn(b, seq, hv, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, seq, hv, dv, generator=gen)
    g = -torch.rand(b, seq, hv, generator=gen) * 2  # log decay <= 0
    beta = torch.rand(b, seq, hv, generator=gen)
    with stand_ins(kernel_changes()):
        ours, _ = gdn.chunk_gated_delta_rule(gdn.l2norm(q), gdn.l2norm(k), v, g=g, beta=beta, initial_state=None,
                                             output_final_state=False, use_qk_l2norm_in_kernel=False)
    for rule in (hf_torch_path.torch_recurrent_gated_delta_rule, hf_torch_path.torch_chunk_gated_delta_rule):
        theirs, _ = rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
        assert (ours - theirs).abs().max().item() <= 1e-5, rule.__name__


def test_l2norm_stand_in_equals_transformers(hf_torch_path):
    from distconv.megatron.gated_delta_net import l2norm

    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(l2norm(x), hf_torch_path.l2norm(x), atol=1e-7, rtol=0)


def test_zero_centred_norm_stand_in_equals_transformers_rmsnorm(hf_torch_path):
    """transformer-engine's zero-centred RMSNorm, as stood in for: HF's ``x_hat * (1 + weight)``."""
    from types import SimpleNamespace

    from distconv.megatron.gated_delta_net import Norm

    config = SimpleNamespace(normalization="RMSNorm", layernorm_zero_centered_gamma=True, params_dtype=torch.float32)
    ours, theirs = Norm(config, 16, eps=1e-6), hf_torch_path.Qwen3NextRMSNorm(16, eps=1e-6)
    weight = 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    assert (ours(x) - theirs(x)).abs().max().item() <= 1e-6


def test_the_stand_ins_undo_themselves():
    """megatron-core's gated delta net module and spec builders are as they were once the model is built."""
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as eav
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.ssm import gated_delta_net as gdn

    from distconv.megatron.gated_delta_net import kernel_changes, spec_changes

    places = [(gdn, n) for n in ("HAVE_FLA", "l2norm", "chunk_gated_delta_rule", "causal_conv1d_fn")] + [
        (eav, "TESpecProvider"), (gpt_layer_specs, "TESpecProvider")]
    state = lambda: [(n in vars(m), vars(m).get(n)) for m, n in places]  # noqa: E731
    before = state()
    with stand_ins(kernel_changes() + spec_changes()):
        assert gdn.HAVE_FLA and gdn.chunk_gated_delta_rule is gdn.torch_chunk_gated_delta_rule
    assert state() == before


# ---- the tables, against layouts written by hand --------------------------------------------------

def test_in_proj_qkvz_is_grouped_per_key_head():
    """2 key heads, 4 value heads (2 per key head), head dims 1: Qwen3-Next's rows are, per key head,
    ``[q_h, k_h, v, v, z, z]``; in_proj_ba per key head ``[b, b, a, a]``."""
    s = dataclasses.replace(_spec(), linear_key_head_dim=1, linear_value_head_dim=1)
    q, k = torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0]])
    v, z = torch.tensor([[30.0], [31.0], [32.0], [33.0]]), torch.tensor([[40.0], [41.0], [42.0], [43.0]])
    (qkvz,) = PerKeyHead(_qkvz).export((q, k, v, z), s)
    assert qkvz.flatten().tolist() == [10, 20, 30, 31, 40, 41, 11, 21, 32, 33, 42, 43]
    b, a = torch.tensor([[50.0], [51.0], [52.0], [53.0]]), torch.tensor([[60.0], [61.0], [62.0], [63.0]])
    (ba,) = PerKeyHead(_ba).export((b, a), s)
    assert ba.flatten().tolist() == [50, 51, 60, 61, 52, 53, 62, 63]
    for transform, parts, packed in ((PerKeyHead(_qkvz), (q, k, v, z), qkvz), (PerKeyHead(_ba), (b, a), ba)):
        assert all(torch.equal(x, y) for x, y in zip(transform.import_((packed,), s), parts))


def test_gated_q_proj_is_per_head_query_then_gate():
    """4 query heads in 2 groups, head dim 1: megatron-core's rows per group are ``[q, q, gate, gate,
    k, v]``; HF's q_proj per head ``[q_h, gate_h]``."""
    s = dataclasses.replace(_spec(), num_attention_heads=4, num_query_groups=2, head_dim=1)
    rows = [1, 2, 101, 102, 201, 301, 3, 4, 103, 104, 202, 302]
    t = torch.tensor(rows, dtype=torch.float32)[:, None]
    q_proj, k_proj, v_proj = GATED_QKV.export(t, s)
    assert q_proj.flatten().tolist() == [1, 101, 2, 102, 3, 103, 4, 104]
    assert (k_proj.flatten().tolist(), v_proj.flatten().tolist()) == ([201, 202], [301, 302])
    assert torch.equal(GATED_QKV.import_((q_proj, k_proj, v_proj), s), t)


@pytest.mark.parametrize("zero_centered,out_norm,others", [(True, 1, 0), (False, 0, -1)])
def test_norm_offsets_are_the_formats_difference_and_pure(zero_centered, out_norm, others):
    """HF's linear_attn.norm is plain gamma, its other norms gamma - 1; Megatron stores gamma - 1 for
    every norm (zero-centred gamma) or gamma for every one: the export adds the difference to a new
    tensor, as often as it is called, and the import takes it away."""
    s = _spec(layernorm_zero_centered_gamma=zero_centered)
    weight = torch.tensor([0.25, -0.5, 1.0])
    kept = weight.clone()
    for transform, offset in ((PLAIN, out_norm), (ZERO_CENTERED, others)):
        for _ in range(2):  # a second call (a second weight sync) sees the same tensor
            (hf,) = transform.export(weight, s)
            assert torch.equal(hf, kept + offset) and torch.equal(weight, kept)
        assert torch.equal(transform.import_values(hf, s), kept)


def test_the_gated_delta_net_is_split_per_component_over_tp():
    """At TP2 each in_proj component's own global tensor is halved (never the packed rows), and the
    input norm fused into in_proj is saved under its spelling in gated delta net layers."""
    s, target = _spec(), Target(tp=2, pp=1, ep=2, per_layer=True, te=True)
    shards = shards_of("decoder.layers.0.self_attention.in_proj.weight.value", (64, 64), s, target)
    assert [(x.key, x.offsets, x.sizes) for x in shards] == [
        ("decoder.layers.0.self_attention.in_proj.weight.value", (0, 0), (32, 64)),
        ("decoder.layers.0.self_attention.in_proj.weight.value", (32, 0), (32, 64))]
    norm = "decoder.layers.{}.self_attention.linear_qkv.layer_norm_weight"
    assert key_of(norm.format(0), s, target) == "decoder.layers.0.self_attention.in_proj.layer_norm_weight"
    assert key_of(norm.format(1), s, target) == norm.format(1)
    with pytest.raises(DistconvError, match="linear_num_key_heads 2 is not divisible by TP 4"):
        check_layout(s, Target(tp=4, ep=1, per_layer=True, te=True))


# ---- args, configs and refusals ---------------------------------------------------------------------

@pytest.mark.parametrize("freq,layers", [(2, (True, False, True, False)), (4, (True, True, True, False)),
                                         ([1, 0, 0, 1], (True, False, False, True)), ("3", (True, True, False, True))])
def test_linear_attention_freq_reads_and_writes_back(freq, layers):
    spec = _spec(linear_attention_freq=freq)
    assert spec.linear_attention == layers
    written = import_args(spec, Target(per_layer=True, te=True), divisible_by=64, tokenizer=None)
    assert written.linear_attention_freq == (int(freq) if isinstance(freq, (int, str)) else freq)
    assert spec_from_args(written).with_vocab(256) == spec


@pytest.mark.parametrize("family", [QWEN3_NEXT, QWEN3_5_MOE, QWEN3_5], ids=lambda f: f.architecture)
def test_import_reads_the_spec_export_writes(family):
    """HF config -> spec is the inverse of spec -> HF config (Qwen3.5's MoE model has no dense MLP, so
    no ``intermediate_size``: its import sets Megatron-LM's unused ``ffn_hidden_size`` to the experts'),
    and the args an import writes read back as the same spec (dense Qwen3.5: the dense fixture's)."""
    spec = spec_from_args(megatron_args(**Q35)).with_vocab(256) if family is QWEN3_5 else _spec()
    config = family.hf_config(spec)
    read = family.spec_from_hf_config(config, 256, torch.float32)
    assert read == (dataclasses.replace(spec, ffn_hidden_size=spec.moe_ffn_hidden_size) if family is QWEN3_5_MOE else spec)
    assert spec_from_args(import_args(read, Target(2, 1, 2, per_layer=True, te=True), divisible_by=64,
                                      tokenizer=None)).with_vocab(256) == read
    family.check_config(config, spec)


def test_qwen3_next_mtp_layer_count_goes_both_ways():
    """One MTP layer: the HF config says ``mtp_num_hidden_layers`` (what vLLM reads), the import reads
    it back, and the Megatron-LM args it writes read back as the same spec."""
    spec = spec_from_args(megatron_args(**FIXTURES["qwen3_next_mtp"].args)).with_vocab(256)
    config = QWEN3_NEXT.hf_config(spec)
    assert config.mtp_num_hidden_layers == 1
    read = QWEN3_NEXT.spec_from_hf_config(config, 256, torch.float32)
    assert read == spec and read.mtp_num_layers == 1
    assert spec_from_args(import_args(read, Target(1, 2, 2, per_layer=True, te=True), divisible_by=64,
                                      tokenizer=None)).with_vocab(256) == read
    assert QWEN3_NEXT.hf_name("model.layers.2.fc.weight", spec) == "mtp.fc.weight"
    assert QWEN3_NEXT.hf_name("model.layers.2.self_attn.q_proj.weight", spec) == "mtp.layers.0.self_attn.q_proj.weight"
    assert QWEN3_NEXT.hf_name("model.layers.1.self_attn.q_proj.weight", spec) == "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("changes,named", [
    (dict(mtp_num_layers=2), "mtp_num_layers"),  # the release's layout holds one MTP layer
    (dict(mtp_num_layers=1, untie_embeddings_and_output_weights=False), "mtp_conflict"),
    # megatron-core builds the MTP layer like the last layer; HF's is always full attention
    (dict(mtp_num_layers=1, linear_attention_freq=[1, 0, 1, 1]), "MTP layers after a gated delta net layer"),
    (dict(attention_output_gate=False), "attention_output_gate"),
    (dict(moe_shared_expert_gate=False), "moe_shared_gate"),
    (dict(qk_layernorm=False), "qk_layernorm"),
    (dict(use_rope_scaling=True), "rope_scaling"),
])
def test_what_qwen3_next_cannot_express_is_refused(changes, named):
    with pytest.raises(DistconvError, match=named):
        pick_family(FAMILIES, _spec(**changes), None)


def test_qwen3_5_needs_every_layer_moe_and_renormalised_routing():
    for changes, named in ((dict(moe_layer_freq=[0, 1, 1, 1]), "moe_layers"), (dict(moe_router_pre_softmax=True), "moe_pre_softmax")):
        with pytest.raises(DistconvError, match=named):
            pick_family(FAMILIES, _spec(**changes), "Qwen3_5MoeForCausalLM")
    assert pick_family(FAMILIES, _spec(), None) is QWEN3_NEXT  # Qwen3.5 only by --hf-config


def test_a_gated_delta_net_model_without_experts_is_dense_qwen3_5():
    """Qwen3-Next has no model without experts; dense Qwen3.5 is chosen for one, and refuses experts."""
    dense = spec_from_args(megatron_args(**Q35)).with_vocab(256)
    assert pick_family(FAMILIES, dense, None) is QWEN3_5
    assert "num_experts=4" in QWEN3_5.unsupported(_spec())
    for changes, named in ((dict(attention_output_gate=False), "attention_output_gate"), (dict(mtp_num_layers=2), "mtp_num_layers")):
        with pytest.raises(DistconvError, match=named):
            pick_family(FAMILIES, spec_from_args(megatron_args(**{**Q35, **changes})).with_vocab(256), None)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM"])
def test_other_families_refuse_a_gated_delta_net_model(arch):
    with pytest.raises(DistconvError, match="experimental_attention_variant='gated_delta_net'"):
        pick_family(FAMILIES, _spec(), arch)


def test_import_refuses_a_folder_with_mtp_layers_its_config_does_not_count(tmp_path):
    """A folder holding an MTP layer (``mtp.*``) whose config does not say so (no
    ``mtp_num_hidden_layers``) is refused, saying so, before anything is written."""
    import transformers

    from distconv.directions.import_ import import_hf

    config = QWEN3_NEXT.hf_config(_spec())
    config.vocab_size = 250
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(tmp_path / "hf"))
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state["mtp.fc.weight"] = torch.zeros(64, 128)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen3NextForCausalLM"]
    with pytest.raises(DistconvError, match=r"mtp\.fc\.weight \(MTP layers the config does not count"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "meg"), quiet=True)
    assert not (tmp_path / "meg").exists()
