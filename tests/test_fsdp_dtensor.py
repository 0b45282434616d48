"""``--ckpt-format fsdp_dtensor`` (Megatron-FSDP) and ``torch_dcp`` (FSDP2) -> HF, model-free.

The saves are NOT written by Megatron-FSDP itself: it does not run on a CPU (its constructor calls
``torch.cuda.current_device()``; ``validate_uneven_dtensor`` calls ``.cuda()``). They are written
with torch's DCP and DTensor under gloo (2 ranks), laid out as Megatron-FSDP lays them out, from
megatron-core 0.16.1's own buffer and checkpoint code (``tests/fixtures/fsdp_dtensor.py`` says
what comes from where). The weights are the llama and mixtral fixtures', whose megatron-core
logits were recorded when they were built: the export must reproduce them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import hf_logits, torchrun
from distconv import export
from distconv.cli import main
from distconv.megatron import fsdp_dtensor
from distconv.megatron.checkpoint import read_dcp_metadata
from distconv.megatron.source import describe

TOL = 1e-4
ITER = "iter_0000100"


@pytest.fixture(scope="module")
def saves(built, tmp_path_factory) -> Path:
    """Every save of ``fixtures.fsdp_dtensor.SAVES``, in one torchrun launch of 2 ranks."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(2, "-m", "tests.fixtures.fsdp_dtensor", "--built", str(built), "--out", str(out), timeout=900)
    return out


def _logits_error(saves: Path, built: Path, name: str, reference: str, out: Path) -> float:
    export(saves / name, out, quiet=True, vocab_size=256)
    ref = torch.load(built / "refs" / f"{reference}.pt")
    logits = hf_logits(out, ref["tokens"])
    return (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item()


@pytest.mark.parametrize("name,reference", [("llama_fsdp", "llama"), ("mixtral_fsdp", "mixtral"), ("llama_dcp", "llama")])
def test_export_reproduces_megatron_core_logits(saves, built, tmp_path, name, reference):
    assert _logits_error(saves, built, name, reference, tmp_path / "hf") <= TOL


def test_swapped_swiglu_halves_are_caught_by_the_logits(saves, built, tmp_path, monkeypatch):
    """The deliberately broken reading: ``_v`` taken as the gate and ``_w`` as the up projection."""
    joined = fsdp_dtensor._joined
    monkeypatch.setattr(fsdp_dtensor, "_joined", lambda folder, base, pair: joined(folder, base, {"w": pair["v"], "v": pair["w"]}))
    assert _logits_error(saves, built, "llama_fsdp", "llama", tmp_path / "hf") > 100 * TOL


def test_the_saves_hold_what_megatron_fsdp_writes(saves):
    """What the reader is proven on: uneven chunks (ranks holding different row counts, some none),
    ``model.module.`` keys, SwiGLU halves and global per-expert keys, no ``_extra_state``, args as bytes."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    meta = read_dcp_metadata(saves / "mixtral_fsdp" / ITER).state_dict_metadata
    model = {k: m for k, m in meta.items() if isinstance(m, TensorStorageMetadata) and k.startswith("model.")}
    assert model and all(k.startswith("model.module.decoder.") or k.startswith(("model.module.embedding.", "model.module.output_layer."))
                         for k in model)
    assert not any("_extra_state" in k for k in meta)
    assert isinstance(meta["args"], BytesStorageMetadata)
    assert "model.module.decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight_v" in model
    sizes = [tuple(c.sizes[0] for c in m.chunks) for m in model.values()]
    assert any(len(s) == 2 and s[0] != s[1] for s in sizes), "some tensor is split unevenly over the two ranks"
    assert any(len(s) == 1 for s in sizes), "some tensor lies on one rank only (the other writes no chunk)"


@pytest.mark.parametrize("name,needle", [
    ("llama_fsdp_no_swiglu_args", "is saved as SwiGLU halves (_w, _v), but args.swiglu is not set"),
    ("llama_dcp_said_fsdp", "args.ckpt_format is fsdp_dtensor (keys under 'model.module.'), but the checkpoint has keys under 'model.'"),
])
def test_args_that_contradict_the_keys_are_refused(saves, tmp_path, capsys, name, needle):
    capsys.readouterr()
    assert main(["export", "--load", str(saves / name), "--save", str(tmp_path / "hf"), "--quiet"]) == 1
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("distconv: error:")]
    assert len(errors) == 1 and needle in errors[0], errors
    assert not (tmp_path / "hf").exists()


def test_inspect_names_the_format(saves, capsys):
    assert main(["inspect", str(saves / "llama_fsdp"), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "fsdp_dtensor" and report["args"]["ckpt_format"] == "fsdp_dtensor"
    assert "decoder.layers.0.mlp.linear_fc1.weight" in {t["name"] for t in report["tensors"]}


def test_reshard_to_torch_dist_keeps_the_weights_and_verify_says_to(saves, built, tmp_path, capsys):
    """A reshard reads the save like an export does and writes torch_dist (here at TP2), whose export
    still gives megatron-core's logits; verify, which loads through megatron-core, names the way."""
    from distconv import reshard

    reshard(saves / "llama_fsdp", tmp_path / "tp2", tp=2, quiet=True)
    assert _logits_error(tmp_path, built, "tp2", "llama", tmp_path / "hf") <= TOL
    assert describe(tmp_path / "tp2", None).args.ckpt_format == "torch_dist"  # not the source's fsdp_dtensor
    capsys.readouterr()
    assert main(["verify", "--load", str(saves / "llama_fsdp"), "--hf", str(tmp_path / "hf")]) == 1
    assert "`distconv reshard` writes it as torch_dist" in capsys.readouterr().err
