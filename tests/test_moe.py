"""Mixture-of-experts and MLA export: real megatron-core checkpoints saved with expert parallelism.

Each MoE fixture (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 with multi-latent attention, GLM-4.5
with partial RoPE; the last two with MTP layers) is saved at EP2, PP2xEP2 and TP2xEP2 (some at a subset) (expert TP 2; Mixtral also with expert TP 1),
exported at the training world size (4) and at another (2), and transformers' logits must equal
megatron-core's own forward pass on the same tokens; MTP layers' logits must equal the published
MTP formula on the exported tensors (``mtp_reference``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distconv.directions.export import make_plan
from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.megatron.args import spec_from_args
from distconv.megatron.catalogue import items_of
from distconv.megatron.checkpoint import Chunk, TensorInfo
from distconv.megatron.source import describe

from conftest import distconv_cli, hf_logits, hf_tensors, run_export_jobs
from fixtures.build import FIXTURES, VLLM_FIXTURES, layout_dir, parallel
from fixtures.megatron_cpu import megatron_args
from kimi import KIMI_ROPE, KIMI_SCALING, kimi_config_of_args, transformers_copy, write_release
from mtp_reference import hf_mtp_logits, qwen3_next_mtp_logits

TOL = 1e-4
TRAINING_WORLD, OTHER_WORLD = 4, 2
MOE = [name for name, fx in FIXTURES.items() if fx.args.get("num_experts")]
# the TP1PP1 save is the reference the others are re-sharded from; the cases are the EP layouts
CASES = [(name, layout_dir(Path(), name, *parallel(l)).name) for name in MOE for l in FIXTURES[name].layouts if len(l) > 2]
ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
        "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v3_q_proj": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
        "glm4_moe_plain": "Glm4MoeForCausalLM", "qwen3_next": "Qwen3NextForCausalLM", "gpt_oss": "GptOssForCausalLM",
        "gpt_oss_square": "GptOssForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
        "qwen3_next_mtp": "Qwen3NextForCausalLM"}
KEY_FORMS = FIXTURES["mixtral"].expert_key_forms
KIMI = VLLM_FIXTURES["vllm_kimi_k2"]
WINDOW = 40_000  # bytes: two Mixtral experts' fc1 (16 KiB each) fit, a whole layer does not


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory) -> dict[tuple, dict]:
    """Every MoE case at two world sizes, plus extra jobs, in one torchrun launch per world size."""
    out = tmp_path_factory.mktemp("moe")
    done: dict[tuple, dict] = {}
    for world in (TRAINING_WORLD, OTHER_WORLD):
        jobs = {(name, layout, world): {"load": str(built / name / layout), "save": str(out / f"{name}_{layout}_w{world}")}
                for name, layout in CASES}
        if world == OTHER_WORLD:
            for form in KEY_FORMS:
                jobs[("mixtral", f"{form}_keys", world)] = {
                    "load": str(built / "mixtral" / f"{form}_keys"), "save": str(out / f"mixtral_{form}")}
            jobs[("mixtral", "tp1pp2ep2", world, "window")] = {
                "load": str(built / "mixtral" / "tp1pp2ep2"), "save": str(out / "mixtral_window"), "window": WINDOW}
            hub = json.loads((done[("deepseek_v3", "tp1pp1ep2", TRAINING_WORLD)]["save"] / "config.json").read_text())
            hub_config = out / "deepseek_hub.json"  # as the hub writes it: one MTP layer, old field names
            hub_config.write_text(json.dumps({**hub, "num_nextn_predict_layers": 1}))
            jobs[("deepseek_v3", "tp1pp2ep2", world, "hf_config")] = {
                "load": str(built / "deepseek_v3" / "tp1pp2ep2"), "save": str(out / "ds_hf_config"), "hf_config": str(hub_config)}
            glm = json.loads((done[("glm4_moe", "tp1pp2ep2", TRAINING_WORLD)]["save"] / "config.json").read_text())
            del glm["rope_parameters"]  # as the hub writes it: RoPE fields at the top
            for kind, changes in (("hf_config", {"partial_rotary_factor": 0.5}), ("conflict", {"partial_rotary_factor": 1.0}),
                                  ("mtp_conflict", {"partial_rotary_factor": 0.5, "num_nextn_predict_layers": 1})):
                path = out / f"glm_{kind}.json"
                path.write_text(json.dumps({**glm, **changes}))
                jobs[("glm4_moe", "tp2pp1ep2", world, kind)] = {
                    "load": str(built / "glm4_moe" / "tp2pp1ep2"), "save": str(out / f"glm_{kind}"), "hf_config": str(path)}
            qwen3_5 = out / "qwen3_5_moe.json"  # the same megatron-core model as Qwen3.5's text MoE model
            qwen3_5.write_text(_qwen3_5_config().to_json_string())
            for layout in ("tp2pp1ep2", "tp1pp2ep2"):
                jobs[("qwen3_next", layout, world, "qwen3_5")] = {
                    "load": str(built / "qwen3_next" / layout), "save": str(out / f"qwen3_5_{layout}"), "hf_config": str(qwen3_5)}
            qwen3_5_mtp = out / "qwen3_5_moe_mtp.json"  # and with the MTP layer
            qwen3_5_mtp.write_text(_qwen3_5_config("qwen3_next_mtp").to_json_string())
            jobs[("qwen3_next_mtp", "tp1pp2ep2", world, "qwen3_5")] = {
                "load": str(built / "qwen3_next_mtp" / "tp1pp2ep2"), "save": str(out / "qwen3_5_mtp"), "hf_config": str(qwen3_5_mtp)}
            jobs[("gpt_oss", "tp2pp1ep2etp1", world, "mxfp4")] = {
                "load": str(built / "gpt_oss" / "tp2pp1ep2etp1"), "save": str(out / "gpt_oss_mxfp4"), "dtype": "mxfp4"}
            for name, layout, wrong_name in (("gpt_oss_square", "tp1pp1ep2", "down_not_transposed"),
                                             ("gpt_oss", "tp1pp1", "down_not_transposed"),
                                             ("gpt_oss", "tp1pp2ep2", "gate_up_concatenated")):
                jobs[(name, layout, world, wrong_name)] = {"load": str(built / name / layout), "wrong_mapping": wrong_name,
                                                           "save": str(out / f"{name}_{wrong_name}")}
            glm5 = out / "glm5.json"  # the same megatron-core model as GLM-5 (--hf-config)
            glm5.write_text(json.dumps(_glm5_config(done[("deepseek_v32", "tp2pp2ep2etp1", TRAINING_WORLD)]["save"])))
            jobs[("deepseek_v32", "tp2pp2ep2etp1", world, "glm5")] = {
                "load": str(built / "deepseek_v32" / "tp2pp2ep2etp1"), "save": str(out / "glm5"), "hf_config": str(glm5)}
            jobs[("deepseek_v32", "tp2pp2ep2etp1", world, "indexer_copied")] = {
                "load": str(built / "deepseek_v32" / "tp2pp2ep2etp1"), "wrong_mapping": "indexer_copied",
                "save": str(out / "deepseek_v32_indexer_copied")}
            # Kimi-K2: its hub config (kimi_k2, auto_map, FP8, yarn with beta 1/1) names the export, from
            # megatron-core's TP1PP1 and EP2 saves; and with the expert bias zeroed both ways (wrong_mapping)
            kimi_hub = write_release(out / "kimi_hub", kimi_config_of_args(megatron_args(**KIMI.args), 256))
            for layout, wrong_name in (("tp1pp1", None), ("tp1pp1ep2", None), ("tp1pp1ep2", "expert_bias_zeroed")):
                jobs[("vllm_kimi_k2", layout, world, wrong_name or "kimi")] = {
                    "load": str(built / "vllm_kimi_k2" / layout), "save": str(out / f"kimi_{layout}_{wrong_name}"),
                    "hf_config": str(kimi_hub), **({"wrong_mapping": wrong_name} if wrong_name else {})}
            wrong = out / "mixtral_top1.json"
            wrong.write_text(json.dumps(_mixtral_config(num_experts_per_tok=1)))
            jobs[("mixtral", "tp1pp1ep2", world, "conflict")] = {
                "load": str(built / "mixtral" / "tp1pp1ep2"), "save": str(out / "mixtral_conflict"), "hf_config": str(wrong)}
        results = run_export_jobs(world, list(jobs.values()), out / f"w{world}")
        for key, job, result in zip(jobs, jobs.values(), results):
            done[key] = {**result, "save": Path(job["save"])}
    return done


def _mixtral_config(**override) -> dict:
    a = {**megatron_args().__dict__, **FIXTURES["mixtral"].args}
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": a["padded_vocab_size"],
        "hidden_size": a["hidden_size"], "intermediate_size": a["moe_ffn_hidden_size"],
        "num_hidden_layers": a["num_layers"], "num_attention_heads": a["num_attention_heads"],
        "num_key_value_heads": a["num_query_groups"], "num_local_experts": a["num_experts"],
        "num_experts_per_tok": a["moe_router_topk"], "rms_norm_eps": a["layernorm_epsilon"],
    }
    return {**config, **override}


def _glm5_config(dsv32: Path) -> dict:
    """GLM-5's config of the model DeepSeek-V3.2's export describes: its fields, no DeepSeek routing keys."""
    config = json.loads((dsv32 / "config.json").read_text())
    for key in ("topk_method", "scoring_func", "moe_layer_freq"):
        del config[key]
    return {**config, "architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
            "indexer_types": ["full"] * config["num_hidden_layers"]}


def _qwen3_5_config(fixture: str = "qwen3_next"):
    from distconv.families.qwen3_next import QWEN3_5_MOE

    return QWEN3_5_MOE.hf_config(spec_from_args(megatron_args(**FIXTURES[fixture].args)).with_vocab(256))


def _logits_diff(built: Path, name: str, folder: Path, zero: str | None = None, **config_override) -> float:
    """Max |HF - megatron-core| logits; optionally with config fields changed or one HF tensor zeroed."""
    ref = torch.load(built / "refs" / f"{name}.pt")
    if config_override or zero:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        for k, v in config_override.items():
            setattr(config, k, v)
        model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, dtype=torch.float32, trust_remote_code=False).eval()
        with torch.no_grad():
            if zero:
                model.get_parameter_or_buffer(zero).zero_()
            logits = model(ref["tokens"]).logits
    else:
        logits = hf_logits(folder, ref["tokens"])
    return (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item()


@pytest.mark.parametrize("world", [TRAINING_WORLD, OTHER_WORLD], ids=["training-world", "other-world"])
@pytest.mark.parametrize("name,layout", CASES, ids=[f"{n}-{l}" for n, l in CASES])
def test_logits_match_megatron(exported, built, name, layout, world):
    result = exported[(name, layout, world)]
    assert result["ok"], result.get("error")
    assert result["report"]["architecture"] == ARCH[name]  # inferred from args, no --hf-config
    assert _logits_diff(built, name, result["save"]) <= TOL


@pytest.mark.parametrize("form", KEY_FORMS)
def test_per_expert_key_spellings_load(exported, built, form):
    result = exported[("mixtral", f"{form}_keys", OTHER_WORLD)]
    assert result["ok"], result.get("error")
    assert _logits_diff(built, "mixtral", result["save"]) <= TOL


def test_router_semantics_decide_the_logits(exported, built):
    """The exported norm_topk_prob is the one that reproduces megatron-core; the other does not."""
    qwen2 = exported[("qwen2_moe", "tp2pp1ep2", TRAINING_WORLD)]["save"]  # trained with pre-softmax
    qwen3 = exported[("qwen3_moe", "tp2pp1ep2", TRAINING_WORLD)]["save"]  # top-k, then softmax
    assert json.loads((qwen2 / "config.json").read_text())["norm_topk_prob"] is False
    assert json.loads((qwen3 / "config.json").read_text())["norm_topk_prob"] is True
    assert _logits_diff(built, "qwen2_moe", qwen2, norm_topk_prob=True) > 100 * TOL
    assert _logits_diff(built, "qwen3_moe", qwen3, norm_topk_prob=False) > 100 * TOL


@pytest.mark.parametrize("change", [
    dict(routed_scaling_factor=1.0), dict(norm_topk_prob=False), dict(n_group=1, topk_group=1),
    dict(rope_interleave=False), dict(zero="model.layers.1.mlp.gate.e_score_correction_bias"),
], ids=["scaling", "norm-topk", "groups", "rope-interleave", "expert-bias"])
def test_deepseek_routing_and_rope_decide_the_logits(exported, built, change):
    """Each DeepSeek-V3 router and rope setting the export writes is needed to match megatron-core."""
    folder = exported[("deepseek_v3", "tp1pp2ep2", TRAINING_WORLD)]["save"]
    assert _logits_diff(built, "deepseek_v3", folder, **change) > 100 * TOL


@pytest.mark.parametrize("change", [
    dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 1.0}),
    dict(routed_scaling_factor=1.0), dict(n_group=1, topk_group=1),
    dict(zero="model.layers.1.mlp.gate.e_score_correction_bias"), dict(zero="model.layers.0.self_attn.k_proj.bias"),
], ids=["partial-rotary", "scaling", "groups", "expert-bias", "k-bias"])
def test_glm_rope_and_routing_decide_the_logits(exported, built, change):
    """GLM-4.5's partial RoPE, router settings and biases are each needed to match megatron-core."""
    folder = exported[("glm4_moe", "tp2pp1ep2", TRAINING_WORLD)]["save"]
    assert _logits_diff(built, "glm4_moe", folder, **change) > 100 * TOL


def test_glm_plain_config_writes_full_rotary_and_no_renormalisation(exported, built):
    """Without q/k norm or biases, all layers MoE, ungrouped top-1: the export writes the whole head
    rotated (transformers' default, half, does not match) and no top-k renormalisation."""
    folder = exported[("glm4_moe_plain", "tp1pp1ep2", OTHER_WORLD)]["save"]
    glm = json.loads((folder / "config.json").read_text())
    assert (glm["attention_bias"], glm["use_qk_norm"], glm["first_k_dense_replace"], glm["n_group"]) == (False, False, 0, 1)
    assert (glm["norm_topk_prob"], glm["routed_scaling_factor"], glm["n_shared_experts"]) == (False, 1.0, 2)
    assert glm["rope_parameters"]["partial_rotary_factor"] == 1.0
    half = {**glm["rope_parameters"], "partial_rotary_factor": 0.5}
    assert _logits_diff(built, "glm4_moe_plain", folder, rope_parameters=half) > 100 * TOL
    assert _logits_diff(built, "glm4_moe_plain", folder, norm_topk_prob=True) > 100 * TOL


def test_glm_hub_config_is_accepted_and_a_conflicting_rotary_factor_refused(exported, built):
    """A hub-style config (top-level partial_rotary_factor) is accepted; a partial_rotary_factor or
    a number of MTP layers other than the checkpoint's is not (the MTP layers are in the weights)."""
    ok, conflict, mtp = (exported[("glm4_moe", "tp2pp1ep2", OTHER_WORLD, kind)]
                         for kind in ("hf_config", "conflict", "mtp_conflict"))
    assert ok["ok"], ok.get("error")
    assert _logits_diff(built, "glm4_moe", ok["save"]) <= TOL
    assert not conflict["ok"] and "partial_rotary_factor" in conflict["error"]
    assert not mtp["ok"] and "num_mtp_layers: HF config 1, checkpoint 2" in mtp["error"]
    assert not conflict["save"].exists() and not mtp["save"].exists()


def test_hf_configs_carry_the_moe_layout(exported):
    config = lambda name: json.loads((exported[(name, "tp1pp2ep2", OTHER_WORLD)]["save"] / "config.json").read_text())  # noqa: E731
    mixtral, qwen2, qwen3 = config("mixtral"), config("qwen2_moe"), config("qwen3_moe")
    assert (mixtral["num_local_experts"], mixtral["num_experts_per_tok"], mixtral["intermediate_size"]) == (4, 2, 32)
    assert qwen2["mlp_only_layers"] == [0] and qwen2["intermediate_size"] == 128  # dense first layer
    assert (qwen2["shared_expert_intermediate_size"], qwen2["qkv_bias"]) == (48, True)
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (an attribute alias)
    assert (qwen3["num_local_experts"], qwen3["num_experts_per_tok"], qwen3["head_dim"]) == (8, 3, 32)
    ds = config("deepseek_v3")
    assert (ds["first_k_dense_replace"], ds["n_shared_experts"], ds["n_group"], ds["topk_group"]) == (1, 2, 2, 1)
    assert (ds["routed_scaling_factor"], ds["norm_topk_prob"], ds["q_lora_rank"], ds["qk_nope_head_dim"]) == (2.5, True, 24, 16)
    assert ds["rope_parameters"]["rope_type"] == "yarn" and ds["rope_parameters"]["mscale_all_dim"] == 1.0
    glm = config("glm4_moe")
    assert (glm["first_k_dense_replace"], glm["n_shared_experts"], glm["n_group"], glm["topk_group"]) == (1, 1, 2, 1)
    assert (glm["attention_bias"], glm["use_qk_norm"], glm["head_dim"], glm["num_nextn_predict_layers"]) == (True, True, 32, 2)
    assert ds["num_nextn_predict_layers"] == 1
    assert glm["rope_parameters"]["partial_rotary_factor"] == 0.5 and glm["routed_scaling_factor"] == 2.5


def test_windowed_export_splits_layers_into_expert_units(exported, built):
    result = exported[("mixtral", "tp1pp2ep2", OTHER_WORLD, "window")]
    assert result["ok"], result.get("error")
    assert _logits_diff(built, "mixtral", result["save"]) <= TOL
    ckpt, plan = _plan(built / "mixtral" / "tp1pp2ep2", 2, window=WINDOW)
    layer0 = [u for u in plan.units if {i.layer for i in u.parts} == {0}]
    assert len(layer0) > 2  # one layer's experts span several units
    for unit in plan.units:
        assert sum(torch.Size(i.shape).numel() * 4 for i in unit.parts) <= WINDOW or len(unit.parts) == 1


def test_deepseek_hub_config_is_accepted(exported, built):
    result = exported[("deepseek_v3", "tp1pp2ep2", OTHER_WORLD, "hf_config")]
    assert result["ok"], result.get("error")
    assert _logits_diff(built, "deepseek_v3", result["save"]) <= TOL


def test_conflicting_hf_config_is_refused(exported):
    result = exported[("mixtral", "tp1pp1ep2", OTHER_WORLD, "conflict")]
    assert not result["ok"] and "num_experts_per_tok" in result["error"]
    assert not result["save"].exists()


def _plan(root: Path, world: int, window: int = 1 << 30, cut_at_holders: bool = False):
    ckpt = describe(root)
    spec = spec_from_args(ckpt.args).with_vocab(256)
    return ckpt, make_plan(ckpt, spec, pick_family(FAMILIES, spec, None), torch.float32, world, max_shard_size=5 * 10**9,
                           window=window, cut_at_holders=cut_at_holders)


@pytest.mark.parametrize("layout", ["tp1pp1ep2", "tp2pp1ep2", "tp2pp1ep2etp1"])
def test_each_rank_reads_only_the_experts_it_saved(built, layout):
    """At the training world size expert slices are read where they were written: by EP rank."""
    ckpt, plan = _plan(built / "mixtral" / layout, TRAINING_WORLD)
    assert sum(plan.bytes_read_by(r) for r in range(TRAINING_WORLD)) == ckpt.weight_bytes
    experts_of: dict[int, set[int]] = {}
    for unit in plan.units:
        for read in unit.reads:
            m = re.search(r"\.mlp\.experts\.(\d+)\.", unit.parts[read.part].name)
            if m:
                experts_of.setdefault(read.rank, set()).add(int(m[1]))
                chunk = next(c for c in ckpt.tensors[read.key].chunks if all(
                    o <= ro and ro + rs <= o + s for o, s, ro, rs in zip(c.offsets, c.sizes, read.offsets, read.sizes)))
                assert read.rank == chunk.writer
    # EP2 over 4 experts: an EP rank owns experts {0, 1} or {2, 3}; both halves are read, by different ranks
    assert sorted(map(sorted, experts_of.values())) == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.parametrize("layout", ["tp1pp1ep2", "tp2pp1ep2etp1"])
def test_units_cut_at_holders_are_each_ep_ranks_own_experts(built, layout):
    """``cut_at_holders`` (``distconv.weights(senders="holders")``), on 2 ranks as in an EP2 job: a
    unit of experts is read by one rank alone, the EP rank holding them (so it maps them with
    nothing gathered), where the plain plan reads a layer's experts from both ranks into one unit;
    the outputs stay the same."""
    root = built / "mixtral" / layout
    _, plain = _plan(root, OTHER_WORLD)
    _, cut = _plan(root, OTHER_WORLD, cut_at_holders=True)
    assert [(o.name, o.shape) for o in cut.outputs] == [(o.name, o.shape) for o in plain.outputs]

    def experts(unit) -> set[int]:
        return {int(m[1]) for p in unit.parts if (m := re.search(r"\.mlp\.experts\.(\d+)\.", p.name))}

    assert any(experts(u) == {0, 1, 2, 3} and len({r.rank for r in u.reads}) == 2 for u in plain.units)
    ranks_of: dict[frozenset[int], set[int]] = {}
    for unit in cut.units:
        if experts(unit):
            ranks_of.setdefault(frozenset(experts(unit)), set()).update(r.rank for r in unit.reads)
    # EP2 over 4 experts: {0, 1} on rank 0, {2, 3} on rank 1
    assert ranks_of == {frozenset({0, 1}): {0}, frozenset({2, 3}): {1}}


@pytest.mark.parametrize("layout, ranks", [("tp1pp1ep2", 2), ("tp2pp1ep2", 4), ("tp2pp1ep2etp1", 2), ("tp1pp2ep2", 4)])
def test_layout_counts_the_fewest_ranks_of_the_training_layout(built, layout, ranks):
    """``distconv layout`` (the launchers' process count): PP x lcm(TP, EP x expert TP); TP2 x EP2
    with expert TP 1 trains on 2 ranks, with expert TP 2 on 4."""
    from distconv.megatron.source import model_parallel_size

    assert model_parallel_size(built / "mixtral" / layout) == ranks


def test_expert_items_from_every_key_spelling():
    def info(key, shape):
        return TensorInfo(key, shape, torch.float32, (Chunk((0,) * len(shape), shape, "__0_0.distcp", 0),))

    grouped = items_of(info("decoder.layers.mlp.experts.experts.linear_fc1.weight", (2, 3, 8, 4)), 2, 3)
    assert [(i.name, i.index, i.shape) for i in grouped[:2]] == [
        ("decoder.layers.0.mlp.experts.0.linear_fc1.weight", (0, 0), (8, 4)),
        ("decoder.layers.0.mlp.experts.1.linear_fc1.weight", (0, 1), (8, 4)),
    ]
    per_layer = items_of(info("decoder.layers.5.mlp.experts.experts.linear_fc2.weight", (3, 4, 8)), 6, 3)
    assert [(i.name, i.index, i.layer) for i in per_layer][-1] == ("decoder.layers.5.mlp.experts.2.linear_fc2.weight", (2,), 5)
    for key in ("decoder.layers.mlp.experts.local_experts.2.linear_fc2.weight", "decoder.layers.mlp.experts.linear_fc2.weight2",
                "decoder.layers.mlp.experts.experts.2.linear_fc2.weight"):
        items = items_of(info(key, (6, 3, 8)), 6, 3)  # 3 rows: as many as experts, yet not an expert axis
        assert [(i.name, i.index) for i in items][1] == ("decoder.layers.1.mlp.experts.2.linear_fc2.weight", (1,))
    router = items_of(info("decoder.layers.mlp.router.weight", (2, 3, 4)), 2, 3)
    assert [i.shape for i in router] == [(3, 4), (3, 4)]  # the router's expert axis is not split


DS = FIXTURES["deepseek_v3"].args
GLM = FIXTURES["glm4_moe"].args


def _spec(**args):
    return spec_from_args(megatron_args(**{**FIXTURES["mixtral"].args, **args})).with_vocab(256)


@pytest.mark.parametrize("args,arch", [
    (dict(), "MixtralForCausalLM"),
    (dict(moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True), "Qwen2MoeForCausalLM"),
    (dict(qk_layernorm=True), "Qwen3MoeForCausalLM"),
    (dict(num_experts=None), "LlamaForCausalLM"),
    (FIXTURES["deepseek_v3"].args, "DeepseekV3ForCausalLM"),
    (GLM, "Glm4MoeForCausalLM"),
])
def test_family_inferred_from_args(args, arch):
    assert pick_family(FAMILIES, _spec(**args), None).architecture == arch


@pytest.mark.parametrize("args,named", [
    (dict(moe_router_pre_softmax=True), "moe_pre_softmax"),  # Mixtral always renormalises the top k
    (dict(moe_router_topk_scaling_factor=2.5), "moe_scaling_factor"),
    (dict(moe_router_score_function="sigmoid"), "moe_expert_bias"),  # sigmoid: GLM-4.5's router, always biased
    (dict(moe_expert_capacity_factor=1.0), "moe_capacity_factor"),
    (dict(moe_layer_freq=[0, 1]), "moe_layers"),  # Mixtral has no dense layers
    (dict(moe_shared_expert_intermediate_size=64), "moe_shared_gate"),  # Qwen2-MoE's shared expert is gated
    (dict(DS, moe_router_enable_expert_bias=False), "moe_expert_bias"),  # HF always adds its correction bias
    (dict(DS, moe_router_score_function="softmax"), "moe_score_function"),
    (dict(DS, moe_router_topk=6, moe_router_group_topk=2, num_experts=12, moe_router_num_groups=4), "moe_group_score_topk"),
    (dict(DS, moe_shared_expert_intermediate_size=24), "moe_shared_experts"),  # not a whole number of experts
    (dict(DS, moe_layer_freq=[1, 0]), "moe_layers"),  # HF: dense layers only first
    (dict(mtp_num_layers=1), "mtp_num_layers"),  # Mixtral has no MTP layers
    (dict(DS, untie_embeddings_and_output_weights=False), "mtp_conflict='MTP layers with tied embeddings'"),
    (dict(GLM, moe_layer_freq=[1, 1, 1, 0]), "mtp_conflict='MTP layers without experts'"),  # built like the last layer
    (dict(GLM, add_bias_linear=True), "add_bias_linear"),  # HF GLM-4.5 biases only q/k/v
    (dict(GLM, moe_shared_expert_gate=True), "moe_shared_gate"),
    (dict(GLM, use_rope_scaling=True), "rope_scaling"),
    (dict(GLM, moe_router_topk=4), "moe_group_score_topk"),  # megatron-core ranks groups by their top 4, HF by top 2
    (dict(rotary_percent=0.5), "rotary_percent"),  # only GLM-4.5 has partial RoPE
    (dict(qk_layernorm=True, rotary_percent=0.5), "rotary_percent"),
    (dict(num_experts=None, rotary_percent=0.5), "rotary_percent"),
])
def test_routing_hf_cannot_express_is_a_clear_error(args, named):
    with pytest.raises(DistconvError, match=named):
        pick_family(FAMILIES, _spec(**args), None)


def test_qwen_moe_dense_layers_map_to_mlp_only_layers():
    spec = _spec(moe_layer_freq=2, num_layers=4, qk_layernorm=True)
    family = pick_family(FAMILIES, spec, None)
    config = family.hf_config(spec)
    assert config.mlp_only_layers == [1, 3] and config.decoder_sparse_step == 1


def test_deepseek_config_carries_what_serving_engines_route_by():
    """vLLM and SGLang create the expert bias only for topk_method "noaux_tc" and score with
    softmax unless scoring_func says otherwise; transformers ignores both (DeepSeek's own values)."""
    spec = _spec(**DS)
    config = pick_family(FAMILIES, spec, None).hf_config(spec).to_diff_dict()
    assert (config["topk_method"], config["scoring_func"], config["moe_layer_freq"]) == ("noaux_tc", "sigmoid", 1)
    assert (config["n_group"], config["topk_group"]) == (DS["moe_router_num_groups"], DS["moe_router_group_topk"])


def test_deepseek_groups_without_group_topk_are_not_group_limited():
    """megatron-core limits routing to groups only when moe_router_group_topk is set."""
    spec = _spec(**{**DS, "moe_router_group_topk": None})
    config = pick_family(FAMILIES, spec, None).hf_config(spec)
    assert (config.n_group, config.topk_group) == (1, 1)


def test_glm_export_imports_back_bit_exactly(exported, tmp_path):
    """The GLM-4.5 export (a non-zero expert bias, q/k/v biases, q/k norms) imports into Megatron
    (one process, TP2 x EP2) and exports again to the same tensors, bit for bit."""
    folder = exported[("glm4_moe", "tp2pp1ep2", TRAINING_WORLD)]["save"]
    meg, back = tmp_path / "meg", tmp_path / "back"
    proc = distconv_cli("import", "--load", str(folder), "--save", str(meg), "--tensor-model-parallel-size", "2",
                        "--expert-model-parallel-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = distconv_cli("export", "--load", str(meg), "--save", str(back))
    assert proc.returncode == 0, proc.stderr[-3000:]
    source, again = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()} for d in (folder, back))
    assert sorted(source) == sorted(again) and any("e_score_correction_bias" in k for k in source)
    assert all(torch.equal(source[k], again[k]) for k in source)


def _glm_hf_config(**override):
    from transformers import Glm4MoeConfig

    spec = _spec(**GLM)
    config = pick_family(FAMILIES, spec, None).hf_config(spec)
    return Glm4MoeConfig(**{**config.to_dict(), **override})


def test_glm_import_reads_the_spec_export_wrote():
    """HF config -> spec (import) is the inverse of spec -> HF config (export), and the Megatron-LM
    args the import writes read back as the same spec."""
    from distconv.megatron.args import megatron_args as import_args
    from distconv.megatron.catalogue import Target

    config = _glm_hf_config()
    spec = pick_family(FAMILIES, architecture=config.architectures[0], importing=True).spec_from_hf_config(
        config, 256, torch.float32)
    assert spec == _spec(**GLM)
    assert spec_from_args(import_args(spec, Target(2, 1, 2), divisible_by=64, tokenizer=None)).with_vocab(256) == spec


@pytest.mark.parametrize("override,named", [
    (dict(tie_word_embeddings=True), "MTP layers with tied embeddings"),  # HF's MTP layers carry their own head
    (dict(norm_topk_prob=False), "norm_topk_prob"),  # megatron-core renormalises when k > 1
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
     "rope_scaling"),
    (dict(n_shared_experts=0), "moe_shared_experts"),
])
def test_glm_import_refuses_what_megatron_cannot_express(override, named):
    config = _glm_hf_config(**override)
    with pytest.raises(DistconvError, match=named):
        pick_family(FAMILIES, architecture=config.architectures[0], importing=True).spec_from_hf_config(
            config, 256, torch.float32)


@pytest.mark.parametrize("name,layout", [("deepseek_v3", "tp1pp2ep2"), ("glm4_moe", "tp2pp1ep2"),
                                         ("deepseek_v32", "tp2pp2ep2etp1")])
def test_mtp_layers_export_as_released(exported, built, tmp_path, name, layout):
    """megatron-core's MTP logits (recorded when the fixture was built, PP2 with MTP on the last stage,
    or TP2; GLM with two MTP layers) equal the published MTP formula on the exported tensors, depth by
    depth; the same folder with the first MTP layer's two input norms swapped does not."""
    folder = exported[(name, layout, TRAINING_WORLD)]["save"]
    ref = torch.load(built / "refs" / f"{name}.pt")
    logits, mtp = hf_mtp_logits(folder, ref["tokens"])
    vocab = logits.shape[-1]
    assert len(mtp) == len(ref["mtp_logits"]) == FIXTURES[name].args["mtp_num_layers"]
    for ours, theirs in zip([logits] + mtp, [ref["logits"]] + ref["mtp_logits"]):
        assert (ours - theirs[..., :vocab]).abs().max().item() <= TOL
    state = hf_tensors(folder)
    n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    enorm, hnorm = f"model.layers.{n}.enorm.weight", f"model.layers.{n}.hnorm.weight"
    state[enorm], state[hnorm] = state[hnorm], state[enorm]
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    save_file(state, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    (swapped / "config.json").write_text((folder / "config.json").read_text())
    _, mtp = hf_mtp_logits(swapped, ref["tokens"])
    assert (mtp[0] - ref["mtp_logits"][0][..., :vocab]).abs().max().item() > 100 * TOL


# ---- Qwen3-Next and Qwen3.5 (gated delta net) ---------------------------------------------------

@pytest.mark.parametrize("layout", ["tp2pp1ep2", "tp1pp2ep2"])
def test_qwen3_5_text_model_exports_from_the_same_checkpoint(exported, built, layout):
    """With an HF config naming Qwen3_5MoeForCausalLM, the Qwen3-Next fixture exports as Qwen3.5's text
    MoE model (flat in_proj_qkv, in_proj_z/b/a), and transformers' logits equal megatron-core's."""
    result = exported[("qwen3_next", layout, OTHER_WORLD, "qwen3_5")]
    assert result["ok"], result.get("error")
    assert result["report"]["architecture"] == "Qwen3_5MoeForCausalLM"
    names = set(json.loads((result["save"] / "model.safetensors.index.json").read_text())["weight_map"])
    assert {"model.layers.0.linear_attn.in_proj_qkv.weight", "model.layers.0.linear_attn.in_proj_b.weight"} <= names
    assert not any("in_proj_qkvz" in n for n in names)
    assert _logits_diff(built, "qwen3_next", result["save"]) <= TOL


def test_qwen3_next_config_carries_the_hybrid_layout(exported):
    config = json.loads((exported[("qwen3_next", "tp1pp2ep2", OTHER_WORLD)]["save"] / "config.json").read_text())
    assert config["layer_types"] == ["linear_attention", "full_attention"] * 2
    assert (config["linear_num_key_heads"], config["linear_num_value_heads"], config["linear_key_head_dim"],
            config["linear_value_head_dim"], config["linear_conv_kernel_dim"]) == (2, 4, 16, 16, 4)
    assert (config["head_dim"], config["rope_parameters"]["partial_rotary_factor"], config["norm_topk_prob"]) == (32, 0.25, True)
    assert (config["shared_expert_intermediate_size"], config["mlp_only_layers"], config["num_experts"]) == (48, [], 4)


@pytest.mark.parametrize("key", [("qwen3_next_mtp", "tp1pp2ep2", TRAINING_WORLD),
                                 ("qwen3_next_mtp", "tp1pp2ep2", OTHER_WORLD, "qwen3_5")], ids=["qwen3_next", "qwen3_5_moe"])
def test_qwen3_next_mtp_layer_exports_as_released(exported, built, tmp_path, key):
    """Qwen3-Next's MTP layer (PP2 x EP2, on the last stage) exports as the release lays it out
    (``mtp.fc``, ``mtp.pre_fc_norm_*``, ``mtp.layers.0``, ``mtp.norm``; ``mtp_num_hidden_layers``), as
    Qwen3-Next and as Qwen3.5's MoE model (by its HF config), and megatron-core's MTP logits equal the
    MTP formula on the exported tensors; the same folder with the two input norms swapped does not."""
    result = exported[key]
    assert result["ok"], result.get("error")
    folder = result["save"]
    assert json.loads((folder / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    state = hf_tensors(folder)
    assert {"mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.self_attn.q_proj.weight",
            "mtp.layers.0.mlp.experts.3.down_proj.weight"} <= set(state)
    assert not any(k.startswith("model.layers.2.") for k in state)
    ref = torch.load(built / "refs" / "qwen3_next_mtp.pt")
    mtp = qwen3_next_mtp_logits(folder, ref["tokens"])
    assert (mtp - ref["mtp_logits"][0][..., : mtp.shape[-1]]).abs().max().item() <= TOL
    e, h = "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"
    state[e], state[h] = state[h], state[e]
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    save_file(state, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    (swapped / "config.json").write_text((folder / "config.json").read_text())
    mtp = qwen3_next_mtp_logits(swapped, ref["tokens"])
    assert (mtp - ref["mtp_logits"][0][..., : mtp.shape[-1]]).abs().max().item() > 100 * TOL


def _broken_qwen3_next(how: str):
    """Qwen3-Next's table with one deliberate mistake."""
    import dataclasses

    from distconv.families import qwen3_next as q
    from distconv.families.base import Concat, Transform

    class Twice(Transform):  # the norm offset applied twice
        def export(self, t, spec):
            return q.PLAIN.export(q.PLAIN.export(t, spec)[0], spec)

    class GateAfterQueries(q.GatedQKV):  # HF q_proj as [all q; all gates], not per head
        def export(self, t, spec):
            q_proj, k, v = super().export(t, spec)
            heads = q_proj.reshape(spec.num_attention_heads, 2, spec.head_dim, -1)
            return heads.transpose(0, 1).reshape(q_proj.shape), k, v

    wrong = {"norm-offset-twice": (q.A + "out_norm.weight", Twice()),
             "flat-in-proj": (q.A + "in_proj.weight.query", Concat(q._qkvz)),
             "gate-after-queries": (q.A + "linear_qkv.weight", GateAfterQueries())}[how]
    rules = tuple(dataclasses.replace(r, transform=wrong[1]) if r.megatron == wrong[0] else r for r in q.QWEN3_NEXT.rules)
    return dataclasses.replace(q.QWEN3_NEXT, rules=rules)


@pytest.mark.parametrize("how", [None, "norm-offset-twice", "flat-in-proj", "gate-after-queries"])
def test_a_wrong_qwen3_next_mapping_fails(built, tmp_path, how):
    """The suite's proof rejects a deliberately wrong table: the output norm's +1 applied twice, the
    packed in_proj poured into in_proj_qkvz flat (not per key head), the attention gate rows after
    all query rows. The real export runs (one process, TP2 x EP2 checkpoint) with the wrong table in
    place of the right one; the right one (None) passes the same check."""
    from unittest import mock

    import distconv
    from distconv.directions import export as export_direction

    families = tuple(_broken_qwen3_next(how) if how and f.architecture == "Qwen3NextForCausalLM" else f for f in FAMILIES)
    with mock.patch.object(export_direction, "FAMILIES", families):
        distconv.export(load=str(built / "qwen3_next" / "tp2pp1ep2"), save=str(tmp_path / "hf"), quiet=True)
    diff = _logits_diff(built, "qwen3_next", tmp_path / "hf")
    assert diff <= TOL if how is None else diff > 100 * TOL


# ---- DeepSeek-V3.2 and GLM-5 (the DSA indexer) ---------------------------------------------------

@pytest.mark.parametrize("change", [
    dict(index_topk=12), dict(zero="model.layers.0.self_attn.indexer.k_norm.weight"),
    dict(zero="model.layers.1.self_attn.indexer.weights_proj.weight"),
], ids=["topk-covers-the-sequence", "k-norm", "weights-proj"])
def test_the_indexer_decides_the_logits(exported, built, change):
    """The indexer keeps 4 of the fixture's 12 tokens: its top-k and tensors change the logits."""
    folder = exported[("deepseek_v32", "tp2pp2ep2etp1", TRAINING_WORLD)]["save"]
    assert _logits_diff(built, "deepseek_v32", folder, **change) > 100 * TOL


def test_glm5_exports_from_the_same_checkpoint(exported, built):
    """With an HF config naming GlmMoeDsaForCausalLM the DSA fixture exports as GLM-5 (interleaved
    indexer RoPE, other row order) whose logits are megatron-core's too; its indexer tensors in
    DeepSeek-V3.2's class (half-split RoPE) are not."""
    result = exported[("deepseek_v32", "tp2pp2ep2etp1", OTHER_WORLD, "glm5")]
    assert result["ok"], result.get("error")
    assert result["report"]["architecture"] == "GlmMoeDsaForCausalLM"
    assert _logits_diff(built, "deepseek_v32", result["save"]) <= TOL
    glm = {k: v for f in result["save"].glob("*.safetensors") for k, v in load_file(str(f)).items()}
    ds_folder = exported[("deepseek_v32", "tp2pp2ep2etp1", OTHER_WORLD)]["save"]
    ds = {k: v for f in ds_folder.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    differ = sorted(k for k in ds if not torch.equal(ds[k], glm[k]))
    assert differ and all(".indexer." in k for k in differ) and not any("weights_proj" in k for k in differ)
    crossed = result["save"].parent / "dsv32_with_glm5_indexer"
    crossed.mkdir()
    save_file(glm, str(crossed / "model.safetensors"), metadata={"format": "pt"})
    (crossed / "config.json").write_text((ds_folder / "config.json").read_text())
    assert _logits_diff(built, "deepseek_v32", crossed) > 100 * TOL


def test_a_wrong_dsa_mapping_is_rejected_by_the_logits(exported, built):
    """The indexer copied as stored (``wrong_mapping`` ``indexer_copied``: no RoPE row order, no gamma
    fold) exports without complaint, every shape as transformers expects; the logits proof rejects it."""
    result = exported[("deepseek_v32", "tp2pp2ep2etp1", OTHER_WORLD, "indexer_copied")]
    assert result["ok"], result.get("error")
    diff = _logits_diff(built, "deepseek_v32", result["save"])
    print(f"deepseek_v32 with indexer_copied: max |logit difference| = {diff:.3e}")
    assert diff > 100 * TOL


# ---- gpt-oss -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    dict(zero="model.layers.0.self_attn.sinks"), dict(layer_types=["full_attention"] * 4),
    dict(layer_types=["full_attention", "sliding_attention"] * 2), dict(sliding_window=5), dict(swiglu_limit=7.0),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    dict(rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                          "original_max_position_embeddings": 4096, "rope_theta": 150000.0}),
    dict(zero="model.layers.1.mlp.router.bias"), dict(zero="model.layers.1.mlp.experts.gate_up_proj_bias"),
    dict(zero="model.layers.1.mlp.experts.down_proj_bias"), dict(zero="model.layers.2.self_attn.k_proj.bias"),
    dict(zero="model.layers.0.self_attn.o_proj.bias"),
], ids=["sinks", "no-window", "window-on-other-layers", "window-size", "clamp", "no-yarn", "yarn-truncate", "router-bias",
        "gate-up-bias", "down-bias", "k-bias", "o-bias"])
def test_gpt_oss_features_decide_the_logits(exported, built, change):
    """Each gpt-oss setting and bias the export writes is needed for the 1e-4 proof: the export,
    changed in one, misses megatron-core's logits (the fixture's window of 4 tokens on layers 1 and
    3, its clamp at 0.5, YaRN without truncation, all reached on 12 tokens)."""
    folder = exported[("gpt_oss", "tp2pp1ep2etp1", TRAINING_WORLD)]["save"]
    assert _logits_diff(built, "gpt_oss", folder, **change) > TOL


def test_gpt_oss_config_and_expert_layout(exported):
    """The fixture's settings in transformers' spelling, and the experts fused as the hub stores them;
    the export warns that vLLM clamps at 7.0 whatever swiglu_limit says (the fixture's windows, on
    layers 0 and 2, are vLLM's; gpt_oss_square's, on layer 1, are not: warned too)."""
    result = exported[("gpt_oss", "tp1pp2ep2", OTHER_WORLD)]
    clamp = "vLLM 0.32 clamps gpt-oss's experts at 7.0 whatever the config says (transformers reads it)"
    assert [w for w in result["report"]["warnings"] if "vLLM" in w] == [f"swiglu_limit 0.5: {clamp}"]
    square = exported[("gpt_oss_square", "tp1pp1ep2", OTHER_WORLD)]["report"]["warnings"]
    assert [w for w in square if "vLLM" in w] == [f"swiglu_limit 0.3: {clamp}", (
        "layer_types: vLLM 0.32 gives gpt-oss's sliding window to layers 0, 2, 4, ... whatever the config says "
        "(transformers reads it)")]
    folder = result["save"]
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2 and config["sliding_window"] == 4
    assert (config["swiglu_limit"], config["swiglu_alpha"], config["attention_bias"]) == (0.5, 1.702, True)
    assert config["rope_parameters"] == {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0}
    state = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    shapes = {k.removeprefix("model.layers.0."): tuple(v.shape) for k, v in state.items() if k.startswith("model.layers.0.mlp")}
    assert shapes == {"mlp.router.weight": (4, 64), "mlp.router.bias": (4,), "mlp.experts.gate_up_proj": (4, 64, 64),
                      "mlp.experts.gate_up_proj_bias": (4, 64), "mlp.experts.down_proj": (4, 32, 64),
                      "mlp.experts.down_proj_bias": (4, 64)}
    assert state["model.layers.0.self_attn.sinks"].shape == (4,)


def test_gpt_oss_mxfp4_export_is_the_bf16_export_quantized(exported):
    """``--dtype mxfp4`` writes the hub's layout (uint8 blocks and scales of the transposed experts, the
    rest bf16) with transformers' quantization_config; its blocks and scales are the reference
    quantizer's (``test_mxfp4``, from the format's definition) of the bf16 export's experts, and
    transformers loads the folder (dequantizing on CPU) to exactly those values."""
    from transformers import AutoModelForCausalLM

    from test_mxfp4 import ref_quantize

    mx, bf16 = exported[("gpt_oss", "tp2pp1ep2etp1", OTHER_WORLD, "mxfp4")], exported[("gpt_oss", "tp2pp1ep2etp1", OTHER_WORLD)]
    assert mx["ok"], mx.get("error")
    config = json.loads((mx["save"] / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    ours = {k: v for f in sorted(mx["save"].glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    plain = {k: v for f in sorted(bf16["save"].glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    experts = [k for k in plain if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 8 and sorted(ours) == sorted([k for k in plain if k not in experts]
                                                         + [k + s for k in experts for s in ("_blocks", "_scales")])
    for name in experts:
        blocks, scales = ref_quantize(plain[name].transpose(-1, -2).float())
        assert torch.equal(ours[name + "_blocks"], blocks) and torch.equal(ours[name + "_scales"], scales), name
    for name, t in ours.items():
        if name[: -len("_blocks")] not in experts and name[: -len("_scales")] not in experts:
            assert t.dtype == torch.bfloat16 and torch.equal(t, plain[name].bfloat16()), name
    loaded = AutoModelForCausalLM.from_pretrained(str(mx["save"]), dtype=torch.float32, trust_remote_code=False).state_dict()
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    for name in experts:
        expected = convert_moe_packed_tensors(ours[name + "_blocks"], ours[name + "_scales"], dtype=torch.float32)
        assert torch.equal(loaded[name], expected), name


@pytest.mark.parametrize("name,layout,wrong", [("gpt_oss_square", "tp1pp1ep2", "down_not_transposed"),
                                               ("gpt_oss", "tp1pp2ep2", "gate_up_concatenated")])
def test_a_wrong_gpt_oss_mapping_is_rejected_by_the_logits(exported, built, name, layout, wrong):
    """The deliberately wrong mappings (``wrong_mapping``) export without complaint: every tensor has
    the shape transformers expects (square experts: down_proj [64, 64] either way). Only the logits
    proof rejects them; the right mapping of the same checkpoint passes it."""
    result = exported[(name, layout, OTHER_WORLD, wrong)]
    assert result["ok"], result.get("error")
    diff = _logits_diff(built, name, result["save"])
    print(f"{name} with {wrong}: max |logit difference| = {diff:.3e}")
    assert diff > 100 * TOL
    assert _logits_diff(built, name, exported[(name, layout, OTHER_WORLD)]["save"]) <= TOL


def test_an_untransposed_down_proj_of_rectangular_experts_is_refused_by_shape(exported):
    """With F != H the same wrong mapping does not even make a folder: the plan's shapes differ from transformers'."""
    result = exported[("gpt_oss", "tp1pp1", OTHER_WORLD, "down_not_transposed")]
    assert not result["ok"] and "shape mismatch" in result["error"] and "down_proj" in result["error"]
    assert not result["save"].exists()


def _kimi_diff(built: Path, folder: Path, scratch: Path, zero: str | None = None, **config_override) -> float:
    """Max |transformers - megatron-core| logits of a Kimi-K2 export (transformers loads a copy whose
    model_type is deepseek_v3: it has no kimi_k2), with config fields changed or one HF tensor zeroed."""
    from transformers import AutoModelForCausalLM

    ref = torch.load(built / "refs" / "vllm_kimi_k2.pt")
    copy = transformers_copy(folder, scratch / f"copy{len(list(scratch.glob('copy*')))}")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **config_override}))
    model = AutoModelForCausalLM.from_pretrained(str(copy), dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        if zero:
            model.get_parameter_or_buffer(zero).zero_()
        logits = model(ref["tokens"]).logits
    return (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item()


def _kimi(exported: dict, layout: str = "tp1pp1ep2", kind: str = "kimi") -> dict:
    result = exported[("vllm_kimi_k2", layout, OTHER_WORLD, kind)]
    assert result["ok"], result.get("error")
    return result


def test_kimi_export_keeps_its_hub_config_and_megatron_logits(exported, built, tmp_path):
    """Kimi-K2's hub config (kimi_k2, which transformers lacks; an auto_map; FP8) names megatron-core's
    EP2 save: the export keeps model_type kimi_k2 and the architecture vLLM loads, carries the routing
    fields and YaRN (beta_fast 1, beta_slow 1) exactly, drops the auto_map and the FP8 quantization
    config (its weights are not FP8), copies no code, and transformers computes megatron-core's logits."""
    result = _kimi(exported)
    folder = result["save"]
    assert result["report"]["architecture"] == "DeepseekV3ForCausalLM"
    assert any("model_type kimi_k2" in w for w in result["report"]["warnings"])
    hub = json.loads((folder.parent / "kimi_hub" / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("kimi_k2", ["DeepseekV3ForCausalLM"])
    assert "auto_map" not in config and "quantization_config" not in config and not list(folder.glob("*.py"))
    for field in ("n_group", "topk_group", "routed_scaling_factor", "scoring_func", "topk_method", "norm_topk_prob",
                  "first_k_dense_replace", "n_shared_experts", "q_lora_rank", "rope_theta"):
        assert config[field] == hub[field], field
    assert config["routed_scaling_factor"] == KIMI_SCALING
    assert {k: v for k, v in config["rope_scaling"].items() if k in KIMI_ROPE} == KIMI_ROPE
    biases = {k: v for k, v in hf_tensors(folder).items() if k.endswith("e_score_correction_bias")}
    assert len(biases) == 1 and all(b.dtype == torch.float32 and b.unique().numel() == b.numel() and bool(b.abs().min() > 0)
                                    for b in biases.values())
    assert _kimi_diff(built, folder, tmp_path) <= TOL


def test_kimi_export_of_ep2_equals_that_of_tp1pp1(exported):
    ep2, single = hf_tensors(_kimi(exported)["save"]), hf_tensors(_kimi(exported, "tp1pp1")["save"])
    assert sorted(ep2) == sorted(single)
    assert all(torch.equal(ep2[k], single[k]) for k in ep2)


@pytest.mark.parametrize("change", [
    dict(routed_scaling_factor=1.0), dict(norm_topk_prob=False), dict(rope_scaling={**KIMI_ROPE, "beta_fast": 32.0}),
    dict(rope_scaling={**KIMI_ROPE, "mscale_all_dim": 0.0}), dict(zero="model.layers.1.mlp.gate.e_score_correction_bias"),
], ids=["scaling", "norm-topk", "beta-fast", "mscale-all-dim", "expert-bias"])
def test_kimi_routing_and_rope_decide_the_logits(exported, built, tmp_path, change):
    """Each Kimi-K2 router and YaRN setting the export carries is needed to match megatron-core: the
    routing depends on the expert bias, and beta_fast 1 is not MLATransformerConfig's default 32.
    Measured: 0.12, 0.026, 3.6e-3 (on these 12 positions), 0.24, 0.16; the export itself 6e-7."""
    assert _kimi_diff(built, _kimi(exported)["save"], tmp_path, **change) > 10 * TOL


def test_kimi_zeroed_expert_bias_fails_the_logits(exported, built, tmp_path):
    """The deliberately wrong mapping (Megatron-Bridge #4657: e_score_correction_bias left at zero) exports
    without complaint, names and shapes right; only the logits show it."""
    folder = _kimi(exported, kind="expert_bias_zeroed")["save"]
    bias = hf_tensors(folder)["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and not bias.any()
    diff = _kimi_diff(built, folder, tmp_path)
    print(f"Kimi-K2 export with the expert bias zeroed: max |logits - megatron-core| {diff:.3g}")
    assert diff > 100 * TOL



def test_kimi_hub_config_reads_as_deepseek_v3_without_its_code(tmp_path):
    """transformers itself refuses kimi_k2 without the release's code; distconv reads its JSON into
    DeepseekV3Config (the architecture it names), keeps the model type for the export and runs nothing."""
    from transformers import AutoConfig, DeepseekV3Config

    from distconv.families import HUB_TYPES
    from distconv.hf.source import HUB_MODEL_TYPE, read_config
    from distconv.inspect import inspect_hf

    folder = write_release(tmp_path / "kimi", kimi_config_of_args(megatron_args(**KIMI.args), 256))
    with pytest.raises(ValueError, match="custom code"):
        AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    config, warnings = read_config(folder, "--load", HUB_TYPES)
    assert type(config) is DeepseekV3Config and getattr(config, HUB_MODEL_TYPE) == "kimi_k2"
    assert not hasattr(config, "auto_map") and config.n_group == 1 and config.routed_scaling_factor == KIMI_SCALING
    assert len(warnings) == 2 and "auto_map" in warnings[0] and "kimi_k2" in warnings[1]
    report = inspect_hf(folder)
    assert (report["model_type"], report["read_as"], report["auto_map"]) == ("kimi_k2", "DeepseekV3Config (DeepseekV3ForCausalLM)", True)
    other = write_release(tmp_path / "other", {**json.loads((folder / "config.json").read_text()),
                                               "architectures": ["KimiK25ForConditionalGeneration"]})
    with pytest.raises(DistconvError, match="read as DeepseekV3ForCausalLM only"):
        read_config(other, "--load", HUB_TYPES)


def test_deepseek_norm_epsilon_other_than_latent_norms_converts_with_a_note():
    """Moonlight's rms_norm_eps 1e-5: HF's latent q/kv norms keep 1e-6, megatron-core has one epsilon;
    the export says so."""
    spec = _spec(**{**DS, "layernorm_epsilon": 1e-5})
    family = pick_family(FAMILIES, spec, None)
    assert family.architecture == "DeepseekV3ForCausalLM" and family.hf_config(spec).rms_norm_eps == 1e-5
    assert any("latent q and kv" in note for note in family.notes(spec))
    assert family.notes(_spec(**DS)) == []


def test_kimi_hub_config_with_other_yarn_betas_conflicts(tmp_path):
    """An --hf-config is checked against the checkpoint on every YaRN setting, not only type and factor:
    Kimi-K2's config with beta_fast 32 does not describe the Kimi-like checkpoint (beta_fast 1)."""
    from distconv.families import HUB_TYPES
    from distconv.hf.source import read_config

    spec = spec_from_args(megatron_args(**KIMI.args)).with_vocab(256)
    family = pick_family(FAMILIES, spec, "DeepseekV3ForCausalLM")
    hub = kimi_config_of_args(megatron_args(**KIMI.args), 256)
    family.check_config(read_config(write_release(tmp_path / "right", hub), "--hf-config", HUB_TYPES)[0], spec)
    wrong = write_release(tmp_path / "wrong", {**hub, "rope_scaling": {**KIMI_ROPE, "beta_fast": 32.0}})
    with pytest.raises(DistconvError, match="rope scaling: HF config .*'beta_fast': 32.0"):
        family.check_config(read_config(wrong, "--hf-config", HUB_TYPES)[0], spec)


def test_kimi_verify(exported, built):
    """``distconv verify`` on CPU: megatron-core's Kimi-like checkpoint against its kimi_k2 export."""
    folder = _kimi(exported, "tp1pp1")["save"]
    proc = distconv_cli("verify", "--load", str(built / "vllm_kimi_k2" / "tp1pp1"), "--hf", str(folder))
    assert proc.returncode == 0 and "-> OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
