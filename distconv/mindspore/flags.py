"""The command line's model-shape flags for ``import --source mindspore``: Megatron-LM's arg names,
typed by the args table (``megatron.args``, read when a value is parsed, so that ``--help``
loads no torch), with the defaults of MindSpore's conversion command."""

from __future__ import annotations

import argparse
from typing import Any


class _Typed:
    """Converts a flag's text as the args table types Megatron-LM arg ``name``."""

    def __init__(self, name: str) -> None:
        self.__name__ = name  # argparse names it in "invalid ... value"

    def __call__(self, text: Any) -> Any:
        from distconv.megatron.args import arg_type

        return arg_type(self.__name__)(text)


# layout setting -> (choices, MindFormers' own setting and which value of it gives each choice)
LAYOUTS: dict[str, tuple[tuple[str, str], str]] = {
    "ms_qkv_layout": (("grouped", "contiguous"), "use_contiguous_weight_layout_attention (False: grouped, the "
                      "default; True: contiguous)"),
    "ms_fc1_layout": (("interleaved", "concatenated"), "use_interleaved_weight_layout_mlp (True: interleaved, "
                      "the default; False: concatenated)"),
}
# flag -> (type, default): Megatron-LM's args (types from the args table), with the defaults of
# MindSpore's conversion command (``convert.py --loader core_mf``: a Llama-style model), and the true vocab
MODEL_FLAGS: dict[str, tuple[Any, Any]] = {
    **{name: (_Typed(name), default) for name, default in (
        ("num_layers", None), ("hidden_size", None), ("ffn_hidden_size", None), ("num_attention_heads", None),
        ("num_query_groups", None), ("kv_channels", None), ("seq_length", None), ("max_position_embeddings", None),
        ("normalization", "RMSNorm"), ("norm_epsilon", 1e-5), ("position_embedding_type", "rope"),
        ("rotary_base", 10000.0), ("padded_vocab_size", None), ("init_method_std", 0.02))},
    "true_vocab_size": (int, None),
}
MODEL_SWITCHES = ("swiglu", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-shape flags for ``--source mindspore`` (ignored for HF, whose config.json says it all)."""
    group = parser.add_argument_group("model shape for --source mindspore (or --ms-config with these keys)")
    group.add_argument("--ms-config", help="the run's MindFormers YAML (model.model_config, and pretrained_model_dir's "
                       "config.json), or a JSON file with the keys below (underscores); flags override it")
    for name, (kind, _) in MODEL_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    for name in MODEL_SWITCHES:
        group.add_argument("--" + name.replace("_", "-"), action="store_const", const=True, default=None)
    for name, (choices, meaning) in LAYOUTS.items():
        group.add_argument("--" + name.replace("_", "-"), choices=choices, default=None,
                           help=f"row order of a parallel_core fused tensor; MindFormers' {meaning}")
