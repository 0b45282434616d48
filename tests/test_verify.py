"""``distconv verify`` streamed layer by layer: it agrees with megatron-core's whole-model forward
(the reference logits recorded when each fixture was built) and with transformers' whole-model
``from_pretrained`` on every family it is run on, and names the layer a wrong tensor is in."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import distconv_cli, hf_logits, run_export_jobs
from fixtures.build import layout_dir

TOL = 1e-4
SAME = 1e-6  # the streamed path against the whole models: the same numbers but for summation order
FAMILIES = ["llama", "gpt2", "qwen3", "mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe", "deepseek_v32"]


@pytest.fixture(scope="module")
def exports(built, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify")
    jobs = [{"load": str(layout_dir(built, name, 1, 1)), "save": str(out / name)} for name in FAMILIES]
    results = run_export_jobs(1, jobs, out)
    assert all(r["ok"] for r in results), results
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_streamed_verify_agrees_with_the_whole_models(built, exports, name):
    """megatron-core's streamed logits are its recorded whole-model ones, the export's are
    transformers' ``from_pretrained`` ones, so the max |diff| verify reports is the whole models'."""
    from distconv.megatron.source import describe
    from distconv.verify import compare

    ref = torch.load(built / "refs" / f"{name}.pt")
    result, ours, theirs = compare(describe(layout_dir(built, name, 1, 1)), exports / name, ref["tokens"], tol=TOL)
    whole = hf_logits(exports / name, ref["tokens"])
    vocab = whole.shape[-1]
    assert (ours - ref["logits"]).abs().max().item() <= SAME
    assert (theirs - whole).abs().max().item() <= SAME
    assert abs(result["max_abs_diff"] - (whole - ref["logits"][..., :vocab]).abs().max().item()) <= SAME
    assert result["ok"] and result["first_mismatch"] is None, result
    assert [layer["megatron"] for layer in result["layers"]] == [f"decoder.layers.{i}" for i in range(len(result["layers"]))]
    assert all(layer["max_abs_diff"] <= TOL for layer in result["layers"]) and result["embedding_max_abs_diff"] <= TOL


@pytest.mark.parametrize("name,tensor", [("llama", "self_attn.o_proj.weight"), ("mixtral", "block_sparse_moe.experts.1.w2.weight")])
def test_verify_names_the_layer_a_swapped_tensor_is_in(built, exports, tmp_path, name, tensor):
    """One layer's tensor replaced by another layer's: layers before it agree, it is the first named."""
    from distconv.verify import verify

    wrong = tmp_path / name
    shutil.copytree(exports / name, wrong)
    shard = next(wrong.glob("*.safetensors"))
    tensors = load_file(shard)
    a, b = f"model.layers.1.{tensor}", f"model.layers.0.{tensor}"
    tensors[a] = tensors[b].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    load = layout_dir(built, name, 1, 1)
    result = verify(load, wrong, sequences=2, length=8, tol=TOL)
    assert not result["ok"] and result["first_mismatch"] == {"megatron": "decoder.layers.1", "hf": "model.layers.1"}, result
    assert result["layers"][0]["max_abs_diff"] <= TOL < result["layers"][1]["max_abs_diff"]
    if name == "llama":  # the command says it too, and fails
        text = distconv_cli("verify", "--load", str(load), "--hf", str(wrong), "--tol", str(TOL), "--sequences", "2",
                            "--length", "8")
        assert text.returncode == 1 and "first layer beyond the tolerance: decoder.layers.1 / model.layers.1" in text.stdout, \
            text.stdout + text.stderr[-3000:]
