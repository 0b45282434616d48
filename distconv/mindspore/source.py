"""MindSpore Transformers safetensors as an import source (Llama/Qwen-style GPT models).

MindSpore Transformers (MindFormers) saves unsharded weights under its own parameter names, in
safetensors files whose metadata is ``{"format": "ms"}``; this module renames them to the HF
names the family tables use (values laid out as in HF: one ``[out, in]`` matrix per projection)
and takes the model's shape from command-line flags (the ones the MindSpore docs'
``convert.py --loader core_mf`` command lists), a JSON key file, or the run's MindFormers YAML.

``--load`` is one ``.safetensors`` file, a folder of them, one MindFormers iteration folder, or
a MindFormers save root (``mindformers.checkpoint.save_checkpoint``): the root's
``latest_checkpointed_iteration.txt`` holds the iteration number, whose folder
``iteration_XXXXXXXX`` (8 digits) holds ``[PREFIX-]model-RRRRRRR-NNNNNNN.safetensors`` (rank,
file count), ``opt-*`` optimizer files (never read) and ``common.json`` (training counters).

Two naming generations are understood:

- ``legacy``: MindFormers' ``LlamaForCausalLM`` family (``use_legacy: True``):
  ``model.tok_embeddings.embedding_weight``, ``model.layers.N.attention.wq/wk/wv/wo``,
  ``attention_norm``, ``ffn_norm``, ``feed_forward.w1/w2/w3``, ``model.norm_out``, ``lm_head``;
  with ``qkv_concat: True`` ``attention.w_qkv`` (rows grouped per KV head: each group's query
  heads, then its key head, then its value head) and ``feed_forward.w_gate_hidden`` (rows
  interleaved: gate row 0, up row 0, gate row 1, ...). Both orders are fixed by the model's code.
- ``mcore``: the ``parallel_core`` models (e.g. ``TrainingQwen3ForCausalLM``):
  ``embedding.word_embeddings``, ``decoder.layers.N.self_attention.linear_qkv/linear_proj``,
  ``q_layernorm``, ``k_layernorm``, ``input_layernorm``, ``pre_mlp_layernorm``,
  ``mlp.linear_fc1/linear_fc2``, ``decoder.final_layernorm``, ``output_layer`` (optionally
  under ``model.``), and the unfused ``linear_q/linear_k/linear_v``, ``mlp.gating/hidden``.
  The row order of ``linear_qkv`` (``use_contiguous_weight_layout_attention``: grouped per KV
  head by default, or ``[Q; K; V]``) and of ``linear_fc1`` (``use_interleaved_weight_layout_mlp``:
  interleaved by default, or ``[gate; up]``) is a training setting the checkpoint does not
  record: it comes from the run's YAML (``--ms-config``) or from ``--ms-qkv-layout`` /
  ``--ms-fc1-layout``, and a fused tensor whose order neither gives is an error.

Any name that does not map is an error that lists it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from distconv.errors import DistconvError
from distconv.families import FAMILIES, pick_family
from distconv.hf.source import HFSource, SafetensorsFiles, file_identity
from distconv.megatron.args import spec_from_args
from distconv.mindspore.flags import LAYOUTS, MODEL_FLAGS, MODEL_SWITCHES

_N = r"(?P<n>\d+)"
_LEGACY = (
    (r"model\.tok_embeddings\.embedding_weight", "model.embed_tokens.weight"),
    (rf"model\.layers\.{_N}\.attention\.wq\.(?P<p>weight|bias)", "model.layers.{n}.self_attn.q_proj.{p}"),
    (rf"model\.layers\.{_N}\.attention\.wk\.(?P<p>weight|bias)", "model.layers.{n}.self_attn.k_proj.{p}"),
    (rf"model\.layers\.{_N}\.attention\.wv\.(?P<p>weight|bias)", "model.layers.{n}.self_attn.v_proj.{p}"),
    (rf"model\.layers\.{_N}\.attention\.wo\.weight", "model.layers.{n}.self_attn.o_proj.weight"),
    (rf"model\.layers\.{_N}\.attention_norm\.weight", "model.layers.{n}.input_layernorm.weight"),
    (rf"model\.layers\.{_N}\.ffn_norm\.weight", "model.layers.{n}.post_attention_layernorm.weight"),
    (rf"model\.layers\.{_N}\.feed_forward\.w1\.weight", "model.layers.{n}.mlp.gate_proj.weight"),
    (rf"model\.layers\.{_N}\.feed_forward\.w2\.weight", "model.layers.{n}.mlp.down_proj.weight"),
    (rf"model\.layers\.{_N}\.feed_forward\.w3\.weight", "model.layers.{n}.mlp.up_proj.weight"),
    (r"model\.norm_out\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
)
_D = rf"(?:model\.)?decoder\.layers\.{_N}"
_MCORE = (
    (r"(?:model\.)?embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (rf"{_D}\.input_layernorm\.weight", "model.layers.{n}.input_layernorm.weight"),
    (rf"{_D}\.self_attention\.linear_q\.(?P<p>weight|bias)", "model.layers.{n}.self_attn.q_proj.{p}"),
    (rf"{_D}\.self_attention\.linear_k\.(?P<p>weight|bias)", "model.layers.{n}.self_attn.k_proj.{p}"),
    (rf"{_D}\.self_attention\.linear_v\.(?P<p>weight|bias)", "model.layers.{n}.self_attn.v_proj.{p}"),
    (rf"{_D}\.self_attention\.linear_proj\.weight", "model.layers.{n}.self_attn.o_proj.weight"),
    (rf"{_D}\.self_attention\.q_layernorm\.weight", "model.layers.{n}.self_attn.q_norm.weight"),
    (rf"{_D}\.self_attention\.k_layernorm\.weight", "model.layers.{n}.self_attn.k_norm.weight"),
    (rf"{_D}\.pre_mlp_layernorm\.weight", "model.layers.{n}.post_attention_layernorm.weight"),
    (rf"{_D}\.mlp\.gating\.weight", "model.layers.{n}.mlp.gate_proj.weight"),
    (rf"{_D}\.mlp\.hidden\.weight", "model.layers.{n}.mlp.up_proj.weight"),
    (rf"{_D}\.mlp\.linear_fc2\.weight", "model.layers.{n}.mlp.down_proj.weight"),
    (r"(?:model\.)?decoder\.final_layernorm\.weight", "model.norm.weight"),
    (r"(?:model\.)?output_layer\.weight", "lm_head.weight"),
)
_TABLES = [(re.compile(p + "$"), hf) for p, hf in _LEGACY + _MCORE]
# fused projections: (pattern, what, layout setting; None: the order is fixed by the model's code)
_QKV_HF = ("model.layers.{n}.self_attn.q_proj.{p}", "model.layers.{n}.self_attn.k_proj.{p}",
           "model.layers.{n}.self_attn.v_proj.{p}")
_FC1_HF = ("model.layers.{n}.mlp.gate_proj.weight", "model.layers.{n}.mlp.up_proj.weight")
_FUSED = [(re.compile(p + "$"), hf, layout) for p, hf, layout in (
    (rf"model\.layers\.{_N}\.attention\.w_qkv\.(?P<p>weight|bias)", _QKV_HF, None),  # legacy: grouped
    (rf"model\.layers\.{_N}\.feed_forward\.w_gate_hidden\.weight", _FC1_HF, None),  # legacy: interleaved
    (rf"{_D}\.self_attention\.linear_qkv\.(?P<p>weight|bias)", _QKV_HF, "ms_qkv_layout"),
    (rf"{_D}\.mlp\.linear_fc1\.weight", _FC1_HF, "ms_fc1_layout"),
)]
_FIXED = {_QKV_HF: "grouped", _FC1_HF: "interleaved"}
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")
TRACKER = "latest_checkpointed_iteration.txt"  # MindFormers' tracker has Megatron-LM's name
_ITERATION = re.compile(r"iteration_\d{8,}")
_MODEL_FILE = re.compile(r"(?:(?P<prefix>.+)-)?model-(?P<rank>\d{7})-(?P<count>\d{7})\.safetensors")
_OPT_FILE = re.compile(r"(?:.+-)?opt-\d{7}-\d{7}\.safetensors")


def hf_name(ms_name: str) -> str | None:
    for pattern, hf in _TABLES:
        m = pattern.match(ms_name)
        if m:
            return hf.format(**m.groupdict())
    return None


def _tracked_folder(root: Path) -> Path:
    """The iteration folder a MindFormers save root's tracker names, kept inside the root."""
    tracker = root / TRACKER
    if not tracker.is_file():
        raise DistconvError(f"{tracker} is not a file")
    try:
        with open(tracker, "rb") as f:
            raw = f.read(64)
    except OSError as e:
        raise DistconvError(f"{tracker}: {e}") from None
    m = re.fullmatch(rb"\s*(\d{1,18})\s*", raw)
    if not m:
        raise DistconvError(f"{tracker} holds {raw[:40]!r}, not an iteration number (MindFormers writes the number "
                            "of the last saved iteration)")
    iteration = int(m.group(1))
    folder = root / f"iteration_{iteration:08d}"
    if not folder.is_dir():
        megatron = any(root.glob("iter_*")) or (root / "release").is_dir()
        raise DistconvError(f"iteration {iteration} not found: {folder} does not exist"
                            + (" (this is a Megatron-LM save root: export reads it, import --source mindspore reads "
                               "MindFormers' iteration_XXXXXXXX folders)" if megatron else ""))
    real = folder.resolve()
    if real == root.resolve() or not real.is_relative_to(root.resolve()):
        raise DistconvError(f"{folder} leads out of the save root {root} (a symlink to {real}): refused")
    return folder


def _model_files(folder: Path) -> list[Path]:
    """The model files of one MindFormers iteration folder: every rank's, nothing else."""
    files = sorted(folder.glob("*.safetensors"))
    model = [(f, _MODEL_FILE.fullmatch(f.name)) for f in files]
    model = [(f, m) for f, m in model if m]
    other = [f.name for f in files if not _MODEL_FILE.fullmatch(f.name) and not _OPT_FILE.fullmatch(f.name)]
    if other:
        raise DistconvError(f"{folder} holds {', '.join(other[:4])}: a MindFormers iteration folder holds "
                            "[PREFIX-]model-RRRRRRR-NNNNNNN.safetensors and opt-* files only")
    if not model:
        raise DistconvError(f"{folder} holds no model-RRRRRRR-NNNNNNN.safetensors files (an unfinished save, or "
                            "optimizer files only)")
    prefixes = sorted({m.group("prefix") or "" for _, m in model})
    counts = sorted({int(m.group("count")) for _, m in model})
    if len(prefixes) > 1 or len(counts) > 1:
        raise DistconvError(f"{folder} mixes model files of several saves: {', '.join(f.name for f, _ in model[:4])}")
    missing = sorted(set(range(counts[0])) - {int(m.group("rank")) for _, m in model})
    if missing:
        name = model[0][0].name
        raise DistconvError(f"{folder} lacks {len(missing)} of its {counts[0]} model files, e.g. "
                            f"{name[:name.rindex('model-')]}model-{missing[0]:07d}-{counts[0]:07d}.safetensors")
    return [f for f, _ in model]


def source_files(load: str | Path) -> tuple[list[Path], Path]:
    """``--load`` as the safetensors files to read, and the folder (or file) they were found in."""
    path = Path(load)
    if path.is_file():
        return [path], path
    if not path.is_dir():
        raise DistconvError(f"--load {path}: no such file or directory")
    if (path / TRACKER).exists():
        path = _tracked_folder(path)
    if _ITERATION.fullmatch(path.name) or (path / "common.json").is_file():
        return _model_files(path), path
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DistconvError(f"--load {path} holds no .safetensors files (and no {TRACKER})")
    return files, path


def qkv_rows(layout: str, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """The rows of a fused QKV tensor that hold HF q, k and v (in HF's row order)."""
    if layout == "contiguous":  # [Q; K; V]
        q, kv = heads * head_dim, groups * head_dim
        return torch.arange(q), q + torch.arange(kv), q + kv + torch.arange(kv)
    per_group = heads // groups * head_dim  # grouped: per KV head, its query heads, its key, its value
    start = (torch.arange(groups) * (per_group + 2 * head_dim))[:, None]
    return ((start + torch.arange(per_group)).flatten(), (start + per_group + torch.arange(head_dim)).flatten(),
            (start + per_group + head_dim + torch.arange(head_dim)).flatten())


def fc1_rows(layout: str, ffn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a fused gate/up tensor that hold HF gate_proj and up_proj."""
    if layout == "concatenated":  # [gate; up]
        return torch.arange(ffn), ffn + torch.arange(ffn)
    return 2 * torch.arange(ffn), 2 * torch.arange(ffn) + 1  # interleaved: g0, u0, g1, u1, ...


class MindSporeSource:
    """MindSpore-named safetensors seen under HF names; vocab rows cut to the true vocab.

    An HF tensor is a whole MindSpore tensor, or some rows of a fused one (``rows``): reading a
    box of it reads only the span of fused rows the box needs.
    """

    def __init__(self, path: str | Path, vocab_size: int | None = None, values: dict[str, Any] | None = None) -> None:
        files, self.folder = source_files(path)
        self.files = SafetensorsFiles(files, " (distributed MindSpore weights: merge them into whole tensors first)")
        values = values or {}
        self.to_ms: dict[str, str] = {}
        self.rows: dict[str, torch.Tensor] = {}
        unmapped, fused, unordered = [], [], {}
        for ms in self.files.names():
            hf = hf_name(ms)
            if hf is not None:
                self._add(hf, ms)
                continue
            for pattern, names, setting in _FUSED:
                m = pattern.match(ms)
                if m:
                    layout = _FIXED[names] if setting is None else values.get(setting)
                    if layout is None:
                        unordered.setdefault(setting, ms)
                    fused.append((ms, tuple(n.format(**m.groupdict()) for n in names), layout))
                    break
            else:
                unmapped.append(ms)
        if unmapped:
            raise DistconvError(f"MindSpore parameter names with no mapping: {', '.join(sorted(unmapped)[:12])}"
                                f"{' ...' if len(unmapped) > 12 else ''} (supported: legacy MindFormers Llama names and "
                                "parallel_core names of dense GPT models; see docs/import-reshard.md)")
        if unordered:
            raise DistconvError(
                f"the checkpoint's fused parallel_core tensors ({', '.join(sorted(unordered.values()))}, ...) do "
                "not record their row order, which is a training setting: pass the run's MindFormers YAML with "
                "--ms-config, or " + " and ".join(f"--{s.replace('_', '-')} {'|'.join(LAYOUTS[s][0])} (MindFormers' "
                                                 f"{LAYOUTS[s][1]})" for s in sorted(unordered)))
        for ms, names, layout in fused:
            rows = self._fused_rows(ms, names, layout, values)
            for hf, r in zip(names, rows):
                self._add(hf, ms)
                self.rows[hf] = r
        if "model.embed_tokens.weight" not in self.to_ms:
            raise DistconvError(f"{path} has no word embedding (tok_embeddings / word_embeddings)")
        self.vocab_size = vocab_size or self.files.shape(self.to_ms["model.embed_tokens.weight"])[0]

    def _add(self, hf: str, ms: str) -> None:
        if hf in self.to_ms:
            raise DistconvError(f"{ms} and {self.to_ms[hf]} both map to {hf}")
        self.to_ms[hf] = ms

    def _fused_rows(self, ms: str, names: tuple[str, ...], layout: str, values: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        heads, hidden = values.get("num_attention_heads"), values.get("hidden_size")
        needed = ("num_attention_heads", "hidden_size") if len(names) == 3 else ("ffn_hidden_size",)
        if any(not values.get(n) for n in needed):
            raise DistconvError(f"splitting {ms} needs the model shape: {', '.join(needed)}")
        rows = self.files.shape(ms)[0]
        if len(names) == 3:
            groups = values.get("num_query_groups") or heads
            head_dim = values.get("kv_channels") or hidden // heads
            if heads % groups:
                raise DistconvError(f"num_attention_heads {heads} is not a multiple of num_query_groups {groups}")
            expected, what = (heads + 2 * groups) * head_dim, f"({heads} + 2 x {groups} heads) x head dim {head_dim}"
            out = qkv_rows(layout, heads, groups, head_dim)
        else:
            ffn = values["ffn_hidden_size"]
            expected, what = 2 * ffn, f"2 x ffn_hidden_size {ffn}"
            out = fc1_rows(layout, ffn)
        if rows != expected:
            raise DistconvError(f"{ms} has {rows} rows, but the model shape gives {what} = {expected}")
        return out

    def names(self) -> list[str]:
        return list(self.to_ms)

    def file_of(self, name: str) -> str:
        return self.files.file_of(self.to_ms[name])

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.files.shape(self.to_ms[name])
        if name in self.rows:
            return (len(self.rows[name]),) + shape[1:]
        if name in _VOCAB_ROWS:
            if shape[0] < self.vocab_size:
                raise DistconvError(f"{self.to_ms[name]} has {shape[0]} rows, fewer than the vocab size {self.vocab_size}")
            return (self.vocab_size,) + shape[1:]
        return shape

    def dtype(self, name: str) -> torch.dtype:
        return self.files.dtype(self.to_ms[name])

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        if name not in self.rows:
            return self.files.read(self.to_ms[name], box)
        rows = self.rows[name][box[0] if box else slice(None)]
        if len(rows) == 0:
            return self.files.read(self.to_ms[name], (slice(0, 0),) + tuple(box[1:]))
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return self.files.read(self.to_ms[name], (slice(lo, hi),) + tuple(box[1:]))[rows - lo]


# distconv setting -> its spellings in a MindFormers model_config (legacy LlamaConfig, parallel_core,
# HF config.json names), as MindFormers' own config conversion reads them
_MF_NAMES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_layers", "num_hidden_layers", "n_layer"),
    "hidden_size": ("hidden_size",),
    "ffn_hidden_size": ("intermediate_size", "ffn_hidden_size"),
    "num_attention_heads": ("num_heads", "num_attention_heads", "n_head"),
    "num_query_groups": ("n_kv_heads", "num_key_value_heads", "num_query_groups"),
    "kv_channels": ("head_dim", "kv_channels"),
    "norm_epsilon": ("rms_norm_eps", "layernorm_epsilon", "layer_norm_epsilon"),
    "rotary_base": ("rope_theta", "theta", "rotary_base"),
    "max_position_embeddings": ("max_position_embeddings", "max_position_embedding"),
    "seq_length": ("seq_length",),
    "add_qkv_bias": ("qkv_has_bias", "attention_bias", "add_qkv_bias"),
    "qk_layernorm": ("use_qk_norm", "qk_layernorm"),
    "normalization": ("normalization",),
    "position_embedding_type": ("position_embedding_type",),
    "init_method_std": ("init_method_std", "initializer_range"),
}
_OFF = (None, False, 0, "None", "none", {}, [])
# model_config settings that change the model in ways this import does not express: value must be harmless
_MF_REFUSED: dict[str, Any] = {
    "rope_scaling": lambda v: v in _OFF or (isinstance(v, dict) and v.get("rope_type", v.get("type")) == "default"),
    "use_rope_scaling": lambda v: v in _OFF, "extend_method": lambda v: v in _OFF,
    "rotary_seq_len_interpolation_factor": lambda v: v in (None, 1, 1.0),
    "partial_rotary_factor": lambda v: v in (None, 1, 1.0), "rotary_percent": lambda v: v in (None, 1, 1.0),
    "rotary_interleaved": lambda v: v in _OFF,
    "num_experts": lambda v: v in (*_OFF, 1), "expert_num": lambda v: v in (*_OFF, 1),
    "n_routed_experts": lambda v: v in (*_OFF, 1), "num_moe_experts": lambda v: v in (*_OFF, 1),
    "moe_config": lambda v: v in _OFF or (isinstance(v, dict) and v.get("expert_num") in (*_OFF, 1)),
    "multi_latent_attention": lambda v: v in _OFF,
    "mtp_num_layers": lambda v: v in _OFF, "num_nextn_predict_layers": lambda v: v in _OFF, "mtp_depth": lambda v: v in _OFF,
    "add_bias_linear": lambda v: v in _OFF, "attn_proj_has_bias": lambda v: v in _OFF,
    "add_mlp_fc1_bias_linear": lambda v: v in _OFF, "add_mlp_fc2_bias_linear": lambda v: v in _OFF,
    "use_sliding_window": lambda v: v in _OFF, "window_size": lambda v: v in _OFF,
    "sandwich_norm": lambda v: v in _OFF, "apply_residual_connection_post_layernorm": lambda v: v in _OFF,
    "use_alibi_mask": lambda v: v in _OFF, "gated_linear_unit": lambda v: v in (None, True),
    "hidden_act": lambda v: v in (None, "silu", "swiglu", "fusedswiglu"),
}


def _mf_model_settings(config: dict[str, Any], where: str) -> dict[str, Any]:
    """One MindFormers model_config (or HF config.json) as distconv settings; refuses what it cannot express."""
    refused = [f"{k}: {config[k]!r}" for k, harmless in _MF_REFUSED.items() if k in config and not harmless(config[k])]
    rope = config.get("rope_parameters")  # transformers 5 config.json
    if isinstance(rope, dict):
        if rope.get("rope_type", "default") != "default":
            refused.append(f"rope_parameters: {rope!r}")
        config = {**config, **({"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {})}
    if refused:
        raise DistconvError(f"{where}: {', '.join(refused)}: not expressible by this import (RoPE scaling, experts, "
                            "MLA, MTP, linear biases, windows and activations other than SwiGLU are refused)")
    out: dict[str, Any] = {}
    for setting, spellings in _MF_NAMES.items():
        found = {k: config[k] for k in spellings if config.get(k) is not None}
        if len(set(map(repr, found.values()))) > 1:
            raise DistconvError(f"{where}: {', '.join(f'{k}: {v!r}' for k, v in found.items())} disagree")
        if found:
            out[setting] = next(iter(found.values()))
    for setting, (kind, _) in MODEL_FLAGS.items():
        if setting in out and kind is not str:
            try:
                out[setting] = kind(out[setting])
            except (TypeError, ValueError):
                raise DistconvError(f"{where}: {setting} {out[setting]!r} is not a number") from None
    for setting in MODEL_SWITCHES:
        if setting in out:
            out[setting] = bool(out[setting])
    return out


def mindformers_settings(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A MindFormers run config (YAML: ``model.model_config``, ``pretrained_model_dir``, ``use_legacy``)."""
    model_config = (data.get("model") or {}).get("model_config") if isinstance(data.get("model"), dict) else None
    if not isinstance(model_config, dict):
        raise DistconvError(f"--ms-config {where} has no model.model_config mapping: not a MindFormers run config")
    values: dict[str, Any] = {}
    pretrained = data.get("pretrained_model_dir")
    if pretrained and (Path(pretrained) / "config.json").is_file():  # MindFormers 1.6+: the HF config, overridden
        hf_config = Path(pretrained) / "config.json"
        try:
            base = json.loads(hf_config.read_text())
        except (OSError, ValueError) as e:
            raise DistconvError(f"{hf_config} (pretrained_model_dir of {where}): {e}") from None
        values.update(_mf_model_settings(base, str(hf_config)))
        values["_read"] = str(hf_config)  # a file outside the checkpoint the run reads (see model_settings)
    values.update(_mf_model_settings(model_config, f"{where} model.model_config"))
    legacy = bool(data.get("use_legacy", True))  # MindFormers' default: the legacy models
    if legacy and values.get("ffn_hidden_size") is None and values.get("hidden_size"):
        # the legacy Llama FeedForward's own size rule when intermediate_size is not given
        ffn, multiplier = 4 * int(values["hidden_size"]), model_config.get("ffn_dim_multiplier")
        if multiplier is not None:
            ffn = int((multiplier + 0.01) * ffn)
        multiple_of = int(model_config.get("multiple_of", 256))
        values["ffn_hidden_size"] = multiple_of * -(-int(2 * ffn / 3) // multiple_of)
    values.setdefault("swiglu", True)  # both generations' MLPs are gated (hidden_act checked above)
    values["ms_qkv_layout"] = "contiguous" if model_config.get("use_contiguous_weight_layout_attention") else "grouped"
    values["ms_fc1_layout"] = ("interleaved" if model_config.get("use_interleaved_weight_layout_mlp", True)
                               else "concatenated")
    if pretrained and values.get("num_layers") is None:
        values["_pretrained_note"] = str(pretrained)
    return values


def _read_config(ms_config: str) -> dict[str, Any]:
    """``--ms-config``: a MindFormers run config (YAML or JSON) or a JSON key file, as settings."""
    path = Path(ms_config)
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # OSError, JSON and YAML errors
        raise DistconvError(f"--ms-config {ms_config}: {e}") from None
    if not isinstance(data, dict):
        raise DistconvError(f"--ms-config {ms_config} holds a {type(data).__name__}, not a mapping")
    if "model" in data:
        return mindformers_settings(data, ms_config)
    unknown = sorted(set(data) - set(MODEL_FLAGS) - set(MODEL_SWITCHES) - set(LAYOUTS))
    if unknown:
        raise DistconvError(f"--ms-config {ms_config}: unknown keys {', '.join(unknown)}")
    for name, (choices, _) in LAYOUTS.items():
        if name in data and data[name] not in choices:
            raise DistconvError(f"--ms-config {ms_config}: {name} {data[name]!r}: choose {' or '.join(choices)}")
    return data


def model_settings(ms_config: str | None, flags: Any, read: list[Path] | None = None) -> dict[str, Any]:
    """The model's settings from ``--ms-config`` and the flags; ``read`` gets the files outside the
    checkpoint that were read for them besides ``--ms-config`` (the YAML's pretrained ``config.json``)."""
    values: dict[str, Any] = _read_config(ms_config) if ms_config else {}
    for name in (*MODEL_FLAGS, *MODEL_SWITCHES, *LAYOUTS):
        if getattr(flags, name, None) is not None:
            values[name] = getattr(flags, name)
    note = values.pop("_pretrained_note", None)
    if (pretrained := values.pop("_read", None)) is not None and read is not None:
        read.append(Path(pretrained))
    missing = [n for n in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads") if values.get(n) is None]
    if missing:
        raise DistconvError("--source mindspore needs the model shape: " + ", ".join("--" + m.replace("_", "-") for m in missing)
                            + (f" (the YAML takes it from pretrained_model_dir {note}, which has no config.json here)"
                               if note else ""))
    return values


def megatron_namespace(values: dict[str, Any], vocab: int, tied: bool) -> argparse.Namespace:
    """The settings as Megatron-LM args, so ``spec_from_args`` (the export path) describes the model."""
    heads = values["num_attention_heads"]
    groups = values.get("num_query_groups") or heads
    settings = {n: values.get(n, default) for n, (_, default) in MODEL_FLAGS.items()}
    settings.update({n: bool(values.get(n, False)) for n in MODEL_SWITCHES})
    settings.update(
        group_query_attention=groups != heads, num_query_groups=groups, padded_vocab_size=vocab,
        max_position_embeddings=settings["max_position_embeddings"] or settings["seq_length"] or 4096,
        untie_embeddings_and_output_weights=not tied,
    )
    return argparse.Namespace(**settings)


def open_mindspore(load: str | Path, ms_config: str | None, flags: Any) -> HFSource:
    """MindSpore Transformers safetensors as an import source: HF names, and the HF config of the
    family the model shape (``--ms-config`` or flags) describes."""
    read: list[Path] = []
    values = model_settings(ms_config, flags, read)
    source = MindSporeSource(load, values.get("true_vocab_size"), values)
    names = source.names()
    for switch, suffix in (("qk_layernorm", ".self_attn.q_norm.weight"), ("add_qkv_bias", ".self_attn.q_proj.bias")):
        if values.get(switch) is None:  # not stated: the checkpoint has the tensors or not
            values[switch] = any(n.endswith(suffix) for n in names)
    rows = source.files.shape(source.to_ms["model.embed_tokens.weight"])[0]
    if values.get("padded_vocab_size") not in (None, rows):
        raise DistconvError(f"--padded-vocab-size {values['padded_vocab_size']} but the embedding has {rows} rows")
    tied = "lm_head.weight" not in names
    if values.get("untie_embeddings_and_output_weights") and tied:
        raise DistconvError("--untie-embeddings-and-output-weights given but the checkpoint has no output layer")
    spec = spec_from_args(megatron_namespace(values, source.vocab_size, tied)).with_vocab(source.vocab_size)
    config = pick_family(FAMILIES, spec, None).hf_config(spec)
    files = sorted(set(source.files.where.values()))
    extra = (Path(ms_config),) if ms_config else ()
    inputs = (load, ms_config, *read, *files, Path(load) / TRACKER)  # every file read: links are followed
    return HFSource(source, config, None, f"MindSpore Transformers {source.folder}", inputs,
                    {"files": file_identity(files, *extra), "settings": values})
