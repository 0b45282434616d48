"""End to end: real megatron-core checkpoints -> distconv export -> transformers logits.

The proof of a mapping is that transformers' logits on the exported folder equal
megatron-core's own forward pass (recorded when the checkpoint was built) on the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import distconv_cli, hf_logits, run_export_jobs
from fixtures.build import FIXTURES, layout_dir
from mtp_reference import qwen3_next_mtp_logits

TOL = 1e-4
DENSE = [name for name, fx in FIXTURES.items() if not fx.args.get("num_experts")]  # MoE: test_moe.py
CASES = [(name, tp, pp) for name in DENSE for tp, pp in FIXTURES[name].layouts]
TRAINING_WORLD = 4  # the fixtures are saved by 4 ranks (TP x PP x DP = 4)
OTHER_WORLD = 2


def mistral_config(out: Path) -> Path:
    """An HF Mistral config written by hand from the mistral fixture's Megatron args."""
    a = FIXTURES["mistral"].args
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "vocab_size": a["vocab_size"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": a["layernorm_epsilon"], "rope_theta": float(a["rotary_base"]),
        "max_position_embeddings": 128, "sliding_window": None, "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    path = out / "mistral_config.json"
    path.write_text(json.dumps(config))
    return path


def _job(built: Path, out: Path, name: str, tp: int, pp: int, world: int, **extra) -> dict:
    job = {"load": str(layout_dir(built, name, tp, pp)), "save": str(out / f"{name}_tp{tp}pp{pp}_w{world}"), **extra}
    if name == "mistral":
        job["hf_config"] = str(mistral_config(out))
    return job


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory) -> dict[tuple, dict]:
    """Every case exported at the training world size and at another, in two torchrun launches."""
    out = tmp_path_factory.mktemp("exports")
    done: dict[tuple, dict] = {}
    for world in (TRAINING_WORLD, OTHER_WORLD):
        keys = [(n, tp, pp, world) for n, tp, pp in CASES]
        jobs = [_job(built, out, *k) for k in keys]
        extra = {}
        if world == OTHER_WORLD:
            extra = {
                ("llama", 2, 1, world, "bf16"): _job(built, out / "bf16", "llama", 2, 1, world, dtype="bf16"),
                ("llama", 2, 2, world, "shards"): _job(built, out / "shards", "llama", 2, 2, world, max_shard_size="200KB"),
                ("qwen3", 2, 2, world, "writers"): _job(built, out / "writers", "qwen3", 2, 2, world, writers=2,
                                                        max_shard_size="100KB", window="60KB"),
                ("qwen3", 2, 2, world, "read-at-writer"): _job(built, out / "read-at-writer", "qwen3", 2, 2, world,
                                                               writers=2, read_at="writer", window="60KB"),
                ("llama", 2, 2, world, "stuck"): _job(built, out / "stuck", "llama", 2, 2, world, stuck_writer=True,
                                                      timeout_s=10),
                ("qwen3_5", 2, 2, world, "wrong"): _job(built, out / "wrong", "qwen3_5", 2, 2, world,
                                                        wrong_mapping="out_norm_offset_missing"),
            }
        results = run_export_jobs(world, jobs + list(extra.values()), out)
        for key, job, result in zip(keys + list(extra), jobs + list(extra.values()), results):
            done[key] = {**result, "save": Path(job["save"])}
    return done


def _check_logits(built: Path, name: str, folder: Path) -> float:
    ref = torch.load(built / "refs" / f"{name}.pt")
    logits = hf_logits(folder, ref["tokens"])
    vocab = logits.shape[-1]
    # megatron's padded vocab rows are not part of the model; compare the real ones
    return (logits - ref["logits"][..., :vocab]).abs().max().item()


@pytest.mark.parametrize("world", [TRAINING_WORLD, OTHER_WORLD], ids=["training-world", "other-world"])
@pytest.mark.parametrize("name,tp,pp", CASES, ids=[f"{n}-tp{t}pp{p}" for n, t, p in CASES])
def test_logits_match_megatron(exported, built, name, tp, pp, world):
    result = exported[(name, tp, pp, world)]
    assert result["ok"], result.get("error")
    assert result["group_alive"], "export must leave the caller's process group as it was"
    assert _check_logits(built, name, result["save"]) <= TOL


def test_dense_qwen3_5_carries_its_layout_and_a_wrong_norm_offset_fails(exported, built):
    """Dense Qwen3.5 (gated delta net, every MLP dense, an MTP layer): the config says which layers are
    linear attention, has no experts and counts the MTP layer, whose logits (``mtp.*``, as released;
    TP2 x PP2, on the last stage) equal megatron-core's by the MTP formula; the same export with the
    gated delta net's output norm copied without its +1 (``wrong_mapping``; every name and shape
    right) is rejected by the logits."""
    folder = exported[("qwen3_5", 2, 2, OTHER_WORLD)]["save"]
    config = json.loads((folder / "config.json").read_text())
    assert config["mtp_num_hidden_layers"] == 1
    ref = torch.load(built / "refs" / "qwen3_5.pt")
    mtp = qwen3_next_mtp_logits(folder, ref["tokens"])
    assert (mtp - ref["mtp_logits"][0][..., : mtp.shape[-1]]).abs().max().item() <= TOL
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert (config["model_type"], config["intermediate_size"], config["head_dim"]) == ("qwen3_5_text", 128, 32)
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.25 and "num_experts" not in config
    wrong = exported[("qwen3_5", 2, 2, OTHER_WORLD, "wrong")]
    assert wrong["ok"], wrong.get("error")
    assert _check_logits(built, "qwen3_5", wrong["save"]) > 100 * TOL


@pytest.mark.parametrize("name", DENSE)
def test_folder_is_a_complete_hf_model(exported, name):
    folder = exported[(name, 2, 2, TRAINING_WORLD)]["save"]
    config = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    expected_arch = {"llama": "LlamaForCausalLM", "llama_tied_mqa": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel",
                     "qwen3_5": "Qwen3_5ForCausalLM"}[name]
    assert config["architectures"] == [expected_arch]
    tied = not FIXTURES[name].args.get("untie_embeddings_and_output_weights", True)
    assert config["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in index["weight_map"]) is (not tied)
    total = 0
    for tensor_name, file in index["weight_map"].items():
        with safe_open(str(folder / file), "pt") as f:
            t = f.get_tensor(tensor_name)
            total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert (folder / "generation_config.json").exists()
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir() if "distconv" in p.name)


def test_vocab_trimmed_from_the_right_source(exported):
    # llama: the tokenizer (250 of 256 rows); mistral: --hf-config; qwen3: nothing known, padded kept
    llama = exported[("llama", 1, 1, TRAINING_WORLD)]["report"]
    mistral = exported[("mistral", 1, 1, TRAINING_WORLD)]["report"]
    qwen3 = exported[("qwen3", 1, 1, TRAINING_WORLD)]["report"]
    assert (llama["vocab_size"], mistral["vocab_size"], qwen3["vocab_size"]) == (250, 250, 256)
    assert "tokenizer" in llama["vocab_source"] and "hf-config" in mistral["vocab_source"]
    folder = exported[("llama", 1, 1, TRAINING_WORLD)]["save"]
    assert (folder / "tokenizer.json").exists()
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 250


def test_dtype_auto_keeps_bf16_training_dtype(exported):
    folder = exported[("qwen2", 2, 2, OTHER_WORLD)]["save"]
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    with safe_open(str(folder / "model-00001-of-00001.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_bf16_output_is_the_fp32_export_rounded(exported):
    bf16 = exported[("llama", 2, 1, OTHER_WORLD, "bf16")]
    fp32 = exported[("llama", 2, 1, OTHER_WORLD)]
    assert bf16["ok"], bf16.get("error")
    ref = _tensors(fp32["save"])
    got = _tensors(bf16["save"])
    assert set(got) == set(ref)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, ref[name].to(torch.bfloat16)), name
    assert json.loads((bf16["save"] / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_max_shard_size_splits_files(exported, built):
    result = exported[("llama", 2, 2, OTHER_WORLD, "shards")]
    assert result["ok"], result.get("error")
    folder = result["save"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    for file in files:  # each file's tensor bytes stay under the limit unless one tensor alone exceeds it
        tensors = _tensors(folder, only=file)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 200_000 or len(tensors) == 1
    assert _check_logits(built, "llama", folder) <= TOL


def test_parallel_writers_and_small_windows(exported, built):
    """--writers 2: both ranks write their own files; tiny --window splits layers into groups."""
    result = exported[("qwen3", 2, 2, OTHER_WORLD, "writers")]
    assert result["ok"], result.get("error")
    index = json.loads((result["save"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert _check_logits(built, "qwen3", result["save"]) <= TOL


def test_writers_reading_their_units_themselves(exported, built):
    """--read-at writer: each of the 2 writers reads its own units' chunks, whichever rank saved
    them, and nothing is gathered; the same export by the savers' positions gathers the TP halves
    the other rank holds. Both give megatron-core's logits."""
    saver = exported[("qwen3", 2, 2, OTHER_WORLD, "writers")]
    result = exported[("qwen3", 2, 2, OTHER_WORLD, "read-at-writer")]
    assert saver["ok"] and result["ok"], result.get("error")
    saver, report = saver["report"], result["report"]
    assert saver["bytes_gathered"] > 0 and report["bytes_gathered"] == 0
    assert all(r["bytes_read_planned"] > 0 for r in report["ranks"])
    assert report["bytes_read_planned"] == saver["bytes_read_planned"]
    assert _check_logits(built, "qwen3", result["save"]) <= TOL


def test_stuck_writer_fails_every_rank_in_bounded_time(exported):
    """The writer thread's fsync hangs (tests/export_jobs.py ``stuck_writer``): the main thread stops
    waiting after half of ``--timeout`` (10 s here), every rank raises the one message, the caller's
    group stays usable, and nothing is left at --save."""
    result = exported[("llama", 2, 2, OTHER_WORLD, "stuck")]
    assert not result["ok"]
    assert "made no progress for 5 s" in result["error"] and "fsync" in result["error"]
    assert result["rank_errors"] == [result["error"]] * OTHER_WORLD
    assert result["seconds"] < 60, result["seconds"]  # planning + 5 s, not forever
    assert result["group_alive"]
    parent = result["save"].parent  # neither the output nor its hidden run folder is left
    assert not parent.exists() or not list(parent.iterdir())


def test_cli_single_process_without_torchrun(built, tmp_path):
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(layout_dir(built, "qwen3", 2, 2)), "--save", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Qwen3ForCausalLM (inferred from args)" in proc.stdout
    assert _check_logits(built, "qwen3", out) <= TOL


def test_cli_torchrun_iteration_folder_and_overwrite(built, tmp_path):
    """--load may name one iteration folder; a non-empty --save needs --overwrite."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    load = layout_dir(built, "llama_tied_mqa", 2, 2) / "release"
    proc = distconv_cli("export", "--load", str(load), "--save", str(out), nproc=2)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    proc = distconv_cli("export", "--load", str(load), "--save", str(out), "--overwrite", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "stale.txt").exists()
    assert _check_logits(built, "llama_tied_mqa", out) <= TOL


def _tensors(folder: Path, only: str | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        if only and file.name != only:
            continue
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
