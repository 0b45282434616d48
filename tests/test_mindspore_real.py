"""MindSpore import against real MindFormers saves (MindSpore 2.9, MindFormers 1.9, CPU).

``tests/setup_mindspore.sh`` installs MindSpore and MindFormers into ``.venv-mindspore``;
``tests/mindspore_run.py`` runs there once, builds every model and saves each with MindFormers'
own ``save_checkpoint`` into a save root (see its docstring). Here distconv imports each save
root (``--ms-config`` with the run's MindFormers YAML, or flags), all in one torchrun launch
(``tests/import_jobs.py``), and the proof is:

- legacy Llama, separate projections and ``qkv_concat`` (fused ``w_qkv`` with biases and
  ``w_gate_hidden``): MindSpore's own logits equal megatron-core's on the imported checkpoint and
  transformers' on its HF export (fp32, <= 1e-4);
- parallel_core Qwen3 saved with the default layouts (``linear_qkv`` grouped per KV head,
  ``linear_fc1`` interleaved), with ``[gate; up]`` and with ``[Q; K; V]``: the three exports are
  the same tensors, equal to the HF-layout weights the three models were converted from, and
  MindSpore's own MLP and q/k/v projection outputs (graph mode on CPU) equal what the exported
  weights compute. The training model itself cannot run forward on CPU.

Skips, saying why, when the install failed.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import ROOT, distconv_cli, hf_logits, hf_tensors, subprocess_env, torchrun, venv_unavailable

VENV = ROOT / ".venv-mindspore"
TOL = 1e-4
TOKENS = [[5, 17, 33, 101, 7, 9, 200, 45, 150, 3, 88, 240], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
QWEN3_FLAGS = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                   kv_channels=32, norm_epsilon=1e-6, rotary_base=1000000.0, max_position_embeddings=128, swiglu=True)
# name -> (target TP, PP, --ms-config YAML or flags)
IMPORTS = {
    "legacy_separate": (2, 1, "yaml"),
    "legacy_concat": (1, 2, "yaml"),
    "qwen3_default": (2, 1, "yaml"),
    "qwen3_fc1_concatenated": (1, 1, dict(QWEN3_FLAGS, ms_fc1_layout="concatenated", ms_qkv_layout="grouped")),
    "qwen3_qkv_contiguous": (1, 2, "yaml"),
}
QWEN3 = [n for n in IMPORTS if n.startswith("qwen3")]


def _unavailable() -> str | None:
    return venv_unavailable(VENV, "MindSpore/MindFormers", "setup_mindspore.sh")


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    """Save every model with MindFormers (one process), then import, check and export them all (one launch)."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("mindspore")
    request, result = work / "request.json", work / "result.json"
    request.write_text(json.dumps({"out": str(work / "ms"), "tokens": TOKENS}))
    start = time.perf_counter()
    proc = subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tests" / "mindspore_run.py"), str(request),
                           str(result)], env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    saved = json.loads(result.read_text())
    saved["seconds"] = time.perf_counter() - start
    ms = work / "ms"
    jobs, index = [], {}

    def add(key: str, **job) -> None:
        index[key] = len(jobs)
        jobs.append(job)

    for name, (tp, pp, how) in IMPORTS.items():
        config, flags = (str(ms / f"{name}.yaml"), {}) if how == "yaml" else (None, how)
        meg = str(work / "meg" / name)
        add(f"import {name}", op="import_ms", load=str(ms / name), save=meg, tp=tp, pp=pp, divisible_by=64,
            ms_config=config, flags=flags)
        add(f"check {name}", op="check", root=meg, tp=tp, pp=pp, tokens=TOKENS, logits_out=str(work / f"{name}.pt"))
        add(f"export {name}", op="export", load=meg, save=str(work / "hf" / name))
    add("import qwen3 unordered", op="import_ms", load=str(ms / "qwen3_default"), save=str(work / "bad"), tp=1, pp=1,
        divisible_by=64, ms_config=None, flags=dict(QWEN3_FLAGS))
    jobs_file, results_file = work / "jobs.json", work / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    torchrun(2, str(ROOT / "tests" / "import_jobs.py"), str(jobs_file), str(results_file), timeout=900)
    results = json.loads(results_file.read_text())
    return {"work": work, "ms": ms, "saved": saved, "results": {k: results[i] for k, i in index.items()}}


def ok(real: dict, key: str) -> dict:
    result = real["results"][key]
    assert result["ok"], f"{key}: {result.get('error')}"
    return result["report"]



def test_mindformers_writes_what_the_import_reads(real):
    """The save roots are what MindFormers 1.9 writes: tracker, 8-digit iteration folder,
    ``[PREFIX-]model-RRRRRRR-NNNNNNN.safetensors`` with ``{"format": "ms"}``, ``common.json``."""
    assert (real["saved"]["mindspore"], real["saved"]["mindformers"]) == ("2.9.0", "1.9.0")
    root = real["ms"] / "legacy_separate"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    folder = root / "iteration_00000007"
    assert sorted(p.name for p in folder.iterdir()) == ["common.json", "model-0000000-0000001.safetensors",
                                                        "opt-0000000-0000001.safetensors"]
    assert set(json.loads((folder / "common.json").read_text())) >= {"global_step", "ckpt_status"}
    model = real["ms"] / "qwen3_default" / "iteration_00000100" / "qwen3-model-0000000-0000001.safetensors"
    with safe_open(str(model), "np") as f:
        assert f.metadata() == {"format": "ms"}
        names = set(f.keys())
    assert {"embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
            "decoder.layers.0.mlp.linear_fc1.weight", "output_layer.weight"} <= names
    classes = {n: (r["mlp_class"], r["attention_class"]) for n, r in real["saved"]["qwen3"].items()}
    assert classes == {"qwen3_default": ("MLPInterleaved", "SelfAttention"),
                       "qwen3_fc1_concatenated": ("MLP", "SelfAttention"),
                       "qwen3_qkv_contiguous": ("MLPInterleaved", "SelfAttentionContiguous")}
    assert "model.layers.0.attention.w_qkv.bias" in real["saved"]["legacy"]["legacy_concat"]


@pytest.mark.parametrize("name", ["legacy_separate", "legacy_concat"])
def test_legacy_llama_logits_equal_mindspores(real, name):
    ok(real, f"import {name}")
    report = ok(real, f"check {name}")
    assert report["layout_equal"], report
    expected = torch.from_numpy(np.load(real["ms"] / f"{name}_logits.npy"))
    megatron = torch.load(real["work"] / f"{name}.pt")
    assert (megatron[..., :250] - expected).abs().max().item() <= TOL
    ok(real, f"export {name}")
    folder = real["work"] / "hf" / name
    arch = json.loads((folder / "config.json").read_text())["architectures"]
    assert arch == (["LlamaForCausalLM"] if name == "legacy_separate" else ["Qwen2ForCausalLM"])  # q/k/v biases
    assert (hf_logits(folder, torch.tensor(TOKENS)) - expected).abs().max().item() <= TOL


def test_qwen3_layouts_import_to_the_same_weights(real):
    reference = {k: torch.from_numpy(v) for k, v in np.load(real["ms"] / "qwen3_reference.npz").items()}
    exports = {}
    for name in QWEN3:
        ok(real, f"import {name}")
        assert ok(real, f"check {name}")["layout_equal"]
        ok(real, f"export {name}")
        exports[name] = hf_tensors(real["work"] / "hf" / name)
    first = exports[QWEN3[0]]
    for name in QWEN3[1:]:
        assert sorted(exports[name]) == sorted(first)
        assert all(torch.equal(exports[name][k], first[k]) for k in first), name
    hf = {"linear_q": "self_attn.q_proj", "linear_k": "self_attn.k_proj", "linear_v": "self_attn.v_proj",
          "gating": "mlp.gate_proj", "hidden": "mlp.up_proj"}
    for key, value in reference.items():
        parts = key.split(".")
        if parts[-2] in hf:
            assert torch.equal(first[f"model.layers.{parts[2]}.{hf[parts[-2]]}.weight"], value), key


@pytest.mark.parametrize("name", QWEN3)
def test_qwen3_mindspore_projections_equal_the_exported_weights(real, name):
    """MindSpore's own layer-0 MLP and q/k/v split on one input, recomputed from the HF export."""
    ok(real, f"export {name}")
    w = hf_tensors(real["work"] / "hf" / name)
    x = torch.from_numpy(np.load(real["ms"] / "qwen3_probe_input.npy")).double()  # [seq, batch, hidden]
    probe = {k: torch.from_numpy(v).double() for k, v in np.load(real["ms"] / f"{name}_probe.npz").items()}
    p = lambda n: w[f"model.layers.0.{n}.weight"].double()  # noqa: E731
    mlp = (F.silu(x @ p("mlp.gate_proj").T) * (x @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    assert (mlp - probe["mlp"]).abs().max().item() <= TOL
    groups = 2
    for proj in ("q", "k", "v"):  # MindSpore's [seq, batch, groups, heads per group x head_dim]
        ours = (x @ p(f"self_attn.{proj}_proj").T).reshape(*x.shape[:2], groups, -1)
        assert (ours - probe[proj].reshape(ours.shape)).abs().max().item() <= TOL, proj


def test_fused_parallel_core_projections_without_their_order_are_refused(real):
    result = real["results"]["import qwen3 unordered"]
    assert not result["ok"]
    assert "--ms-fc1-layout interleaved|concatenated" in result["error"], result["error"]
    assert "--ms-qkv-layout grouped|contiguous" in result["error"], result["error"]
    assert not (real["work"] / "bad").exists()


def test_cli_reads_a_mindformers_save_root_with_its_yaml(real, tmp_path):
    """The command line as a user runs it: the save root and the run's YAML, nothing else."""
    proc = distconv_cli("import", "--source", "mindspore", "--load", str(real["ms"] / "qwen3_qkv_contiguous"),
                        "--ms-config", str(real["ms"] / "qwen3_qkv_contiguous.yaml"), "--save", str(tmp_path / "meg"),
                        "--make-vocab-size-divisible-by", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iteration_00000102" in proc.stdout
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text() == "release"


def test_whole_mindspore_part_is_quick(real):
    """Building and saving every model with MindSpore takes one process and well under a minute."""
    assert real["saved"]["seconds"] < 120, real["saved"]["seconds"]
