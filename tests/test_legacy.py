"""Legacy mp_rank_* checkpoints, GPT-2, ``--format torch`` and ``distconv inspect``.

Legacy checkpoints are written from random HF models (fixtures.legacy, the layout of
Megatron-LM's legacy GPT model per checkpoint_version); the proof is that the exported
folder's logits equal the original HF model's. The megatron-core GPT-2-style torch_dist
fixture ("gpt2" in fixtures.build) is checked against megatron-core's forward in
test_export_logits.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from distconv.engine.progress import storage_bytes_read
from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.families.gpt2 import CONV1D, FUSED_QKV
from distconv.inspect import inspect_checkpoint
from distconv.megatron.args import spec_from_args
from distconv.megatron.legacy import _qkv_to_core
from distconv.megatron.source import describe

from conftest import distconv_cli, hf_logits, hf_tensors, run_export_jobs
from export_jobs import drop_page_cache
from fixtures.build import FIXTURES, layout_dir, parallel, torch_format_dir
from fixtures.legacy import LEGACY_FIXTURES, PADDED_VOCAB, VOCAB, hf_model
from fixtures.megatron_cpu import megatron_args

TOL = 1e-4
CASES = [(name, tp, pp) for name, fx in LEGACY_FIXTURES.items() for tp, pp in fx.layouts]
# megatron-core models saved by megatron-core itself in the torch format (local module keys)
CORE_TORCH = [(name, tp, pp) for name, fx in FIXTURES.items() for tp, pp in fx.torch_format]
ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
WORLD = 2


@pytest.fixture(scope="module")
def exported(legacy_built, built, tmp_path_factory) -> dict[tuple, dict]:
    """Every legacy case, the zip, a ``--format torch`` export and the core torch-format saves, in one torchrun launch."""
    out = tmp_path_factory.mktemp("legacy_exports")
    jobs = {case: {"load": str(legacy_built / case[0] / f"tp{case[1]}pp{case[2]}"), "save": str(out / "_".join(map(str, case)))} for case in CASES}
    jobs["vpp"] = {"load": str(legacy_built / "gpt2_v3" / "tp2pp2vpp2"), "save": str(out / "vpp")}
    jobs["zip"] = {"load": str(legacy_built / "gpt2_v0.zip"), "save": str(out / "zip")}
    for name, tp, pp in CORE_TORCH:
        jobs[("core", name, tp, pp)] = {"load": str(torch_format_dir(built, name, tp, pp)), "save": str(out / f"core_{name}_{tp}_{pp}")}
    jobs["torch"] = {"load": str(legacy_built / "gpt2_v3" / "tp2pp2"), "save": str(out / "torch"), "format": "torch"}
    jobs["read_at_writer"] = {"load": str(legacy_built / "gpt2_v3" / "tp2pp2"), "save": str(out / "read_at_writer"),
                              "writers": 2, "read_at": "writer"}
    # conversion from storage, not the page cache, so that each rank's bytes_read shows its files
    jobs[("gpt2_v3", 2, 2)]["cold"] = str(legacy_built / "gpt2_v3" / "tp2pp2")
    results = run_export_jobs(WORLD, list(jobs.values()), out)
    return {key: {**r, "save": Path(job["save"])} for (key, job), r in zip(jobs.items(), results)}


def _max_diff(legacy_built: Path, name: str, logits: torch.Tensor) -> float:
    ref = torch.load(legacy_built / "refs" / f"{name}.pt")
    return (logits - ref["logits"]).abs().max().item()


@pytest.mark.parametrize("name,tp,pp", CASES, ids=[f"{n}-tp{t}pp{p}" for n, t, p in CASES])
def test_legacy_logits_match_the_original_hf_model(exported, legacy_built, name, tp, pp):
    result = exported[(name, tp, pp)]
    assert result["ok"], result.get("error")
    assert result["report"]["architecture"] == ARCH[LEGACY_FIXTURES[name].family]
    assert result["report"]["vocab_size"] == VOCAB  # padded rows (PADDED_VOCAB) trimmed
    tokens = torch.load(legacy_built / "refs" / f"{name}.pt")["tokens"]
    assert _max_diff(legacy_built, name, hf_logits(result["save"], tokens)) <= TOL
    config = json.loads((result["save"] / "config.json").read_text())
    if name.startswith("gpt2"):
        assert config["activation_function"] == LEGACY_FIXTURES[name].activation


@pytest.mark.parametrize("name,tp,pp", CORE_TORCH, ids=[f"{n}-tp{t}pp{p}" for n, t, p in CORE_TORCH])
def test_core_torch_format_logits_match_megatron(exported, built, name, tp, pp):
    result = exported[("core", name, tp, pp)]
    assert result["ok"], result.get("error")
    ref = torch.load(built / "refs" / f"{name}.pt")
    logits = hf_logits(result["save"], ref["tokens"])
    assert (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item() <= TOL
    # the same weights as megatron-core's own torch_dist save of that model
    legacy = inspect_checkpoint(torch_format_dir(built, name, tp, pp))
    dist = inspect_checkpoint(layout_dir(built, name, tp, pp))
    assert legacy["format"] == "legacy" and legacy["model_bytes"] == dist["model_bytes"]
    assert legacy["hf_family"] == dist["hf_family"]


def _storage_reads_measurable(path: Path) -> bool:
    """Whether a read of ``path`` just evicted from the page cache shows in ``read_bytes``
    (not on tmpfs, nor where fadvise cannot evict, nor without ``/proc/self/io``)."""
    drop_page_cache(path)
    before = storage_bytes_read()
    path.read_bytes()
    after = storage_bytes_read()
    return before is not None and after is not None and after - before >= path.stat().st_size // 2


def test_each_rank_reads_only_its_own_files(exported, legacy_built):
    """Each rank reads its own rank files and none of the other rank's, by two measures.

    TP2 PP2 files at 2 ranks: writer = pp*TP + tp, rank = writer % 2, so rank r alone should
    read ``mp_rank_0r_*``, half the checkpoint. The job ran ``cold`` (tests/export_jobs.py): the
    files were evicted from the page cache once planning was over, so the conversion reads every
    page it touches from storage, counted (``read_bytes``) in the process that touched it first.

    1. The report's measured ``bytes_read`` of a rank lies between the tensor bytes the plan
       gave it (nobody else reads those) and its own files whole, rounded up to pages, plus
       64 KiB for incidental reads (none seen): mapped pages are read around the fault, and with
       this machine's 8 MiB read-ahead each 0.75 MB file is read whole on its first fault, so
       the figure equals the upper bound here. A rank that got to one of the other rank's files
       first exceeds the bound by that file (~0.75 MB), and the owner falls below its tensors.
    2. A rank that reads another rank's file after its owner did finds it cached and costs
       nothing, so (1) cannot see it. ``mapped`` closes that gap: the legacy reader memory-maps
       the files it opens, and the maps' resident bytes as the conversion ends (``Rss``, what
       the process touched, cached or not) must name exactly the rank's own files.
    """
    folder = legacy_built / "gpt2_v3" / "tp2pp2"
    files = sorted(folder.rglob("model_optim_rng.pt"))
    if not _storage_reads_measurable(files[0]):
        pytest.skip(f"storage reads of {folder} cannot be measured here (tmpfs, fadvise, or no /proc/self/io)")
    result = exported[("gpt2_v3", 2, 2)]
    assert result["ok"], result.get("error")
    report = result["report"]
    page = os.sysconf("SC_PAGE_SIZE")
    ckpt = describe(folder)
    name = {c.file: str((ckpt.path / c.file).resolve().relative_to(folder.resolve())) for t in ckpt.tensors.values() for c in t.chunks}
    own = {rank: {name[c.file] for t in ckpt.tensors.values() for c in t.chunks if c.writer % WORLD == rank} for rank in range(WORLD)}
    assert own[0] and own[1] and not own[0] & own[1] and len(files) == len(own[0] | own[1])
    size = {f: -(-(folder / f).stat().st_size // page) * page for f in own[0] | own[1]}
    total = sum(size.values())
    assert len(report["ranks"]) == WORLD
    for r in report["ranks"]:
        mine = sum(size[f] for f in own[r["rank"]])
        assert r["bytes_read_planned"] <= r["bytes_read"] <= mine + (64 << 10), (r, mine, total)
        assert r["bytes_read"] < 0.75 * total, (r, total)
        touched = {f for f, n in result["mapped"][r["rank"]].items() if n > 0}
        assert touched == own[r["rank"]], (r["rank"], result["mapped"])
    assert report["bytes_read"] == sum(r["bytes_read"] for r in report["ranks"])
    assert report["bytes_read_planned"] == sum(r["bytes_read_planned"] for r in report["ranks"])


def test_writers_reading_rank_files_themselves(exported, legacy_built):
    """--read-at writer on legacy rank files: each of the 2 writers opens whichever rank files
    its units lie in, nothing is gathered, and the tensors equal those of the export by saver."""
    result, by_saver = exported["read_at_writer"], exported[("gpt2_v3", 2, 2)]
    assert result["ok"] and by_saver["ok"], result.get("error")
    assert result["report"]["bytes_gathered"] == 0 and by_saver["report"]["bytes_gathered"] > 0
    assert all(r["bytes_read_planned"] > 0 for r in result["report"]["ranks"])
    mine, theirs = (hf_tensors(f) for f in (result["save"], by_saver["save"]))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_virtual_pipeline_chunks(exported, legacy_built):
    result = exported["vpp"]
    assert result["ok"], result.get("error")
    tokens = torch.load(legacy_built / "refs" / "gpt2_v3.pt")["tokens"]
    assert _max_diff(legacy_built, "gpt2_v3", hf_logits(result["save"], tokens)) <= TOL
    report = inspect_checkpoint(legacy_built / "gpt2_v3" / "tp2pp2vpp2")
    assert report["layout"]["virtual_pipeline_model_parallel_size"] == 2
    assert report["model_bytes"] == _expected_legacy_bytes("gpt2_v3")


def test_zip_release(exported, legacy_built):
    result = exported["zip"]
    assert result["ok"], result.get("error")
    tokens = torch.load(legacy_built / "refs" / "gpt2_v0.pt")["tokens"]
    assert _max_diff(legacy_built, "gpt2_v0", hf_logits(result["save"], tokens)) <= TOL


def test_format_torch_single_file(exported, legacy_built):
    from transformers import AutoConfig, AutoModelForCausalLM

    result = exported["torch"]
    assert result["ok"], result.get("error")
    folder = result["save"]
    assert not list(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists()
    data = torch.load(folder / "model.pt", weights_only=True)  # plain tensors and plain config values
    assert set(data) == {"model_state_dict", "model_config"}
    config = AutoConfig.for_model(**data["model_config"])
    model = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict(data["model_state_dict"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to transformer.wte.weight
    model.tie_weights()
    ref = torch.load(legacy_built / "refs" / "gpt2_v3.pt")
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    assert (logits - ref["logits"]).abs().max().item() <= TOL


def test_qkv_row_orders_of_each_checkpoint_version():
    # two heads, head_dim 2; label rows (part, head, dim); megatron-core order is [np, 3, hn]
    core = [(p, h, d) for h in range(2) for p in "qkv" for d in range(2)]
    stored = {
        0.0: [(p, h, d) for p in "qkv" for h in range(2) for d in range(2)],  # [3, np, hn]
        1.0: [(p, h, d) for h in range(2) for d in range(2) for p in "qkv"],  # [np, hn, 3]
        3.0: core,
    }
    for version, rows in stored.items():
        t = torch.tensor([core.index(r) for r in rows], dtype=torch.float32)
        assert _qkv_to_core(t, version, 2).tolist() == list(range(12)), version
        w = t[:, None].expand(12, 3)  # weights: the same reordering of whole rows
        assert _qkv_to_core(w, version, 2)[:, 2].tolist() == list(range(12)), version


def test_gpt2_family_inference_and_round_trip():
    args = megatron_args(**FIXTURES["gpt2"].args)
    spec = spec_from_args(args).with_vocab(250)
    family = pick_family(FAMILIES, spec, None)
    assert family.architecture == "GPT2LMHeadModel" and spec.activation == "gelu_fast"
    qkv = torch.randn(3 * 64, 64)
    (c_attn,) = FUSED_QKV.export(qkv, spec)
    assert c_attn.shape == (64, 192)
    # HF c_attn columns are [q | k | v], each all heads; megatron rows are per head [q_h, k_h, v_h]
    head0_k = qkv[16:32]
    assert torch.equal(c_attn[:, 64:80], head0_k.T)
    assert torch.equal(FUSED_QKV.import_((c_attn,), spec), qkv)
    w = torch.randn(256, 64)
    assert torch.equal(CONV1D.import_(CONV1D.export(w, spec), spec), w)
    with pytest.raises(DistconvError, match="plain_mha=False"):
        pick_family(FAMILIES, spec_from_args(megatron_args(**{**FIXTURES["gpt2"].args, "group_query_attention": True, "num_query_groups": 2})), None)


def test_pre_2023_rope_flag_is_read():
    args = megatron_args()
    del args.position_embedding_type
    args.use_rotary_position_embeddings = True
    assert spec_from_args(args).position_embedding == "rope"
    args.use_rotary_position_embeddings = False
    assert spec_from_args(args).position_embedding == "learned_absolute"


def _expected_legacy_bytes(name: str) -> int:
    """Model bytes computed from the HF original: its parameters plus Megatron's vocab padding."""
    model = hf_model(LEGACY_FIXTURES[name])
    tied = getattr(model.config, "tie_word_embeddings", True)
    total = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    pad = (PADDED_VOCAB - VOCAB) * model.config.hidden_size * (1 if tied else 2)
    return 4 * (total + pad)


@pytest.mark.parametrize("name", list(LEGACY_FIXTURES))
def test_inspect_legacy(legacy_built, name):
    fx = LEGACY_FIXTURES[name]
    expected_bytes = _expected_legacy_bytes(name)
    for tp, pp in fx.layouts:
        report = inspect_checkpoint(legacy_built / name / f"tp{tp}pp{pp}")
        assert report["format"] == "legacy"
        assert report["checkpoint_version"] == (fx.version or 0.0)
        assert report["iteration"] == fx.iteration
        assert (report["layout"]["tensor_model_parallel_size"], report["layout"]["pipeline_model_parallel_size"]) == (tp, pp)
        assert report["hf_family"] == ARCH[fx.family]
        assert report["model_bytes"] == expected_bytes == sum(t["bytes"] for t in report["tensors"])
        assert report["other_bytes"] > 2 * expected_bytes  # Adam moments and RNG state, never read
        names = {t["name"] for t in report["tensors"]}
        assert "decoder.layers.3.self_attention.linear_qkv.weight" in names
        assert ("output_layer.weight" in names) is (fx.family == "llama")


@pytest.mark.parametrize("name", list(FIXTURES))
def test_inspect_torch_dist(built, name):
    fx = FIXTURES[name]
    layouts = [parallel(layout) for layout in fx.layouts]
    reports = [inspect_checkpoint(layout_dir(built, name, *layout)) for layout in layouts]
    # mistral has no sliding window in its args, so without --hf-config it is a Llama
    expected = {"llama": "LlamaForCausalLM", "llama_tied_mqa": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel",
                "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v3_q_proj": "DeepseekV3ForCausalLM",
                "glm4_moe": "Glm4MoeForCausalLM", "glm4_moe_plain": "Glm4MoeForCausalLM",
                "gpt_oss": "GptOssForCausalLM", "gpt_oss_square": "GptOssForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM"}
    for (tp, pp, ep, _), report in zip(layouts, reports):
        assert report["format"] == "torch_dist" and report["iteration"] == fx.iteration
        lay = report["layout"]
        assert (lay["tensor_model_parallel_size"], lay["pipeline_model_parallel_size"], lay["expert_model_parallel_size"]) == (tp, pp, ep)
        if name in expected:  # fixtures added later by other features are checked by their own tests
            assert report["hf_family"] == expected[name]
        assert report["model_bytes"] == sum(t["bytes"] for t in report["tensors"])
        assert report["other_bytes"] >= 2 * report["model_bytes"]  # the fixtures carry Adam moments
        # global names, shapes and sizes do not depend on the training layout
        assert report["tensors"] == reports[0]["tensors"]
    a = megatron_args(**fx.args)
    layers = {t["name"]: t["shape"] for t in reports[0]["tensors"]}
    assert layers["embedding.word_embeddings.weight"] == [a.padded_vocab_size, a.hidden_size]
    if not a.num_experts and not a.experimental_attention_variant:  # dense layers are stacked along a leading
        # num_layers axis (a gated delta net model's, different from layer to layer, are not)
        assert layers["decoder.layers.self_attention.linear_proj.weight"][0] == a.num_layers


def test_inspect_cli_text_and_json(legacy_built, built):
    proc = distconv_cli("inspect", str(legacy_built / "gpt2_v0.zip"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "format       legacy (checkpoint_version 0.0)" in proc.stdout
    assert "HF family    GPT2LMHeadModel" in proc.stdout
    assert "embedding.position_embeddings.weight" in proc.stdout and "optimizer and other state" in proc.stdout
    proc = distconv_cli("inspect", str(layout_dir(built, "qwen3", 2, 2)), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["hf_family"] == "Qwen3ForCausalLM" and report["format"] == "torch_dist"


def test_missing_rank_file_is_one_clean_error(legacy_built, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(legacy_built / "gpt2_v1" / "tp2pp2", root)
    (root / "iter_0000050" / "mp_rank_01_001" / "model_optim_rng.pt").unlink()
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), nproc=2, timeout=180)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("distconv: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "mp_rank_01_001" in errors[0] and "missing" in errors[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "distconv-partial" in p.name]


def test_untrusted_pickle_in_a_rank_file_is_refused(legacy_built, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(legacy_built / "gpt2_v3" / "tp1pp1", root)
    path = root / "iter_0000050" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["opt_param_scheduler"] = pickle.PickleError("not on the allow-list")  # any foreign global
    torch.save(state, path)
    with pytest.raises(DistconvError, match="cannot read .*mp_rank_00"):
        describe(root)


def test_unknown_legacy_tensor_is_named(legacy_built, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(legacy_built / "gpt2_v3" / "tp1pp1", root)
    path = root / "iter_0000050" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["language_model"]["encoder"]["layers.0.mystery.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(DistconvError, match="layers.0.mystery.weight"):
        describe(root)


def test_zip_with_two_checkpoints_is_refused(legacy_built, tmp_path):
    bad = tmp_path / "two.zip"
    src = legacy_built / "gpt2_v3" / "tp1pp1" / "iter_0000050" / "mp_rank_00" / "model_optim_rng.pt"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.write(src, "release/mp_rank_00/model_optim_rng.pt")
        zf.write(src, "iter_0000010/mp_rank_00/model_optim_rng.pt")
    with pytest.raises(DistconvError, match="more than one checkpoint"):
        describe(bad)


def test_verify_reads_legacy_checkpoints(legacy_built, tmp_path):
    """verify loads legacy files (QKV order of checkpoint_version 1.0, TP2 PP2, virtual pipeline
    chunks) into megatron-core and says so; an export of other weights is a mismatch."""
    from distconv.verify import verify

    loads = {"v1": legacy_built / "gpt2_v1" / "tp2pp2", "vpp": legacy_built / "gpt2_v3" / "tp2pp2vpp2",
             "llama": legacy_built / "llama_v3" / "tp2pp2"}
    results = run_export_jobs(1, [{"load": str(load), "save": str(tmp_path / name)} for name, load in loads.items()], tmp_path)
    assert all(r["ok"] for r in results), results
    good = distconv_cli("verify", "--load", str(loads["v1"]), "--hf", str(tmp_path / "v1"), "--tol", "1e-4", "--json")
    assert good.returncode == 0, good.stderr[-3000:]
    result = json.loads(good.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["max_abs_diff"] <= 1e-4 and result["format"] == "legacy"
    for name in ("vpp", "llama"):
        result = verify(loads[name], tmp_path / name, tol=1e-4)
        assert result["ok"] and result["format"] == "legacy", (name, result)
    bad = distconv_cli("verify", "--load", str(loads["v1"]), "--hf", str(tmp_path / "vpp"), "--tol", "1e-4")
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "MISMATCH" in bad.stdout and "(legacy checkpoint)" in bad.stdout
