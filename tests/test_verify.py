"""``distconv verify`` streamed layer by layer: it agrees with megatron-core's whole-model forward
(the reference logits recorded when each fixture was built) and with transformers' whole-model
``from_pretrained`` on every family it is run on, and names the layer a wrong tensor is in."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import distconv_cli, hf_logits, run_export_jobs
from fixtures.build import layout_dir

TOL = 1e-4
SAME = 1e-6  # the streamed path against the whole models: the same numbers but for summation order
FAMILIES = ["llama", "gpt2", "qwen3", "mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe", "deepseek_v32", "gpt_oss"]


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


def test_verify_builds_one_decoder_layer_of_each_model_at_a_time(built, exports):
    """While verify runs the 4 layers of llama, each side's decoder layer class has one instance at
    a time (counted in the thread that builds and runs that side's layers, after a collection):
    megatron-core's model is built a pipeline stage of one layer at a time, the export's a layer at
    a time. A model built whole would show 4."""
    import gc

    from megatron.core.transformer.transformer_layer import TransformerLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from distconv.verify import verify

    most = {TransformerLayer: 0, LlamaDecoderLayer: 0}

    def count(module: torch.nn.Module, args: tuple) -> None:
        if type(module) in most:
            gc.collect()
            most[type(module)] = max(most[type(module)], sum(type(o) is type(module) for o in gc.get_objects()))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        result = verify(layout_dir(built, "llama", 1, 1), exports / "llama", sequences=1, length=8, tol=TOL)
    finally:
        handle.remove()
    assert result["ok"] and len(result["layers"]) == 4, result
    assert most == {TransformerLayer: 1, LlamaDecoderLayer: 1}


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


@contextlib.contextmanager
def experts_materialized():
    """Each routed-experts parameter transformers' loader puts into a model while this is open:
    (module name, parameter, its experts, its bytes, the most experts any of that module's
    parameters hold then)."""
    import transformers.core_model_loading as loading

    seen: list[tuple[str, str, int, int, int]] = []
    real = loading.set_param_for_module

    def record(model, target, value, *args, **kwargs):
        module, _, param = target.rpartition(".")
        if module.endswith(".experts"):
            held = [p.shape[0] for name, p in model.get_submodule(module).named_parameters(recurse=False)
                    if p.device.type != "meta" and name != param]
            seen.append((module, param, value.shape[0], value.numel() * value.element_size(), max([value.shape[0], *held])))
        return real(model, target, value, *args, **kwargs)

    with mock.patch.object(loading, "set_param_for_module", record):
        yield seen


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_verify_reads_routed_experts_a_window_at_a_time(built, exports, name, capsys):
    """``--window`` of 2.5 experts' fp32 bytes: transformers' side holds at most 2 experts of a layer
    at once, reads each expert once, and gives the same layer and logit differences as the default
    window, which holds every expert of these small models at once (per-expert hub keys fused by
    transformers' loader; gpt-oss's stacked keys, with biases; shared experts beside the routed)."""
    from distconv.cli import main

    def run(*flags: str) -> tuple[dict, list[tuple[str, str, int, int, int]]]:
        with experts_materialized() as seen:
            code = main(["verify", "--load", str(layout_dir(built, name, 1, 1)), "--hf", str(exports / name),
                         "--tol", str(TOL), "--json", *flags])
        assert code == 0
        return json.loads(capsys.readouterr().out), seen

    default, whole = run()
    module, _, count, _, _ = whole[0]
    assert count > 2 and all(n == count for _, _, n, _, _ in whole), whole  # the default reads a layer's whole
    expert = sum(size for m, _, _, size, _ in whole if m == module) // count
    small, seen = run("--window", str(2 * expert + expert // 2))
    assert seen and max(held for *_, held in seen) <= 2 and max(n for _, _, n, _, _ in seen) <= 2, seen
    for key in {(m, p) for m, p, *_ in whole}:  # every expert of every parameter once
        assert sum(n for m, p, n, _, _ in seen if (m, p) == key) == count, (key, seen)
    assert default["ok"] and small["ok"], (default, small)
    assert abs(default["max_abs_diff"] - small["max_abs_diff"]) <= SAME
    assert len(default["layers"]) == len(small["layers"])
    assert all(abs(a["max_abs_diff"] - b["max_abs_diff"]) <= SAME for a, b in zip(default["layers"], small["layers"]))


def test_verify_reads_experts_it_cannot_window_whole_or_says_so(built, exports, tmp_path):
    """transformers' eager experts functions (the export's config asks for them) are not windowed
    (gpt-oss's fails on expert ids past its own): a layer's experts are read whole with it when they
    fit in ``--window``, with the same result; otherwise the error names the module and the window."""
    from distconv.errors import DistconvError
    from distconv.verify import verify

    eager = tmp_path / "mixtral"
    shutil.copytree(exports / "mixtral", eager)
    config = json.loads((eager / "config.json").read_text())
    (eager / "config.json").write_text(json.dumps({**config, "experts_implementation": "eager"}))
    load = layout_dir(built, "mixtral", 1, 1)
    with experts_materialized() as seen:
        result = verify(load, eager, sequences=2, length=8, tol=TOL)
    assert result["ok"] and seen and all(n == 4 for _, _, n, _, _ in seen), seen
    assert abs(result["max_abs_diff"] - verify(load, exports / "mixtral", sequences=2, length=8, tol=TOL)["max_abs_diff"]) <= SAME
    with pytest.raises(DistconvError, match=r"model\.layers\.0\.mlp\.experts \(MixtralExperts\) cannot be read a window "
                       r"of experts at a time \(its experts implementation 'eager' .* give --window 98304 or more"):
        verify(load, eager, sequences=2, length=8, tol=TOL, window="64KiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA runs verify --device cuda (tests/gpu/check.py)")
def test_verify_on_cuda_without_a_gpu_says_so(tmp_path, capsys):
    """``--device cuda`` where torch sees no GPU: one message, before anything is read."""
    from distconv.cli import main

    assert main(["verify", "--load", str(tmp_path / "none"), "--hf", str(tmp_path / "none"), "--device", "cuda"]) != 0
    assert "--device cuda: torch sees no CUDA device here" in capsys.readouterr().err
