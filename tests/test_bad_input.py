"""Bad input: one readable message from rank 0, non-zero exit on every rank, nothing left behind."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distconv.directions.export import nonfinite_count

from conftest import distconv_cli
from fixtures.build import layout_dir


def _copy(built: Path, name: str, tp: int, pp: int, dst: Path) -> Path:
    root = dst / f"{name}_tp{tp}pp{pp}"
    shutil.copytree(layout_dir(built, name, tp, pp), root)
    return root


def _assert_clean_failure(proc, out: Path, *needles: str) -> None:
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("distconv: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]  # one message, from rank 0 only
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists(), "no output folder may be left behind"
    assert not [p for p in out.parent.iterdir() if "distconv-partial" in p.name]
    if "torch.distributed.run" in proc.args:
        # torchrun reports each rank's exit status: every rank ended non-zero (none hung); the
        # first to exit exits 1 by itself, torchrun may then stop the others, which are exiting too
        codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", proc.stderr))
        assert sorted(codes) == [str(r) for r in range(nproc_of(proc))], proc.stderr[-3000:]
        assert all(int(c) != 0 for c in codes.values()) and "1" in codes.values()


def nproc_of(proc) -> int:
    return int(next(a for a in proc.args if a.startswith("--nproc-per-node=")).split("=")[1])


def test_missing_shard_file_on_two_ranks(built, tmp_path):
    root = _copy(built, "llama", 2, 2, tmp_path)
    (root / "iter_0000100" / "__1_0.distcp").unlink()
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), nproc=2, timeout=120)
    _assert_clean_failure(proc, out, "__1_0.distcp", "missing")


def test_truncated_shard_file(built, tmp_path):
    root = _copy(built, "qwen3", 2, 2, tmp_path)
    shard = root / "iter_0000100" / "__2_1.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), timeout=120)
    _assert_clean_failure(proc, out, "__2_1.distcp", "truncated")


def test_not_a_megatron_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(tmp_path / "empty"), "--save", str(out), timeout=120)
    _assert_clean_failure(proc, out, "not a Megatron checkpoint")


def test_unfinished_save_is_refused(built, tmp_path):
    root = _copy(built, "llama", 1, 1, tmp_path)
    (root / "iter_0000100" / "metadata.json").unlink()
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), timeout=120)
    _assert_clean_failure(proc, out, "did not finish")


def _edit_args(root: Path, **changes) -> None:
    common = root / "iter_0000100" / "common.pt"
    state = torch.load(common, weights_only=False)  # our own fixture, trusted
    for k, v in changes.items():
        setattr(state["args"], k, v)
    torch.save(state, common)


def test_unsupported_architecture_on_two_ranks(built, tmp_path):
    root = _copy(built, "llama", 2, 1, tmp_path)
    _edit_args(root, normalization="LayerNorm")
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), nproc=2, timeout=120)
    _assert_clean_failure(proc, out, "LlamaForCausalLM", "normalization='LayerNorm'")


def test_learned_absolute_positions_are_refused(built, tmp_path):
    root = _copy(built, "llama", 1, 1, tmp_path)
    _edit_args(root, position_embedding_type="learned_absolute")
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), timeout=120)
    _assert_clean_failure(proc, out, "position_embedding='learned_absolute'")


def test_args_that_contradict_the_tensors(built, tmp_path):
    root = _copy(built, "llama", 1, 1, tmp_path)
    _edit_args(root, untie_embeddings_and_output_weights=False)
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), timeout=120)
    _assert_clean_failure(proc, out, "output_layer.weight")


@pytest.mark.parametrize("field,value,needle", [
    ("num_hidden_layers", 3, "num_hidden_layers: HF config 3, checkpoint 4"),
    ("num_key_value_heads", 4, "num_key_value_heads: HF config 4, checkpoint 2"),
])
def test_hf_config_conflict_names_both_values(built, tmp_path, field, value, needle):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 250,
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(layout_dir(built, "llama", 1, 1)), "--save", str(out),
                        "--hf-config", str(tmp_path / "config.json"), timeout=120)
    _assert_clean_failure(proc, out, needle)


def test_tokenizer_folder_in_args_that_does_not_load(built, tmp_path):
    root = _copy(built, "llama", 1, 1, tmp_path)
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(built / "tokenizer", tokenizer)
    (tokenizer / "tokenizer.json").write_text("garbage")
    _edit_args(root, tokenizer_model=str(tokenizer))
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), timeout=120)
    _assert_clean_failure(proc, out, f"args.tokenizer_model {tokenizer}: the folder does not load as an HF tokenizer")


def _poison(folder: Path, key: str, offsets: tuple[int, ...]) -> None:
    """Make the first value of one stored chunk NaN, in place: DCP stores each chunk as
    ``torch.save`` bytes at an offset, so the chunk is loaded, changed and saved back at its length."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex

    info = FileSystemReader(str(folder)).read_metadata().storage_data[MetadataIndex(key, torch.Size(offsets))]
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        chunk = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        chunk.view(-1)[0] = float("nan")
        data = io.BytesIO()
        torch.save(chunk, data)
        assert len(data.getvalue()) == info.length
        f.seek(info.offset)
        f.write(data.getvalue())


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_nonfinite_weights_are_refused_unless_allowed(built, tmp_path):
    root = _copy(built, "llama", 1, 1, tmp_path)
    _poison(root / "iter_0000100", "decoder.layers.self_attention.linear_proj.weight", (0, 0, 0))  # layer 0
    before = _digests(root)
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), nproc=2, timeout=180)
    _assert_clean_failure(proc, out, "NaN or Inf values in HF tensor model.layers.0.self_attn.o_proj.weight "
                          "(from Megatron decoder.layers.0.self_attention.linear_proj.weight): 1 of 4096: ", "--allow-nonfinite")
    assert _digests(root) == before

    report = tmp_path / "report.json"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), "--allow-nonfinite", "--quiet",
                        "--report", str(report), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {"model.layers.0.self_attn.o_proj.weight": 1}
    assert json.loads(report.read_text())["nonfinite"] == counts
    assert json.loads((out / "distconv.json").read_text())["report"]["nonfinite"] == counts
    assert "distconv: warning: exported 1 tensor(s) holding NaN or Inf" in proc.stderr
    weight = load_file(out / "model-00001-of-00001.safetensors")["model.layers.0.self_attn.o_proj.weight"]
    assert weight.isnan().sum() == 1


def test_nonfinite_count():
    assert nonfinite_count(torch.full((4,), 3e38)) == 0  # the sum overflows, the values are finite
    assert nonfinite_count(torch.tensor([1.0, float("nan"), float("-inf"), 0.0], dtype=torch.bfloat16)) == 2
    assert nonfinite_count(torch.arange(4)) == 0


def test_user_error_finds_the_cause_behind_dcp_and_megatron_wrappers():
    """One readable line: a DistconvError raised inside DCP's per-rank failures is kept as it is; an
    OSError behind them is its reason and file; otherwise the line naming the error."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from distconv.errors import DistconvError, user_error

    def raised(e: BaseException) -> BaseException:
        try:
            raise e
        except BaseException as caught:
            return caught

    inner = DistconvError("checkpoint shard /x/__1_0.distcp is truncated")
    wrapped = CheckpointException("write_data", {1: _wrap_exception(raised(inner))})
    assert user_error(wrapped, "writing") is inner
    full = CheckpointException("write_data", {0: _wrap_exception(raised(OSError(28, "No space left on device", "/d/f")))})
    assert str(user_error(full, "writing into /d")) == "writing into /d failed: No space left on device: /d/f"
    try:
        try:
            raise ValueError("Traceback stuff\nValueError: shape mismatch in layer 3")
        except ValueError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        assert str(user_error(e)) == "RuntimeError: save failed"
    assert str(user_error(ValueError("a\nKeyError: b"), "reading x")) == "reading x failed: KeyError: b"


def test_user_error_names_a_short_write_without_errno(tmp_path):
    """torch.save reports a write cut short by a size limit only as "unexpected pos"; the error
    says which limit when the folder being written shows it."""
    script = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from distconv.errors import user_error\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "folder = Path(sys.argv[1])\n"
        "try:\n"
        "    torch.save({'w': torch.zeros(100_000)}, folder / 'common.pt')\n"
        "except Exception as e:\n"
        "    print(user_error(e, 'writing', writing=folder))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("writing failed: File too large: a file under"), proc.stdout
    assert "(100000 bytes)" in proc.stdout, proc.stdout


def _poison_hf(folder: Path, name: str, value: float) -> None:
    """Set the first value of HF tensor ``name`` in its safetensors file."""
    from safetensors.torch import save_file

    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            t = tensors[name]
            t.view(-1)[0] = value if t.dtype != torch.float8_e4m3fn else torch.tensor(value).to(t.dtype)
            save_file(tensors, f, metadata={"format": "pt"})
            return
    raise AssertionError(f"{name} is in no file of {folder}")


def test_fp8_export_catches_nan_before_it_hides_in_a_block(built, tmp_path):
    """--dtype fp8: a NaN used to make its block's amax NaN, the scale 1 and the block's other values
    saturated; it is refused, and with --allow-nonfinite only that value is NaN."""
    from distconv.hf.fp8 import dequantize

    root = _copy(built, "llama", 1, 1, tmp_path)
    _poison(root / "iter_0000100", "decoder.layers.self_attention.linear_proj.weight", (0, 0, 0))  # layer 0
    out = tmp_path / "hf"
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), "--dtype", "fp8", timeout=180)
    _assert_clean_failure(proc, out, "NaN or Inf values in HF tensor model.layers.0.self_attn.o_proj.weight "
                          "(from Megatron decoder.layers.0.self_attention.linear_proj.weight): 1 of 4096", "--allow-nonfinite")
    proc = distconv_cli("export", "--load", str(root), "--save", str(out), "--dtype", "fp8", "--allow-nonfinite",
                        "--quiet", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean = tmp_path / "clean"
    proc = distconv_cli("export", "--load", str(_copy(built, "llama", 1, 1, clean)), "--save", str(clean / "hf"),
                        "--dtype", "fp8", "--quiet", timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = "model.layers.0.self_attn.o_proj.weight"
    got, want = load_file(out / "model-00001-of-00001.safetensors"), load_file(clean / "hf" / "model-00001-of-00001.safetensors")
    assert torch.isfinite(got[name + "_scale_inv"]).all()
    values, reference = (dequantize(t[name], t[name + "_scale_inv"]) for t in (got, want))
    assert values.isnan().sum() == 1 and values.view(-1)[0].isnan()
    assert torch.equal(values.view(-1)[1:], reference.view(-1)[1:]), "the NaN's block is quantized as without it"


@pytest.mark.parametrize("command", ["import", "reshard"])
def test_import_and_reshard_refuse_nonfinite_weights(built, tmp_path, command):
    root = _copy(built, "llama", 1, 1, tmp_path)
    if command == "reshard":
        _poison(root / "iter_0000100", "decoder.layers.self_attention.linear_proj.weight", (0, 0, 0))
        source, needle = root, "read from decoder.layers.self_attention.linear_proj.weight"
    else:
        source = tmp_path / "hf"
        assert distconv_cli("export", "--load", str(root), "--save", str(source), "--quiet").returncode == 0
        _poison_hf(source, "model.layers.1.mlp.down_proj.weight", float("inf"))
        needle = "read from model.layers.1.mlp.down_proj.weight"
    out = tmp_path / "mc"
    proc = distconv_cli(command, "--load", str(source), "--save", str(out), "--tensor-model-parallel-size", "2", nproc=2,
                        timeout=180)
    _assert_clean_failure(proc, out, "NaN or Inf values in decoder.layers.", needle, "1 of ")
