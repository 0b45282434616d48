"""MindSpore sources without MindSpore: save roots, fused projections, MindFormers YAML.

Synthetic and fast (no torchrun, one CLI run). The layouts written here are this file's own
reading of MindFormers' code; ``tests/test_mindspore_real.py`` proves them against saves that
MindFormers itself wrote, and MindSpore's own forward pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distconv.errors import DistconvError
from distconv.mindspore.source import MindSporeSource, model_settings, source_files

from conftest import distconv_cli

HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN = 4, 2, 8, 16, 12
SHAPE = dict(num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
             num_query_groups=GROUPS, kv_channels=HEAD_DIM)


def hf_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {"q": r(HEADS * HEAD_DIM, HIDDEN), "k": r(GROUPS * HEAD_DIM, HIDDEN), "v": r(GROUPS * HEAD_DIM, HIDDEN),
            "qb": r(HEADS * HEAD_DIM), "kb": r(GROUPS * HEAD_DIM), "vb": r(GROUPS * HEAD_DIM),
            "gate": r(FFN, HIDDEN), "up": r(FFN, HIDDEN)}


def grouped(q, k, v):
    """Per KV head: its query heads, its key head, its value head."""
    per = HEADS // GROUPS * HEAD_DIM
    return torch.cat([torch.cat([q[g * per:(g + 1) * per], k[g * HEAD_DIM:(g + 1) * HEAD_DIM],
                                 v[g * HEAD_DIM:(g + 1) * HEAD_DIM]]) for g in range(GROUPS)])


def interleaved(gate, up):
    return torch.stack([gate, up], dim=1).reshape(2 * FFN, -1)


def write(folder: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata={"format": "ms"})
    return folder


def mcore(t: dict[str, torch.Tensor], qkv: str, fc1: str) -> dict[str, torch.Tensor]:
    d = "decoder.layers.0"
    return {
        "embedding.word_embeddings.weight": torch.ones(10, HIDDEN),
        f"{d}.self_attention.linear_qkv.weight": grouped(t["q"], t["k"], t["v"]) if qkv == "grouped"
        else torch.cat([t["q"], t["k"], t["v"]]),
        f"{d}.self_attention.linear_qkv.bias": grouped(t["qb"], t["kb"], t["vb"]) if qkv == "grouped"
        else torch.cat([t["qb"], t["kb"], t["vb"]]),
        f"{d}.mlp.linear_fc1.weight": interleaved(t["gate"], t["up"]) if fc1 == "interleaved"
        else torch.cat([t["gate"], t["up"]]),
    }


BOXES = [(slice(None),), (slice(3, 11),), (slice(5, 6), slice(2, 9)), (slice(0, 0),), (slice(7, None), slice(None, 4))]


@pytest.mark.parametrize("qkv", ["grouped", "contiguous"])
@pytest.mark.parametrize("fc1", ["interleaved", "concatenated"])
def test_fused_parallel_core_tensors_read_as_hf_tensors_box_by_box(tmp_path, qkv, fc1):
    t = hf_tensors()
    folder = write(tmp_path / "ms", mcore(t, qkv, fc1))
    source = MindSporeSource(folder, values=dict(SHAPE, ms_qkv_layout=qkv, ms_fc1_layout=fc1))
    p = "model.layers.0."
    expected = {"self_attn.q_proj.weight": t["q"], "self_attn.k_proj.weight": t["k"], "self_attn.v_proj.weight": t["v"],
                "self_attn.q_proj.bias": t["qb"], "self_attn.k_proj.bias": t["kb"], "self_attn.v_proj.bias": t["vb"],
                "mlp.gate_proj.weight": t["gate"], "mlp.up_proj.weight": t["up"]}
    assert sorted(source.names()) == sorted(["model.embed_tokens.weight"] + [p + n for n in expected])
    for name, want in expected.items():
        assert source.shape(p + name) == tuple(want.shape)
        for box in BOXES:
            box = box[:want.dim()]
            assert torch.equal(source.read(p + name, box), want[box]), (name, box)


def test_legacy_fused_tensors_have_one_fixed_order(tmp_path):
    """Legacy ``w_qkv`` is grouped per KV head, ``w_gate_hidden`` interleaved: no setting changes it."""
    t = hf_tensors()
    folder = write(tmp_path / "ms", {
        "model.tok_embeddings.embedding_weight": torch.ones(10, HIDDEN),
        "model.layers.0.attention.w_qkv.weight": grouped(t["q"], t["k"], t["v"]),
        "model.layers.0.feed_forward.w_gate_hidden.weight": interleaved(t["gate"], t["up"]),
    })
    values = dict(SHAPE, kv_channels=None, hidden_size=HEADS * HEAD_DIM)  # legacy head dim: hidden / heads
    for settings in ({}, {"ms_qkv_layout": "contiguous", "ms_fc1_layout": "concatenated"}):
        source = MindSporeSource(folder, values={**values, **settings})
        assert torch.equal(source.read("model.layers.0.self_attn.k_proj.weight", (slice(None),)), t["k"])
        assert torch.equal(source.read("model.layers.0.mlp.up_proj.weight", (slice(None),)), t["up"])


def test_fused_tensors_without_their_order_or_with_the_wrong_size_are_refused(tmp_path):
    folder = write(tmp_path / "ms", mcore(hf_tensors(), "grouped", "interleaved"))
    with pytest.raises(DistconvError, match=r"--ms-config, or --ms-fc1-layout interleaved\|concatenated \(MindFormers' "
                       r"use_interleaved_weight_layout_mlp .* and --ms-qkv-layout grouped\|contiguous"):
        MindSporeSource(folder, values=SHAPE)
    with pytest.raises(DistconvError, match="linear_fc1.weight has 24 rows, but the model shape gives 2 x ffn_hidden_size 16"):
        MindSporeSource(folder, values=dict(SHAPE, ffn_hidden_size=16, ms_qkv_layout="grouped", ms_fc1_layout="interleaved"))
    with pytest.raises(DistconvError, match=r"linear_qkv\.(weight|bias) has 64 rows, but the model shape gives \(4 \+ 2 x 1 heads\)"):
        MindSporeSource(folder, values=dict(SHAPE, num_query_groups=1, ms_qkv_layout="grouped", ms_fc1_layout="interleaved"))


def save_root(root: Path, iteration: int = 5, prefix: str = "", count: int = 1) -> Path:
    """A MindFormers save root as ``mindformers.checkpoint.save_checkpoint`` lays it out."""
    folder = root / f"iteration_{iteration:08d}"
    t = hf_tensors()
    names = [("model.tok_embeddings.embedding_weight", torch.ones(10, HIDDEN)), ("model.layers.0.attention.wq.weight", t["q"])]
    for rank in range(count):
        write(folder, dict(names[rank::count]), f"{prefix}model-{rank:07d}-{count:07d}.safetensors")
        write(folder, {"moment1.x": torch.zeros(2)}, f"{prefix}opt-{rank:07d}-{count:07d}.safetensors")
    (folder / "common.json").write_text(json.dumps({"global_step": iteration, "ckpt_status": 0}))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return folder


def test_save_root_follows_the_tracker_and_reads_model_files_only(tmp_path):
    folder = save_root(tmp_path / "root", 12, prefix="qwen3-", count=2)
    save_root(tmp_path / "other", 3)
    (tmp_path / "root" / "iteration_00000003").mkdir()  # an older iteration the tracker does not name
    files, where = source_files(tmp_path / "root")
    assert where == folder and [f.name for f in files] == ["qwen3-model-0000000-0000002.safetensors",
                                                           "qwen3-model-0000001-0000002.safetensors"]
    assert source_files(folder)[0] == files  # the iteration folder itself
    source = MindSporeSource(tmp_path / "root")
    assert sorted(source.names()) == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize("text,words", [
    ("release", "holds b'release', not an iteration number"),
    ("", "holds b'', not an iteration number"),
    ("../5", "holds b'../5'"),
    ("-5", "holds b'-5'"),
    ("5\x00", "not an iteration number"),
    ("9", "iteration 9 not found: "),
])
def test_garbage_or_dangling_tracker_is_one_clear_error(tmp_path, text, words):
    save_root(tmp_path / "root", 5)
    (tmp_path / "root" / "latest_checkpointed_iteration.txt").write_text(text)
    with pytest.raises(DistconvError, match=words.replace("(", r"\(").replace(".", r"\.")):
        source_files(tmp_path / "root")


def test_iteration_folder_may_not_lead_out_of_the_root(tmp_path):
    outside = save_root(tmp_path / "elsewhere", 5)
    root = tmp_path / "root"
    root.mkdir()
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    os.symlink(outside, root / "iteration_00000005")
    with pytest.raises(DistconvError, match="leads out of the save root .* refused"):
        source_files(root)
    os.unlink(root / "iteration_00000005")
    os.symlink(root, root / "iteration_00000005")  # the root itself
    with pytest.raises(DistconvError, match="leads out of the save root"):
        source_files(root)
    os.unlink(root / "iteration_00000005")
    (root / "latest_checkpointed_iteration.txt").unlink()
    os.mkfifo(root / "latest_checkpointed_iteration.txt")  # never opened: reading it would block
    with pytest.raises(DistconvError, match="latest_checkpointed_iteration.txt is not a file"):
        source_files(root)


def test_incomplete_or_mixed_iteration_folders_are_refused(tmp_path):
    folder = save_root(tmp_path / "a", 5, count=2)
    (folder / "model-0000001-0000002.safetensors").unlink()
    with pytest.raises(DistconvError, match="lacks 1 of its 2 model files, e.g. model-0000001-0000002.safetensors"):
        source_files(tmp_path / "a")
    folder = save_root(tmp_path / "b", 5)
    write(folder, {"x": torch.zeros(1)}, "llama-model-0000000-0000001.safetensors")
    with pytest.raises(DistconvError, match="mixes model files of several saves"):
        source_files(tmp_path / "b")
    folder = save_root(tmp_path / "c", 5)
    write(folder, {"x": torch.zeros(1)}, "extra.safetensors")
    with pytest.raises(DistconvError, match="holds extra.safetensors: a MindFormers iteration folder holds"):
        source_files(tmp_path / "c")
    folder = save_root(tmp_path / "d", 5)
    (folder / "model-0000000-0000001.safetensors").unlink()
    with pytest.raises(DistconvError, match="holds no model-RRRRRRR-NNNNNNN.safetensors files"):
        source_files(tmp_path / "d")


def test_megatron_root_given_as_mindspore_source_says_so(tmp_path):
    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(DistconvError, match="iteration 5 not found: .*iteration_00000005 does not exist \\(this is a Megatron-LM save root"):
        source_files(tmp_path)


def run_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def flags(**given):
    from distconv.cli import _parser

    argv = ["import", "--source", "mindspore", "--load", "x", "--save", "y"]
    for k, v in given.items():
        argv += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    return _parser().parse_args(argv)


def test_parallel_core_yaml_gives_shape_and_layouts_with_mindformers_defaults(tmp_path):
    hf = tmp_path / "Qwen3"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "max_position_embeddings": 40960, "sliding_window": None, "use_sliding_window": False,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False}))
    config = run_yaml(tmp_path / "finetune.yaml", {
        "use_legacy": False, "pretrained_model_dir": str(hf),
        "model": {"model_config": {"qkv_concat": True, "num_hidden_layers": 4, "compute_dtype": "bfloat16",
                                   "use_contiguous_weight_layout_attention": False}}})
    values = model_settings(str(config), flags())
    assert values == {"num_layers": 4, "hidden_size": 5120, "ffn_hidden_size": 25600, "num_attention_heads": 64,
                      "num_query_groups": 8, "kv_channels": 128, "norm_epsilon": 1e-6, "rotary_base": 1000000.0,
                      "max_position_embeddings": 40960, "add_qkv_bias": False, "swiglu": True,
                      "ms_qkv_layout": "grouped", "ms_fc1_layout": "interleaved"}
    values = model_settings(str(config), flags(ms_fc1_layout="concatenated", num_layers=2))  # flags win
    assert (values["ms_fc1_layout"], values["num_layers"]) == ("concatenated", 2)
    read: list[Path] = []  # the pretrained config.json is a file the run reads: the import's overlap check gets it
    model_settings(str(config), flags(), read)
    assert read == [hf / "config.json"]
    config = run_yaml(tmp_path / "b.yaml", {"use_legacy": False, "model": {"model_config": dict(
        num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, use_contiguous_weight_layout_attention=True,
        use_interleaved_weight_layout_mlp=False)}})
    values = model_settings(str(config), flags())
    assert (values["ms_qkv_layout"], values["ms_fc1_layout"], values["num_attention_heads"]) == ("contiguous", "concatenated", 2)


def test_legacy_yaml_ffn_size_follows_the_legacy_rule(tmp_path):
    base = dict(type="LlamaConfig", num_layers=2, hidden_size=4096, num_heads=32, n_kv_heads=8, theta=500000.0,
                rms_norm_eps=1e-5, max_position_embedding=8192, qkv_concat=True)
    config = run_yaml(tmp_path / "llama3.yaml", {"model": {"model_config": dict(base, multiple_of=1024, ffn_dim_multiplier=1.3)}})
    values = model_settings(str(config), flags())
    assert values["ffn_hidden_size"] == 14336  # Llama 3 8B
    assert (values["num_query_groups"], values["rotary_base"], values["max_position_embeddings"]) == (8, 500000.0, 8192)
    config = run_yaml(tmp_path / "llama2.yaml", {"model": {"model_config": dict(base, multiple_of=256)}})
    assert model_settings(str(config), flags())["ffn_hidden_size"] == 11008  # Llama 2 7B


@pytest.mark.parametrize("extra,words", [
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"extend_method": "PI"}, "extend_method: 'PI'"),
    ({"num_experts": 8}, "num_experts: 8"),
    ({"moe_config": {"expert_num": 4}}, "moe_config"),
    ({"hidden_act": "gelu"}, "hidden_act: 'gelu'"),
    ({"num_heads": 4, "num_attention_heads": 8}, "num_heads: 4, num_attention_heads: 8 disagree"),
])
def test_yaml_settings_the_import_cannot_express_are_refused(tmp_path, extra, words):
    config = run_yaml(tmp_path / "x.yaml", {"model": {"model_config": {
        "num_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_heads": 4, **extra}}})
    with pytest.raises(DistconvError, match=words.replace("(", r"\(")):
        model_settings(str(config), flags())


def test_config_files_that_are_not_mindformers_configs(tmp_path):
    with pytest.raises(DistconvError, match="no model.model_config mapping"):
        model_settings(str(run_yaml(tmp_path / "a.yaml", {"model": {"arch": {}}})), flags())
    (tmp_path / "b.yaml").write_text("model: [unclosed")
    with pytest.raises(DistconvError, match="--ms-config .*b.yaml: "):
        model_settings(str(tmp_path / "b.yaml"), flags())
    (tmp_path / "c.json").write_text(json.dumps(dict(num_layers=2, hidden_size=8, ffn_hidden_size=16,
                                                     num_attention_heads=2, ms_fc1_layout="interleaved")))
    assert model_settings(str(tmp_path / "c.json"), flags())["ms_fc1_layout"] == "interleaved"
    (tmp_path / "d.json").write_text(json.dumps({"ms_fc1_layout": "gate_up"}))
    with pytest.raises(DistconvError, match="ms_fc1_layout 'gate_up': choose interleaved or concatenated"):
        model_settings(str(tmp_path / "d.json"), flags())
    config = run_yaml(tmp_path / "e.yaml", {"pretrained_model_dir": "/nowhere", "use_legacy": False,
                                            "model": {"model_config": {"qkv_concat": True}}})
    with pytest.raises(DistconvError, match="takes it from pretrained_model_dir /nowhere, which has no config.json here"):
        model_settings(str(config), flags())
    with pytest.raises(SystemExit):  # argparse: not a choice
        flags(ms_qkv_layout="interleaved")


def test_cli_garbage_tracker_is_one_error_line(tmp_path):
    save_root(tmp_path / "root", 5)
    (tmp_path / "root" / "latest_checkpointed_iteration.txt").write_text("latest")
    proc = distconv_cli("import", "--source", "mindspore", "--load", str(tmp_path / "root"), "--save", str(tmp_path / "out"),
                        "--num-layers", "1", "--hidden-size", str(HIDDEN), "--ffn-hidden-size", str(FFN),
                        "--num-attention-heads", str(HEADS))
    assert proc.returncode == 1 and proc.stderr.count("distconv: error:") == 1, proc.stderr[-2000:]
    assert "latest_checkpointed_iteration.txt holds b'latest', not an iteration number" in proc.stderr
    assert not (tmp_path / "out").exists()
