"""Block-wise FP8 (``--dtype fp8``, and import of such folders), checked against the format's definition.

The reference quantizer below is written here from the definition (per 128x128 block: scale =
amax / 448 in float32, FP8 = weight / scale cast to e4m3 with round-to-nearest; an all-zero block
dequantizes to zeros), block by block in a plain loop; it does not call distconv's quantizer.
The quantized set is the official releases' (attention, MLP, expert and MLA projections of the
decoder layers), listed here by HF name, not read from the family tables.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distconv.errors import DistconvError

from conftest import ROOT, distconv_cli, hf_logits, hf_tensors, torchrun

B = 128
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
             "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def ref_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The format's definition, one block at a time."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / B), math.ceil(cols / B), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = w[i * B:(i + 1) * B, j * B:(j + 1) * B].float()
            amax = float(block.abs().max())
            s[i, j] = amax / 448.0 if amax > 0 else 1.0
            q[i * B:(i + 1) * B, j * B:(j + 1) * B] = (block / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def ref_dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * B:(i + 1) * B, j * B:(j + 1) * B] = q[i * B:(i + 1) * B, j * B:(j + 1) * B].float() * s[i, j]
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()



@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (5, 130), (257, 1)])
def test_quantize_matches_the_definition(shape):
    from distconv.hf.fp8 import dequantize, quantize

    gen = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape, generator=gen) * torch.logspace(-3, 1, shape[1])).to(torch.bfloat16)
    w[:B, :B] = 0  # an all-zero block (partial where the tensor is smaller)
    q, s = quantize(w)
    rq, rs = ref_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == (math.ceil(shape[0] / B), math.ceil(shape[1] / B))
    assert torch.equal(s, rs)
    assert _bytes(q) == _bytes(rq)
    deq = ref_dequantize(q, s)
    assert torch.equal(deq[:B, :B], torch.zeros_like(deq[:B, :B]))
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal step 2^-9 of the scale
    bound = w.float().abs() * 2**-4 + s.repeat_interleave(B, 0)[: shape[0]].repeat_interleave(B, 1)[:, : shape[1]] * 2**-10
    assert bool(((deq - w.float()).abs() <= bound).all())
    # distconv's box dequantization of an inner box (mid-block start) equals the definition's
    r0, c0 = min(100, shape[0] - 1), min(3, shape[1] - 1)
    box = dequantize(q[r0:, c0:], s[r0 // B:, c0 // B:], r0, c0)
    assert torch.equal(box, deq[r0:, c0:])


@pytest.fixture(scope="module")
def exports(built, tmp_path_factory) -> dict[str, Path]:
    """The llama (TP2 PP2) and DeepSeek-V3 fixtures exported as fp8, bf16, and as stored (fp32)."""
    out = tmp_path_factory.mktemp("fp8")
    done = {}
    for name, layout in (("llama", "tp2pp2"), ("deepseek_v3", "tp1pp1")):
        for dtype in ("fp8", "bf16", "auto"):
            save = out / f"{name}_{dtype}"
            proc = distconv_cli("export", "--load", str(built / name / layout), "--save", str(save), "--dtype", dtype,
                                "--quiet", "--report", str(out / f"{name}_{dtype}.json"), nproc=2)
            assert proc.returncode == 0, proc.stderr[-4000:]
            done[f"{name}_{dtype}"] = save
    return done


@pytest.mark.parametrize("name", ["llama", "deepseek_v3"])
def test_export_fp8_against_bf16_export(exports, name):
    """Quantized weights: the reference quantization of the weights as the checkpoint stores them
    (the as-stored export is bit-exact, see test_export_logits), not of a bf16 copy. The rest:
    equal to the bf16 export."""
    fp8, bf16, stored = (hf_tensors(exports[f"{name}_{d}"]) for d in ("fp8", "bf16", "auto"))
    assert {t.dtype for t in stored.values()} == {torch.float32}  # the fixtures are fp32: a real difference
    scales = {n for n in fp8 if n.endswith("_scale_inv")}
    assert set(fp8) - scales == set(bf16)
    quantized = {n for n in bf16 if n.startswith("model.layers.") and n.split(".")[-2] in QUANTIZED and n.endswith(".weight")}
    assert quantized and scales == {n + "_scale_inv" for n in quantized}
    for n, t in bf16.items():
        if n in quantized:
            rq, rs = ref_quantize(stored[n])
            assert fp8[n].dtype == torch.float8_e4m3fn and _bytes(fp8[n]) == _bytes(rq), n
            assert torch.equal(fp8[n + "_scale_inv"], rs), n
        elif n.endswith("e_score_correction_bias"):  # float32 in any dtype, as the checkpoint stores it
            assert fp8[n].dtype == t.dtype == torch.float32 and torch.equal(fp8[n], stored[n]), n
        else:
            assert fp8[n].dtype == torch.bfloat16 and torch.equal(fp8[n], t), n
    config = json.loads((exports[f"{name}_fp8"] / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    index = json.loads((exports[f"{name}_fp8"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(fp8)
    marker = json.loads((exports[f"{name}_fp8"] / "distconv.json").read_text())
    assert marker["source"]["options"]["quantization"] == config["quantization_config"]
    report = json.loads((exports[f"{name}_fp8"].parent / f"{name}_fp8.json").read_text())
    assert report["format"] == "safetensors" and report["quantization"] == config["quantization_config"]
    assert json.loads((exports[f"{name}_bf16"].parent / f"{name}_bf16.json").read_text())["quantization"] is None
    sizes = [sum(f.stat().st_size for f in exports[f"{name}_{d}"].glob("*.safetensors")) for d in ("fp8", "bf16")]
    assert sizes[0] < 0.75 * sizes[1]  # the tiny fixtures' bf16 embeddings and lm_head keep it above one half


def _dequantized_folder(src: Path, dst: Path) -> Path:
    """``src`` with every FP8 weight dequantized by the definition (float32), no quantization_config."""
    dst.mkdir()
    tensors = hf_tensors(src)
    plain = {n: (ref_dequantize(t, tensors[n + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t.float())
             for n, t in tensors.items() if not n.endswith("_scale_inv")}
    save_file(plain, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("name", ["llama", "deepseek_v3"])
def test_fp8_logits(built, exports, tmp_path, name):
    """The dequantized model against megatron-core's recorded logits, next to the bf16 export's.

    FP8 e4m3 keeps 3 mantissa bits: each weight moves by up to 2^-4 of itself (bf16: 2^-9), so
    the logits move about 2^5 times more than the bf16 export's. The bound is 64 x the bf16
    export's error (twice that factor) and 5 % of the logits' range, whichever is smaller
    (measured: llama 0.095 vs bf16 0.014, range 3.1; DeepSeek-V3 0.087 vs 0.009, range 2.7).
    """
    ref = torch.load(built / "refs" / f"{name}.pt")
    logits = lambda folder: hf_logits(folder, ref["tokens"])  # noqa: E731
    target = ref["logits"][..., : logits(exports[f"{name}_bf16"]).shape[-1]]
    err_bf16 = (logits(exports[f"{name}_bf16"]) - target).abs().max().item()
    dequantized = logits(_dequantized_folder(exports[f"{name}_fp8"], tmp_path / "deq"))
    err_fp8 = (dequantized - target).abs().max().item()
    span = (target.max() - target.min()).item()
    assert 0 < err_fp8 <= min(64 * err_bf16, 0.05 * span), (err_fp8, err_bf16, span)
    # transformers reads the folder itself as the same model (on CPU it dequantizes the FP8 weights)
    assert (logits(exports[f"{name}_fp8"]) - dequantized).abs().max().item() <= 1e-5


def test_import_fp8_round_trip(exports, tmp_path):
    """fp8 export -> import (TP2 PP2) -> bf16 export: quantized tensors equal their dequantized
    FP8 values in bf16 exactly (export is bit-exact, see test_export_logits), the rest unchanged."""
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    proc = distconv_cli("import", "--load", str(exports["llama_fp8"]), "--save", str(megatron), "--quiet",
                        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = distconv_cli("export", "--load", str(megatron), "--save", str(back), "--dtype", "bf16", "--quiet", nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fp8, got = hf_tensors(exports["llama_fp8"]), hf_tensors(back)
    assert set(got) == {n for n in fp8 if not n.endswith("_scale_inv")}
    for n, t in got.items():
        want = ref_dequantize(fp8[n], fp8[n + "_scale_inv"]).to(torch.bfloat16) if fp8[n].dtype == torch.float8_e4m3fn else fp8[n]
        assert t.dtype == torch.bfloat16 and torch.equal(t, want), n


def _broken(src: Path, dst: Path, change) -> Path:
    """A copy of ``src`` whose tensors ``change`` edits (in place, a dict)."""
    shutil.copytree(src, dst)
    files = sorted(dst.glob("*.safetensors"))
    tensors = hf_tensors(dst)
    change(tensors)
    for f in files:
        f.unlink()
    save_file(tensors, str(dst / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").unlink()
    return dst


W = "model.layers.1.self_attn.o_proj.weight"


def test_import_refuses_bad_scales(exports, tmp_path):
    from distconv.hf.source import open_hf

    cases = {
        "missing": (lambda t: t.pop(W + "_scale_inv"), f"{W} is float8_e4m3fn but the source has no {W}_scale_inv"),
        "misshaped": (lambda t: t.__setitem__(W + "_scale_inv", torch.ones(2, 1)), f"{W}_scale_inv has shape [2, 1]"),
        "orphan": (lambda t: t.pop(W), f"{W}_scale_inv is a scale of no tensor"),
        "not fp8": (lambda t: t.__setitem__(W, t[W].to(torch.bfloat16)), f"tensor {W} has a _scale_inv but is stored BF16"),
    }
    for i, (change, message) in enumerate(cases.values()):
        with pytest.raises(DistconvError, match=message.replace("[", r"\[").replace("]", r"\]")):
            open_hf(_broken(exports["llama_fp8"], tmp_path / str(i), change), {})


def test_import_reads_multi_block_boxes(tmp_path):
    """Row ranges that start and end inside blocks, partial edge blocks, and a tensor left in
    high precision (as ``modules_to_not_convert`` lists) next to quantized ones."""
    from distconv.hf.source import open_hf

    folder = tmp_path / "hf"
    folder.mkdir()
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(300, 260, generator=gen)
    q, s = ref_quantize(w)
    keep = torch.randn(7, 9, generator=gen).to(torch.bfloat16)
    save_file({"a.weight": q, "a.weight_scale_inv": s, "b.weight": keep}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128], "modules_to_not_convert": ["b"]}}))
    source = open_hf(folder, {}).tensors
    assert source.names() == ["a.weight", "b.weight"]
    assert source.dtype("a.weight") == torch.bfloat16 and source.dtype("b.weight") == torch.bfloat16
    deq = ref_dequantize(q, s)
    for rows, cols in [(slice(0, 300), slice(None)), (slice(100, 131), slice(None)), (slice(255, 300), slice(129, 260)),
                       (slice(127, 129), slice(0, 1))]:
        assert torch.equal(source.read("a.weight", (rows, cols)), deq[rows, cols])
    assert torch.equal(source.read("b.weight", (slice(2, 5),)), keep[2:5])


def test_inspect_hf_folder(exports):
    """``distconv inspect`` on an HF folder lists which tensors are FP8 and their scale layout."""
    folder = exports["deepseek_v3_fp8"]
    proc = distconv_cli("inspect", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    tensors = hf_tensors(folder)
    assert report["quantization"]["weight_block_size"] == [128, 128]
    listed = {t["name"]: t for t in report["tensors"]}
    assert set(listed) == {n for n in tensors if not n.endswith("_scale_inv")}
    for name, t in listed.items():
        assert t["dtype"] == {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float32: "F32"}[tensors[name].dtype], name
        assert (t["dtype"] == "F32") == name.endswith("e_score_correction_bias"), name  # float32 in every dtype
        if tensors[name].dtype == torch.float8_e4m3fn:
            assert t["scale_inv"] == {"shape": list(tensors[name + "_scale_inv"].shape), "dtype": "F32", "block": [128, 128]}
        else:
            assert "scale_inv" not in t, name
    assert report["quantized"] == sum(n.endswith("_scale_inv") for n in tensors) > 0


@pytest.mark.parametrize("name,extra,message", [
    ("gpt2", (), "--dtype fp8: GPT2LMHeadModel has no block-wise FP8 layout"),
    ("llama", ("--format", "torch"), "--dtype fp8 writes safetensors only"),
])
def test_fp8_refusals(built, tmp_path, name, extra, message):
    layout = sorted(p.name for p in (built / name).iterdir())[0]
    proc = distconv_cli("export", "--load", str(built / name / layout), "--save", str(tmp_path / "out"), "--dtype", "fp8",
                        "--dry-run", *extra)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# A trained model: the fp8 export's top-1 tokens against the bf16 export's.
#
# On the random fixtures the logits are nearly flat, so FP8 rounding flips the argmax at random
# (92 % / 83 % agreement measured); the criterion only means something on a model with peaked
# logits. This one is trained here on arithmetic sequences mod 256: s, s+d, s+2d, ... with
# d in 1..4; x1 is a 4-way guess, every later token is determined by the two before it.
#
# Shapes: hidden 256, MLP 384, 8 heads of 32 with 2 KV heads, so q/o are 2x2 blocks, gate/up 3x2,
# down 2x3, and k/v 1x2 partial (64-row) blocks. transformers 5.24 on CPU dequantizes with the
# block size it derives from the shapes (rows // scale rows, cols // scale cols): that is the
# definition's only where each dimension is a multiple of 128 or under 128 (a 192-row weight is
# read with 96-row blocks, a 320-row one is refused). These shapes stay inside that, so the fp8
# folder is read by transformers' own FP8 loading; longer partial edges are checked against the
# definition in test_quantize_matches_the_definition. Imported at TP2, the MLP is split at 192
# rows (gate/up) and columns (down), mid-block: an export that quantized per TP shard would not
# match the reference quantization below.

SEQ, MAX_STEP, HELD_OUT, TRAIN_STEPS = 16, 4, 128, 120


def _arithmetic(pairs: torch.Tensor) -> torch.Tensor:
    """One sequence per (start, step) row."""
    return (pairs[:, :1] + pairs[:, 1:] * torch.arange(SEQ)) % 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Train the model (fp32, CPU), import it to Megatron (bf16 weights, TP2) and export it as
    bf16 and as fp8: the three distconv calls in one torchrun launch (tests/import_jobs.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("trained")
    gen = torch.Generator().manual_seed(0)
    pairs = torch.cartesian_prod(torch.arange(256), torch.arange(1, MAX_STEP + 1))
    pairs = pairs[torch.randperm(len(pairs), generator=gen)]
    held_out, train = _arithmetic(pairs[:HELD_OUT]), pairs[HELD_OUT:]  # (start, step) pairs never trained on
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        batch = _arithmetic(train[torch.randint(len(train), (64,), generator=gen)])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
    train_s = time.perf_counter() - start
    model.eval().save_pretrained(str(work / "hf"))

    meg, jobs = str(work / "megatron"), work / "jobs.json"
    jobs.write_text(json.dumps([
        dict(op="import", load=str(work / "hf"), save=meg, tp=2, pp=1, dtype="bf16"),
        dict(op="export", load=meg, save=str(work / "bf16"), dtype="bf16"),
        dict(op="export", load=meg, save=str(work / "fp8"), dtype="fp8"),
    ]))
    start = time.perf_counter()
    torchrun(2, str(ROOT / "tests" / "import_jobs.py"), str(jobs), str(work / "results.json"), timeout=600)
    results = json.loads((work / "results.json").read_text())
    assert all(r["ok"] for r in results), results
    return {"work": work, "held_out": held_out, "train_s": train_s, "convert_s": time.perf_counter() - start}


def test_fp8_export_of_a_trained_model_keeps_its_top1_tokens(trained, record_property):
    """transformers reads the fp8 folder with its own FP8 loading (on CPU it dequantizes; the
    weights it builds are exactly the definition's dequantization of the stored FP8), and its
    top-1 tokens on held-out sequences agree with the bf16 export's."""
    from transformers import AutoModelForCausalLM

    work, tokens = trained["work"], trained["held_out"]
    bf16, fp8 = hf_tensors(work / "bf16"), hf_tensors(work / "fp8")
    quantized = {n for n in bf16 if n.split(".")[-2] in QUANTIZED}
    assert len(quantized) == 14 and set(fp8) == set(bf16) | {n + "_scale_inv" for n in quantized}
    for n in quantized:  # the import is bf16, so the bf16 export holds the stored weights exactly
        q, s = ref_quantize(bf16[n])
        assert _bytes(fp8[n]) == _bytes(q) and torch.equal(fp8[n + "_scale_inv"], s), n

    # without a GPU transformers turns dequantize on itself (it warns) and builds plain Linears
    models = {d: AutoModelForCausalLM.from_pretrained(str(work / d), dtype=torch.float32, trust_remote_code=False).eval() for d in ("hf", "bf16", "fp8")}
    loaded = models["fp8"].state_dict()
    for n in quantized:
        assert torch.equal(loaded[n], ref_dequantize(fp8[n], fp8[n + "_scale_inv"])), n
    with torch.no_grad():
        logits = {d: m(tokens).logits for d, m in models.items()}
    top1 = {d: x.argmax(-1) for d, x in logits.items()}
    hit = top1["bf16"][:, :-1] == tokens[:, 1:]  # position t predicts x(t+1)
    agree = top1["bf16"] == top1["fp8"]
    confident = logits["bf16"].softmax(-1).amax(-1) >= 0.9  # top-1 logit at least ln 9 = 2.2 above every other
    figures = {
        "held_out_accuracy": hit[:, 1:].float().mean().item(),  # x2 on: the determined tokens
        "held_out_accuracy_from_x4": hit[:, 3:].float().mean().item(),
        "top1_agreement": agree.float().mean().item(),
        "confident_share": confident.float().mean().item(),
        "top1_agreement_confident": agree[confident].float().mean().item(),
        "logit_error_bf16": (logits["bf16"] - logits["hf"]).abs().max().item(),  # against the trained fp32 model
        "logit_error_fp8": (logits["fp8"] - logits["hf"]).abs().max().item(),
        "train_s": round(trained["train_s"], 1), "convert_s": round(trained["convert_s"], 1),
    }
    for key, value in figures.items():
        record_property(key, value)
    print(figures)
    # The model has learned the pattern (measured 0.95; the misses are x2 and x3, inferred from
    # one or two differences; from x4 on 0.99) and is mostly confident (measured 0.83).
    assert figures["held_out_accuracy"] >= 0.93 and figures["held_out_accuracy_from_x4"] >= 0.98, figures
    assert figures["confident_share"] >= 0.75, figures
    # Where the bf16 model is confident, FP8 rounding (logits moved by <= 0.5, measured) must not
    # flip the top-1 token: all agree. Overall, measured 99.8 %: 4 of 2048 flips, each where the
    # bf16 model's top two logits were within 0.05 (top-1 probability 0.37 to 0.51; x1, x2, x5);
    # the bound, 98 %, leaves room for such unsure positions (2.3 % have a probability under 0.5).
    assert figures["top1_agreement_confident"] == 1.0, figures
    assert figures["top1_agreement"] >= 0.98, figures
    # Top-1 agreement is coarse on a trained model: the scales of every tensor times 1.5, a scale
    # grid's rows reversed, a block size of 64 or one scale per tensor still agree on >= 98.4 %
    # overall and 100 % of the confident positions (measured); only gross errors fail it (scales
    # inverted: 0.4 %, ignored: 87 %). The byte comparison above pins the format; this bound
    # catches the moderate errors (they move the logits by 1.3 to 4.1): the FP8 model's logit
    # error is measured 7.3x the bf16 export's here (6.8x and 9.7x on the random fixtures, see
    # test_fp8_logits), the bound is 16x.
    assert figures["logit_error_fp8"] <= 16 * figures["logit_error_bf16"], figures
