"""Kimi-K2 and Moonlight as their hub releases spell them (tests only).

Kimi-K2's ``config.json`` says ``model_type: kimi_k2``, which transformers 5.24 lacks, with an
``auto_map`` to the release's own Python files, RoPE as pre-v5 ``rope_scaling`` with the old
``type`` key, and DeepSeek's fields that transformers ignores (``seq_aux``, ``aux_loss_alpha``...).
Moonlight's says ``deepseek_v3`` with the same ``auto_map``. Written here from a model's numbers,
not by distconv, so that what distconv reads is what the hub holds.

transformers has no ``kimi_k2``: it loads such a folder only from a copy whose ``config.json``
says ``deepseek_v3`` (``transformers_copy``). (Its ``DeepseekV3ForCausalLM.from_pretrained`` of the
folder as it is would leave the routed experts unloaded: the per-expert keys are converted by
model type.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
# the release's code files, here made to fail loudly if anything ever imports or runs them
REMOTE_CODE = "raise SystemExit('the release\\'s own code was run')\n"
FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# Kimi-K2's RoPE (its hub config, old ``type`` key) and routing
KIMI_ROPE = {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
             "original_max_position_embeddings": 4096, "type": "yarn"}
KIMI_SCALING, MOONLIGHT_SCALING = 2.827, 2.446


def hub_config(*, model_type: str, vocab_size: int, hidden_size: int, intermediate_size: int, layers: int, heads: int,
               dense_layers: int, experts: int, topk: int, expert_width: int, shared: int, q_lora_rank: int | None,
               kv_lora_rank: int, nope: int, rope: int, v: int, scaling: float, rope_theta: float,
               rope_scaling: dict[str, Any] | None, eps: float, max_positions: int,
               quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``config.json`` as Kimi-K2's (``kimi_k2``) or Moonlight's (``deepseek_v3``) release writes it."""
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "auto_map": AUTO_MAP, "model_type": model_type,
        "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "ep_size": 1,
        "first_k_dense_replace": dense_layers, "hidden_act": "silu", "hidden_size": hidden_size,
        "initializer_range": 0.02, "intermediate_size": intermediate_size, "kv_lora_rank": kv_lora_rank,
        "max_position_embeddings": max_positions, "moe_intermediate_size": expert_width, "moe_layer_freq": 1,
        "n_group": 1, "n_routed_experts": experts, "n_shared_experts": shared, "norm_topk_prob": True,
        "num_attention_heads": heads, "num_experts_per_tok": topk, "num_hidden_layers": layers,
        "num_key_value_heads": heads, "num_nextn_predict_layers": 0, "pretraining_tp": 1, "q_lora_rank": q_lora_rank,
        "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "rms_norm_eps": eps, "rope_theta": rope_theta,
        "routed_scaling_factor": scaling, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
        "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.48.3",
        "use_cache": True, "v_head_dim": v, "vocab_size": vocab_size,
    }
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if quantization is not None:
        config["quantization_config"] = quantization
    return config


def kimi_config_of_args(args: Any, vocab_size: int) -> dict[str, Any]:
    """Kimi-K2's hub config for the model of Megatron-LM ``args`` (a Kimi-style fixture)."""
    freq = list(args.moe_layer_freq)
    return hub_config(
        model_type="kimi_k2", vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
        layers=args.num_layers, heads=args.num_attention_heads, dense_layers=freq.index(1), experts=args.num_experts,
        topk=args.moe_router_topk, expert_width=args.moe_ffn_hidden_size,
        shared=args.moe_shared_expert_intermediate_size // args.moe_ffn_hidden_size, q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank, nope=args.qk_head_dim, rope=args.qk_pos_emb_head_dim, v=args.v_head_dim,
        scaling=args.moe_router_topk_scaling_factor, rope_theta=float(args.rotary_base),
        rope_scaling={**KIMI_ROPE, "factor": float(args.rotary_scaling_factor)}, eps=args.layernorm_epsilon,
        max_positions=args.max_position_embeddings, quantization=FP8)


def write_release(folder: Path, config: dict[str, Any]) -> Path:
    """``config.json`` and the release's Python files (``REMOTE_CODE``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        (folder / name).write_text(REMOTE_CODE)
    return folder


def transformers_copy(folder: Path, out: Path) -> Path:
    """A copy of an HF folder that transformers 5.24 loads: ``model_type`` ``deepseek_v3``, no ``auto_map``."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.py"))
    config = json.loads((out / "config.json").read_text())
    config.pop("auto_map", None)
    (out / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v3"}, indent=2))
    return out
