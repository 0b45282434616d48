"""DeepSeek-V3.2 and GLM-5 (the DSA indexer), pure parts (one CPU process): the indexer's row order
written out by hand, the gamma fold's exactness, the CPU Hadamard against transformers' torch path,
the configs both ways and what is refused. The end-to-end proofs (logits at TP2/PP2/EP2, GLM-5, MTP,
round trips, FP8, reshard, verify, the wrong mapping) are in test_moe and test_import."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from transformers import GlmMoeDsaConfig

from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.families.dsa import DEEPSEEK_V32, GLM_MOE_DSA, IndexerQuery, rope_order
from distconv.megatron.args import megatron_args, spec_from_args
from distconv.megatron.catalogue import Target, shards_of
from distconv.megatron.dsa import hadamard, kernel_changes
from distconv.megatron.model import stand_ins

from fixtures.build import FIXTURES
from fixtures.megatron_cpu import megatron_args as small_args

ARGS = FIXTURES["deepseek_v32"].args


def _spec(**changes):
    return spec_from_args(small_args(**{**ARGS, **changes})).with_vocab(256)


def test_rope_order_written_by_hand():
    """Head dim 16, rope 8: megatron-core's head is ``[no-rope 0..7, rope 8..15]`` rotating pairs
    (8, 9), (10, 11), ...; DeepSeek-V3.2's is ``[rope (pairs i, i + 4), no-rope]``, GLM-5's
    ``[rope (pairs 2i, 2i + 1), no-rope]``."""
    spec = _spec()
    assert rope_order(spec, half_split=True).tolist() == [8, 10, 12, 14, 9, 11, 13, 15, 0, 1, 2, 3, 4, 5, 6, 7]
    assert rope_order(spec, half_split=False).tolist() == [8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7]


def test_gamma_fold_round_trips_bf16_through_float32_exactly():
    """HF bf16 ``wq_b`` and ``q_a_layernorm`` -> Megatron float32 (rows permuted, ``wq_b * gamma``) -> HF:
    every bit back (a product of two bf16 values is exact in float32); the export divides by gamma."""
    spec = _spec()
    gen = torch.Generator().manual_seed(3)
    heads, dim, rank = spec.dsa_indexer_n_heads, spec.dsa_indexer_head_dim, spec.q_lora_rank
    wq_b = (0.05 * torch.randn(heads * dim, rank, generator=gen)).bfloat16()
    gamma = (1 + 0.3 * torch.randn(rank, generator=gen)).bfloat16()
    for half_split in (True, False):
        t = IndexerQuery(half_split)
        meg, meg_gamma = t.import_((wq_b, gamma), spec)
        assert meg.dtype == torch.float32 and torch.equal(meg_gamma, gamma)
        order = rope_order(spec, half_split)
        per_head = meg.reshape(heads, dim, rank)[:, order].reshape(heads * dim, rank)
        assert torch.equal(per_head, wq_b.float() * gamma.float())  # megatron's query weight: the fold undone
        back, back_gamma = t.export((meg, gamma.float()), spec)
        assert torch.equal(back.bfloat16(), wq_b) and torch.equal(back_gamma.bfloat16(), gamma)


def test_cpu_hadamard_scores_as_transformers_does_without_it():
    """megatron-core's own index scores (``DSAIndexer._compute_index_scores``) of q and k rotated by the CPU
    Hadamard equal those of q and k unrotated, which is what transformers computes (it leaves the
    orthogonal rotation out); the rotation is the Sylvester matrix over sqrt(n)."""
    from megatron.core.transformer.experimental_attention_variant import dsa

    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(6, 1, 2, 16, generator=gen), torch.randn(6, 1, 16, generator=gen)
    weights = torch.rand(6, 1, 2, generator=gen)
    scores = dsa.DSAIndexer._compute_index_scores  # uses nothing of its instance
    rotated = scores(None, hadamard(q), weights, hadamard(k))
    assert (rotated - scores(None, q, weights, k)).abs().max().item() <= 1e-5
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert torch.allclose(hadamard(torch.eye(4)), torch.kron(h2, h2) / 2)
    with pytest.raises(ValueError, match="not a power of 2"):
        hadamard(torch.ones(12))


def test_the_hadamard_stand_in_is_undone():
    """``rotate_activation`` is replaced only while a DSA model runs (``forward_logits``), then restored."""
    from megatron.core.transformer.experimental_attention_variant import dsa

    before = dsa.rotate_activation
    with stand_ins(kernel_changes()):
        assert dsa.rotate_activation is not before
        assert torch.equal(dsa.rotate_activation(torch.eye(4)), hadamard(torch.eye(4)))  # CPU, float32: the stand-in
    assert dsa.rotate_activation is before


@pytest.mark.parametrize("family", [DEEPSEEK_V32, GLM_MOE_DSA])
def test_config_both_ways(family):
    """args -> spec -> HF config -> spec -> Megatron-LM args -> the same spec; the indexer's sizes
    and top-k, the MTP layer and the experts carry over, DeepSeek-V3.2 is what the args infer."""
    spec = _spec()
    assert pick_family(FAMILIES, spec) is DEEPSEEK_V32
    config = family.hf_config(spec)
    assert (config.index_n_heads, config.index_head_dim, config.index_topk) == (2, 16, 4)
    assert config.num_nextn_predict_layers == 1 and config.n_routed_experts == 8
    again = family.spec_from_hf_config(config, spec.padded_vocab_size, torch.float32)
    assert again.with_vocab(256) == _spec()  # (transformers adds rope_theta to the rope dict it is given)
    args = megatron_args(again, Target(2, 1, 2, 1), divisible_by=64, tokenizer=None)
    assert (args.experimental_attention_variant, args.dsa_indexer_n_heads, args.dsa_indexer_head_dim,
            args.dsa_indexer_topk) == ("dsa", 2, 16, 4)
    assert spec_from_args(args).with_vocab(256) == _spec()


def test_glm5_shared_indexer_layers_are_refused():
    """GLM-5's "shared" layers (``index_topk_freq``) hold no indexer: megatron-core 0.16 has no form for them."""
    config = GLM_MOE_DSA.hf_config(_spec())
    shared = GlmMoeDsaConfig(**{**config.to_dict(), "indexer_types": None}, index_topk_freq=2, index_skip_topk_offset=0)
    assert shared.indexer_types == ["shared", "full"]
    shared.architectures = ["GlmMoeDsaForCausalLM"]
    with pytest.raises(DistconvError, match=r"indexer_types marks layers \[0\] as 'shared'"):
        GLM_MOE_DSA.spec_from_hf_config(shared, 256, torch.float32)


def test_megatron_core_0_19_dsa_checkpoints_are_refused():
    """0.19 changed the indexer's RoPE and query (its args carry the new fields): refused, saying why."""
    args = argparse.Namespace(**{**vars(small_args(**ARGS)), "dsa_indexer_rope_interleaved": False,
                                 "dsa_indexer_rotate_activation": True})
    with pytest.raises(DistconvError, match="megatron-core 0.19 or later .* dsa_indexer_rope_interleaved"):
        spec_from_args(args)


def test_indexer_tensors_are_replicated_and_deepseek_v3_refuses_them():
    """Every indexer tensor is one chunk at TP2 (TELinear ``duplicated``, the LayerNorm); DeepSeek-V3's
    table cannot express a DSA model (it would drop the indexer)."""
    spec = _spec()
    for name, shape in (("linear_wq_b.weight", (32, 24)), ("linear_wk.weight", (16, 64)), ("k_norm.bias", (16,)),
                        ("linear_weights_proj.weight", (2, 64))):
        shards = shards_of(f"decoder.layers.1.self_attention.core_attention.indexer.{name}", shape, spec, Target(2, 1, 2))
        assert len(shards) == 1 and shards[0].sizes == shape
    v3 = next(f for f in FAMILIES if f.architecture == "DeepseekV3ForCausalLM")
    assert "experimental_attention_variant='dsa'" in v3.unsupported(spec)
    assert DEEPSEEK_V32.unsupported(dataclasses.replace(spec, experimental_attention_variant=None))


def test_fp8_export_quantizes_wq_b_only():
    """As vLLM builds the indexer: ``wq_b`` with the model's quantization, ``wk``, ``weights_proj``,
    ``k_norm`` and the latent norm in high precision."""
    spec = _spec()
    at = "decoder.layers.0.self_attention."
    named = [(at + "core_attention.indexer.linear_wq_b.weight", torch.randn(32, 24)),
             (at + "linear_q_up_proj.layer_norm_weight", 1 + torch.rand(24)),
             (at + "core_attention.indexer.linear_wk.weight", torch.randn(16, 64)),
             (at + "core_attention.indexer.linear_weights_proj.weight", torch.randn(2, 64))]
    out = {hf: t for hf, t, _ in DEEPSEEK_V32.export_tensors(named, spec, fp8_rest=torch.bfloat16)}
    h = "model.layers.0.self_attn."
    assert out[h + "indexer.wq_b.weight"].dtype == torch.float8_e4m3fn and h + "indexer.wq_b.weight_scale_inv" in out
    assert all(out[h + n].dtype == torch.bfloat16 for n in ("q_a_layernorm.weight", "indexer.wk.weight",
                                                            "indexer.weights_proj.weight"))
    assert not any(n.endswith("_scale_inv") for n in out if "wq_b" not in n)


def test_inspect_names_the_family_the_indexer_and_its_args(built):
    """``distconv inspect`` of megatron-core's own DSA save: DeepSeek-V3.2, the indexer's args and tensors."""
    from distconv.inspect import inspect_checkpoint

    report = inspect_checkpoint(built / "deepseek_v32" / "tp1pp1")
    assert report["hf_family"] == "DeepseekV32ForCausalLM"
    assert {k: report["args"][k] for k in ("experimental_attention_variant", "dsa_indexer_n_heads", "dsa_indexer_head_dim",
                                           "dsa_indexer_topk")} == {"experimental_attention_variant": "dsa",
                                                                   "dsa_indexer_n_heads": 2, "dsa_indexer_head_dim": 16,
                                                                   "dsa_indexer_topk": 4}
    indexer = {t["name"]: t["shape"] for t in report["tensors"] if ".indexer." in t["name"]}
    assert indexer["decoder.layers.1.self_attention.core_attention.indexer.linear_wq_b.weight"] == [32, 24]
    assert indexer["mtp.layers.0.transformer_layer.self_attention.core_attention.indexer.k_norm.bias"] == [16]
