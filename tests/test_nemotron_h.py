"""Nemotron-H (megatron-core's hybrid ``MambaModel``) in one CPU process: the Mamba stand-ins against
transformers' torch path, the mixer's TP layout written out by hand, the Megatron-LM args (0.16 and
0.19 spellings), what is refused, and the export of megatron-core's own TP2 x PP2 save against its
logits (with a deliberately wrong table rejected). Imports, round trips, reshards and verify on real
checkpoints are in test_import.py."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.families.nemotron_h import NEMOTRON_H, _in_proj_rows
from distconv.megatron.args import megatron_args as import_args
from distconv.megatron.args import spec_from_args
from distconv.megatron.catalogue import Target, check_layout, extra_states, shards_of
from distconv.megatron.model import stand_ins
from distconv.spec import ModelSpec

from conftest import hf_logits
from fixtures.build import FIXTURES
from fixtures.megatron_cpu import megatron_args
from wrong_mapping import wrong_mapping

NH = FIXTURES["nemotron_h"].args
TOL = 1e-4


def _spec(**changes) -> ModelSpec:
    return spec_from_args(megatron_args(**{**NH, **changes})).with_vocab(256)


# ---- the CPU stand-ins, against transformers' torch path ------------------------------------------

@pytest.fixture
def hf_mixer():
    """transformers' Nemotron-H Mamba mixer, which runs its torch path (mamba_ssm absent), random weights."""
    if importlib.util.find_spec("mamba_ssm") is not None:
        pytest.skip("mamba_ssm is installed: transformers would run its kernels, not its torch path")
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    config = NemotronHConfig(hidden_size=32, hybrid_override_pattern="M", mamba_num_heads=6, mamba_head_dim=8, n_groups=3,
                             ssm_state_size=10, chunk_size=16, layer_norm_epsilon=1e-5, use_conv_bias=True)
    mixer = NemotronHMamba2Mixer(config, layer_idx=0).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(mixer.named_parameters()):
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
    return mixer


@pytest.mark.parametrize("seq", [1, 13, 40])  # one token; within one 16-token HF chunk; across three
def test_mamba_scan_and_gated_norm_stand_ins_equal_transformers_torch_path(hf_mixer, seq):
    """What megatron-core's MambaMixer computes with the stand-ins (its in_proj, ``split_conv1d_scan``
    for mamba_ssm's fused kernel, ``GatedRMSNorm`` for its gated norm, its out_proj) equals transformers'
    chunked torch Mamba-2 on random inputs, groups shared by several heads."""
    from distconv.megatron.mamba import GatedRMSNorm, split_conv1d_scan

    m = hf_mixer
    x = torch.randn(2, seq, 32, generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        expected = m(x)
        y = split_conv1d_scan(m.in_proj(x), m.conv1d.weight.squeeze(1), m.conv1d.bias, m.dt_bias,
                              -torch.exp(m.A_log.float()), D=m.D, chunk_size=128, headdim=m.head_dim, ngroups=m.n_groups,
                              norm_before_gate=False)
        norm = GatedRMSNorm(m.intermediate_size, eps=1e-5, group_size=m.intermediate_size // m.n_groups,
                            norm_before_gate=False)
        norm.weight.copy_(m.norm.weight)
        ours = m.out_proj(norm(y))
    assert (ours - expected).abs().max().item() <= 1e-5


def test_gated_norm_gates_before_normalising_like_transformers(hf_mixer):
    """``GatedRMSNorm(x, z)`` (megatron-core's non-fused path) is transformers' ``norm(x, gate)``."""
    from distconv.megatron.mamba import GatedRMSNorm

    m, gen = hf_mixer, torch.Generator().manual_seed(1)
    x, z = torch.randn(3, m.intermediate_size, generator=gen), torch.randn(3, m.intermediate_size, generator=gen)
    norm = GatedRMSNorm(m.intermediate_size, eps=1e-5, group_size=m.intermediate_size // m.n_groups, norm_before_gate=False)
    with torch.no_grad():
        norm.weight.copy_(m.norm.weight)
        assert (norm(x, z) - m.norm(x, z)).abs().max().item() <= 1e-6


def test_the_stand_ins_undo_themselves():
    """The Triton module stands in only while megatron-core's mixer is first imported; the mamba_ssm
    and transformer-engine stand-ins only inside their context."""
    from distconv.megatron import mamba

    ops = mamba._TENSOR_OPS
    with mamba.imported():
        from megatron.core.ssm import mamba_block, mamba_mixer
    assert ops not in sys.modules or importlib.util.find_spec("triton") is not None
    places = [(mamba_mixer, "HAVE_MAMBA_SSM"), (mamba_mixer, "ExtendedRMSNorm"),
              (mamba_mixer, "mamba_split_conv1d_scan_combined"), (mamba_block, "TENorm")]
    state = lambda: [(n in vars(m), vars(m).get(n)) for m, n in places]  # noqa: E731
    before = state()
    with stand_ins(mamba.kernel_changes()):
        assert mamba_mixer.ExtendedRMSNorm is mamba.GatedRMSNorm or mamba_mixer.HAVE_MAMBA_SSM
    assert state() == before


# ---- the layout, by hand ---------------------------------------------------------------------------

def test_the_mamba_in_proj_is_split_per_component_over_tp():
    """megatron-core's TP rank r holds ``[z_r; x_r; B_r; C_r; dt_r]``; each component is a key of its own
    split on dim 0, so import and reshard write each one's r-th half. The naive split of HF's packed
    in_proj (its first half on rank 0) is a different tensor."""
    spec, target = _spec(), Target(tp=2, pp=2, te=True, per_layer=True)
    rows = dict(zip("z x B C dt".split(), _in_proj_rows(spec)))
    assert rows == {"z": 128, "x": 128, "B": 32, "C": 32, "dt": 8}
    packed = torch.arange(sum(rows.values()) * 2, dtype=torch.float32).reshape(-1, 2)
    parts = dict(zip(rows, packed.split(list(rows.values()))))
    rank0 = []
    for c, n in rows.items():
        shards = shards_of(f"decoder.layers.3.mixer.in_proj.weight.{c}", (n, 64), spec, target)
        assert [(s.key, s.offsets, s.sizes, s.target_rank) for s in shards] == [
            (f"decoder.layers.3.mixer.in_proj.weight.{c}", (0, 0), (n // 2, 64), 2),
            (f"decoder.layers.3.mixer.in_proj.weight.{c}", (n // 2, 0), (n // 2, 64), 3)]  # layer 3: stage 1
        rank0.append(parts[c][: n // 2])
    assert not torch.equal(torch.cat(rank0), packed.chunk(2)[0])


def test_hybrid_layers_hold_their_own_modules():
    """Each pattern symbol's layer saves its own modules: the fused input norm in Mamba and attention
    layers, the fused fc1 norm in MLP layers, a TENorm before an MoE layer's experts; the stack's
    final norm is ``decoder.final_norm``, and the output layer saves an extra state."""
    spec = _spec()
    keys = {e.key for e in extra_states(spec, Target(te=True, per_layer=True))}
    assert {"decoder.layers.0.mixer.in_proj._extra_state", "decoder.layers.1.self_attention.linear_qkv._extra_state",
            "decoder.layers.2.mlp.linear_fc1._extra_state", "decoder.layers.3.mixer.out_proj._extra_state",
            "decoder.layers.4.pre_mlp_layernorm._extra_state", "decoder.final_norm._extra_state",
            "output_layer._extra_state"} <= keys
    assert not any(k.startswith(("decoder.layers.0.mlp", "decoder.layers.1.mlp", "decoder.layers.2.self_attention",
                                 "decoder.final_layernorm")) for k in keys)


def test_a_pp_that_would_drop_layers_is_refused():
    """megatron-core's hybrid stack builds num_layers // PP layers a stage and drops the rest silently."""
    with pytest.raises(DistconvError, match="silently drop"):
        check_layout(_spec(), Target(pp=4))
    with pytest.raises(DistconvError, match="mamba_num_groups 2 is not divisible by TP 4"):
        check_layout(_spec(), Target(tp=4))


# ---- args ------------------------------------------------------------------------------------------

def test_the_args_read_and_write_back():
    spec = _spec()
    assert (spec.hybrid_pattern, spec.moe_layers, spec.activation, spec.position_embedding) == (
        "M*-ME-", (False, False, False, False, True, False), "relu2", "none")
    assert (spec.mamba_num_heads, spec.mamba_head_dim, spec.mamba_num_groups, spec.mamba_state_dim) == (8, 16, 2, 16)
    written = import_args(spec, Target(tp=2), divisible_by=64, tokenizer=None)
    assert written.hybrid_override_pattern == "M*-ME-" and written.is_hybrid_model and written.moe_layer_freq == 1
    assert spec_from_args(written).with_vocab(256) == spec


def test_megatron_lm_0_19_args_name_the_pattern_otherwise():
    """Megatron-LM 0.19: ``hybrid_layer_pattern``, ``num_layers`` derived from it (absent here)."""
    args = megatron_args(**{**NH, "hybrid_override_pattern": None, "hybrid_layer_pattern": "M*-ME-"})
    del args.num_layers
    assert spec_from_args(args).hybrid_pattern == "M*-ME-"


@pytest.mark.parametrize("changes,named", [
    (dict(hybrid_override_pattern="M*|-ME-"), "'|'"),  # 0.19's pipeline boundary
    (dict(hybrid_override_pattern=None, hybrid_attention_ratio=0.25), "hybrid_override_pattern"),
    (dict(hybrid_override_pattern="M*-ME"), "5 layers"),
])
def test_patterns_distconv_cannot_lay_out_are_refused(changes, named):
    with pytest.raises(DistconvError, match=named):
        spec_from_args(megatron_args(**{**NH, **changes}))


def test_inspect_names_the_megatron_model():
    from distconv.inspect import megatron_model

    assert megatron_model(megatron_args(**NH)).startswith("MambaModel")
    assert megatron_model(megatron_args()) == "GPTModel"


# ---- the family ------------------------------------------------------------------------------------

def test_the_hf_config_carries_the_pattern_both_ways():
    spec = _spec()
    assert pick_family(FAMILIES, spec) is NEMOTRON_H
    config = NEMOTRON_H.hf_config(spec)
    assert config.layers_block_type == ["linear_attention", "full_attention", "mlp", "linear_attention", "moe", "mlp"]
    assert (config.n_routed_experts, config.routed_scaling_factor, config.norm_topk_prob, config.n_groups,
            config.ssm_state_size, config.head_dim, config.mlp_hidden_act) == (4, 2.5, True, 2, 16, 16, "relu2")
    assert NEMOTRON_H.spec_from_hf_config(config, 256, torch.float32) == spec


@pytest.mark.parametrize("changes,named", [
    (dict(layernorm_epsilon=1e-6), "norm_epsilon"),  # the Mamba gated norm: 1e-5 in megatron-core, always
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False), "routing"),
    (dict(moe_shared_expert_intermediate_size=None), "routing"),
    (dict(position_embedding_type="rope"), "position_embedding"),
])
def test_what_nemotron_h_cannot_express_is_refused(changes, named):
    with pytest.raises(DistconvError, match=named):
        pick_family(FAMILIES, _spec(**changes))


@pytest.mark.parametrize("field,value", [("layer_norm_epsilon", 1e-6), ("moe_latent_size", 16), ("use_conv_bias", False)])
def test_an_hf_config_megatron_cannot_hold_is_refused_on_import(field, value):
    config = NEMOTRON_H.hf_config(_spec())
    setattr(config, field, value)
    with pytest.raises(DistconvError, match=field if field != "layer_norm_epsilon" else "norm_epsilon"):
        NEMOTRON_H.spec_from_hf_config(config, 256, torch.float32)


@pytest.mark.parametrize("arch", [f.architecture for f in FAMILIES if f is not NEMOTRON_H])
def test_other_families_refuse_a_hybrid_model(arch):
    with pytest.raises(DistconvError):
        pick_family(FAMILIES, _spec(), arch)


# ---- export of megatron-core's own save --------------------------------------------------------------

@pytest.mark.parametrize("how", [None, "mamba_z_x_swapped"])
def test_export_of_the_tp2_pp2_save_gives_megatron_cores_logits(built, tmp_path, how):
    """megatron-core's TP2 x PP2 save (each rank its slice of every Mamba component) exports in one
    process; transformers' logits equal megatron-core's own forward on the same tokens (fp32). With the
    Mamba in_proj's z and x swapped (the same shapes) the same check fails."""
    import distconv

    with wrong_mapping(how):
        distconv.export(load=str(built / "nemotron_h" / "tp2pp2"), save=str(tmp_path / "hf"), quiet=True)
    ref = torch.load(built / "refs" / "nemotron_h.pt")
    logits = hf_logits(tmp_path / "hf", ref["tokens"])
    diff = (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item()
    print(f"Nemotron-H export ({how or 'right table'}): max |logit difference| = {diff:.3e}")
    assert diff <= TOL if how is None else diff > 100 * TOL
    if how is None:
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert config["architectures"] == ["NemotronHForCausalLM"]
        assert config["layers_block_type"] == ["linear_attention", "full_attention", "mlp", "linear_attention", "moe", "mlp"]
