"""MindSpore Transformers safetensors as an import source (Llama/Qwen-style GPT models).

MindSpore Transformers saves unsharded weights under its own parameter names; this module
renames them to the HF names the family tables use (values are laid out as in HF: one
``[out, in]`` matrix per projection) and takes the model's shape from command-line flags
(the ones the MindSpore docs' ``convert.py --loader core_mf`` command lists) or a JSON file.
Two naming generations are understood:

- ``legacy``: MindFormers' ``LlamaForCausalLM`` family (r1.x ``mindformers/models/llama``):
  ``model.tok_embeddings.embedding_weight``, ``model.layers.N.attention.wq/wk/wv/wo``,
  ``attention_norm``, ``ffn_norm``, ``feed_forward.w1/w2/w3``, ``model.norm_out``, ``lm_head``.
- ``mcore``: the ``parallel_core`` models (e.g. Qwen3 in 1.6+): ``embedding.word_embeddings``,
  ``decoder.layers.N.self_attention.linear_q/linear_k/linear_v/linear_proj``, ``q_layernorm``,
  ``k_layernorm``, ``input_layernorm``, ``pre_mlp_layernorm``, ``mlp.gating/hidden/linear_fc2``,
  ``decoder.final_layernorm``, ``output_layer`` (optionally under a ``model.`` prefix).

Fused forms (``w_qkv``, ``w_gate_hidden``, ``linear_qkv``, ``linear_fc1``) are not mapped; any
name that does not map is an error that lists it.
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
from distconv.sources.hf import HFSource, SafetensorsFiles, file_identity
from distconv.spec import spec_from_args

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
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def hf_name(ms_name: str) -> str | None:
    for pattern, hf in _TABLES:
        m = pattern.match(ms_name)
        if m:
            return hf.format(**m.groupdict())
    return None


class MindSporeSource:
    """MindSpore-named safetensors seen under HF names; vocab rows cut to the true vocab."""

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        self.files = SafetensorsFiles(path)
        self.to_ms: dict[str, str] = {}
        unmapped = []
        for ms in self.files.names():
            hf = hf_name(ms)
            if hf is None:
                unmapped.append(ms)
            elif hf in self.to_ms:
                raise DistconvError(f"{ms} and {self.to_ms[hf]} both map to {hf}")
            else:
                self.to_ms[hf] = ms
        if unmapped:
            raise DistconvError(f"MindSpore parameter names with no mapping: {', '.join(sorted(unmapped)[:12])}"
                                f"{' ...' if len(unmapped) > 12 else ''} (supported: legacy MindFormers Llama names and "
                                "mcore-style parallel_core names with separate q/k/v and gating/hidden; see README)")
        if "model.embed_tokens.weight" not in self.to_ms:
            raise DistconvError(f"{path} has no word embedding (tok_embeddings / word_embeddings)")
        self.vocab_size = vocab_size or self.files.shape(self.to_ms["model.embed_tokens.weight"])[0]

    def names(self) -> list[str]:
        return list(self.to_ms)

    def file_of(self, name: str) -> str:
        return self.files.file_of(self.to_ms[name])

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.files.shape(self.to_ms[name])
        if name in _VOCAB_ROWS:
            if shape[0] < self.vocab_size:
                raise DistconvError(f"{self.to_ms[name]} has {shape[0]} rows, fewer than the vocab size {self.vocab_size}")
            return (self.vocab_size,) + shape[1:]
        return shape

    def dtype(self, name: str) -> torch.dtype:
        return self.files.dtype(self.to_ms[name])

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        return self.files.read(self.to_ms[name], box)


# flag -> (type, default); names and meaning as in Megatron-LM's arguments (seed command's flags)
MODEL_FLAGS: dict[str, tuple[Any, Any]] = {
    "num_layers": (int, None), "hidden_size": (int, None), "ffn_hidden_size": (int, None),
    "num_attention_heads": (int, None), "num_query_groups": (int, None), "kv_channels": (int, None),
    "seq_length": (int, None), "max_position_embeddings": (int, None), "normalization": (str, "RMSNorm"),
    "norm_epsilon": (float, 1e-5), "position_embedding_type": (str, "rope"), "rotary_base": (float, 10000.0),
    "true_vocab_size": (int, None), "padded_vocab_size": (int, None), "init_method_std": (float, 0.02),
}
MODEL_SWITCHES = ("swiglu", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-shape flags for ``--source mindspore`` (ignored for HF, whose config.json says it all)."""
    group = parser.add_argument_group("model shape for --source mindspore (or --ms-config JSON with these keys)")
    group.add_argument("--ms-config", help="JSON file with the keys below (underscores); flags override it")
    for name, (kind, _) in MODEL_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    for name in MODEL_SWITCHES:
        group.add_argument("--" + name.replace("_", "-"), action="store_const", const=True, default=None)


def model_settings(ms_config: str | None, flags: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if ms_config:
        try:
            values = json.loads(Path(ms_config).read_text())
        except (OSError, ValueError) as e:
            raise DistconvError(f"--ms-config {ms_config}: {e}") from None
        unknown = sorted(set(values) - set(MODEL_FLAGS) - set(MODEL_SWITCHES))
        if unknown:
            raise DistconvError(f"--ms-config {ms_config}: unknown keys {', '.join(unknown)}")
    for name in (*MODEL_FLAGS, *MODEL_SWITCHES):
        if getattr(flags, name, None) is not None:
            values[name] = getattr(flags, name)
    missing = [n for n in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads") if values.get(n) is None]
    if missing:
        raise DistconvError("--source mindspore needs the model shape: " + ", ".join("--" + m.replace("_", "-") for m in missing))
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
    values = model_settings(ms_config, flags)
    source = MindSporeSource(load, values.get("true_vocab_size"))
    rows = source.files.shape(source.to_ms["model.embed_tokens.weight"])[0]
    if values.get("padded_vocab_size") not in (None, rows):
        raise DistconvError(f"--padded-vocab-size {values['padded_vocab_size']} but the embedding has {rows} rows")
    tied = "lm_head.weight" not in source.names()
    if values.get("untie_embeddings_and_output_weights") and tied:
        raise DistconvError("--untie-embeddings-and-output-weights given but the checkpoint has no output layer")
    spec = spec_from_args(megatron_namespace(values, source.vocab_size, tied)).with_vocab(source.vocab_size)
    config = pick_family(FAMILIES, spec, None).hf_config(spec)
    files = sorted(set(source.files.where.values()))
    extra = (Path(ms_config),) if ms_config else ()
    return HFSource(source, config, None, f"MindSpore Transformers {load}", (load, ms_config),
                    {"files": file_identity(files, *extra), "settings": values})
