"""Write legacy Megatron-LM (``mp_rank_*/model_optim_rng.pt``) checkpoints from HF models.

The layout follows Megatron-LM's legacy GPT model as documented in transformers'
``convert_megatron_gpt2_checkpoint.py`` / ``checkpoint_reshaping_and_interoperability.py``:
``model.language_model.{embedding, encoder|transformer, output_layer}``, fused
``query_key_value`` rows in the order of ``checkpoint_version`` (0: ``[3, np, hn]``, 1.0:
``[np, hn, 3]``, >= 2.0: ``[np, 3, hn]``, grouped per KV head with GQA), TP splits (column
layers on dim 0, row layers on dim 1, vocab rows on dim 0, SwiGLU ``[gate_t; up_t]`` per rank),
PP stages with local layer numbers, and the args/optimizer/RNG entries training leaves
beside the weights. Plain ``torch.save``; no process group. Nothing here is used by the
converter itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB = 250
PADDED_VOCAB = 256
TOKENS_SHAPE = (2, 12)


@dataclasses.dataclass(frozen=True)
class LegacyFixture:
    """One HF model written as a legacy checkpoint at several layouts."""

    family: str  # "gpt2" | "llama"
    version: float | None  # checkpoint_version; None: the key is absent (read as 0)
    seed: int
    layouts: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (2, 2))
    activation: str = "gelu_new"  # GPT-2 only: HF activation_function
    iteration: int | str = 50
    old_names: bool = False  # "transformer"/".attention."/"*_layernorm" spellings of early Megatron-LM


LEGACY_FIXTURES: dict[str, LegacyFixture] = {
    "gpt2_v0": LegacyFixture("gpt2", None, seed=11, activation="gelu", iteration="release", old_names=True),
    "gpt2_v1": LegacyFixture("gpt2", 1.0, seed=12, activation="gelu_new", old_names=True),
    "gpt2_v3": LegacyFixture("gpt2", 3.0, seed=13, activation="gelu_fast"),
    "llama_v3": LegacyFixture("llama", 3.0, seed=14, layouts=((1, 1), (2, 2))),
}


def hf_model(fx: LegacyFixture) -> torch.nn.Module:
    """A tiny HF model with every parameter (norms and biases too) random."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(fx.seed)
    if fx.family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=4, n_head=4,
                            activation_function=fx.activation, layer_norm_epsilon=1e-5,
                            bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(fx.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("ln_" in name or "norm" in name) and name.endswith("weight") else 0.0
            p.copy_(base + (0.2 if base else 0.05) * torch.randn(p.shape, generator=gen))
    return model.eval()


def _args(fx: LegacyFixture, config: Any, tp: int, pp: int) -> argparse.Namespace:
    llama = fx.family == "llama"
    hidden = config.hidden_size
    return argparse.Namespace(
        num_layers=config.num_hidden_layers, hidden_size=hidden,
        ffn_hidden_size=config.intermediate_size if llama else 4 * hidden,
        num_attention_heads=config.num_attention_heads, kv_channels=hidden // config.num_attention_heads,
        group_query_attention=llama, num_query_groups=config.num_key_value_heads if llama else 1,
        max_position_embeddings=config.max_position_embeddings, seq_length=32,
        position_embedding_type="rope" if llama else "learned_absolute", rotary_percent=1.0,
        rotary_base=10000, use_rotary_position_embeddings=llama,
        normalization="RMSNorm" if llama else "LayerNorm", layernorm_epsilon=1e-5,
        swiglu=llama, openai_gelu=fx.activation == "gelu_new" and not llama,
        bias_gelu_fusion=fx.activation == "gelu_fast" and not llama,
        add_bias_linear=not llama, untie_embeddings_and_output_weights=llama,
        vocab_size=VOCAB, padded_vocab_size=PADDED_VOCAB, make_vocab_size_divisible_by=64,
        tokenizer_type="GPT2BPETokenizer", fp16=False, bf16=False, params_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, world_size=tp * pp,
        data_parallel_size=1, ckpt_format="torch", use_mcore_models=False, init_method_std=0.02,
        iteration=0 if fx.iteration == "release" else fx.iteration,
    )


def _qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, tp: int, t: int, version: float) -> torch.Tensor:
    """TP rank ``t``'s fused QKV rows in ``version`` order (``q/k/v``: HF ``[heads*hn, ...]``)."""
    hn = q.shape[0] // heads
    rest = tuple(q.shape[1:])
    qg = q.reshape(groups, heads // groups, hn, *rest)
    kg, vg = k.reshape(groups, 1, hn, *rest), v.reshape(groups, 1, hn, *rest)
    per = groups // tp
    qg, kg, vg = (x[t * per:(t + 1) * per] for x in (qg, kg, vg))
    if version >= 2.0:  # per group [q heads, k, v]
        return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)
    assert groups == heads, "checkpoint versions below 2.0 predate grouped-query attention"
    stacked = torch.stack([qg[:, 0], kg[:, 0], vg[:, 0]])  # [3, np, hn, ...]
    if version >= 1.0:
        return stacked.permute(1, 2, 0, *range(3, stacked.dim())).reshape(-1, *rest)  # [np, hn, 3]
    return stacked.reshape(-1, *rest)  # [3, np, hn]


def _split(t: torch.Tensor, dim: int, tp: int, i: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[i].clone()


def _layer_tensors(fx: LegacyFixture, sd: dict[str, torch.Tensor], config: Any, layer: int, tp: int, t: int, version: float) -> dict[str, torch.Tensor]:
    """One layer's legacy tensors on TP rank ``t`` (keys relative to ``layers.N.``)."""
    heads = config.num_attention_heads
    attn = "attention" if fx.old_names else "self_attention"
    if fx.family == "gpt2":
        h = f"transformer.h.{layer}."
        n = config.n_embd
        w, b = sd[h + "attn.c_attn.weight"].T, sd[h + "attn.c_attn.bias"]
        ln1, ln2 = ("input_layernorm", "post_attention_layernorm") if fx.old_names else ("input_norm", "post_attention_norm")
        return {
            f"{ln1}.weight": sd[h + "ln_1.weight"], f"{ln1}.bias": sd[h + "ln_1.bias"],
            f"{attn}.query_key_value.weight": _qkv_rows(w[:n], w[n:2 * n], w[2 * n:], heads, heads, tp, t, version),
            f"{attn}.query_key_value.bias": _qkv_rows(b[:n], b[n:2 * n], b[2 * n:], heads, heads, tp, t, version),
            f"{attn}.dense.weight": _split(sd[h + "attn.c_proj.weight"].T, 1, tp, t),
            f"{attn}.dense.bias": sd[h + "attn.c_proj.bias"],
            f"{ln2}.weight": sd[h + "ln_2.weight"], f"{ln2}.bias": sd[h + "ln_2.bias"],
            "mlp.dense_h_to_4h.weight": _split(sd[h + "mlp.c_fc.weight"].T, 0, tp, t),
            "mlp.dense_h_to_4h.bias": _split(sd[h + "mlp.c_fc.bias"], 0, tp, t),
            "mlp.dense_4h_to_h.weight": _split(sd[h + "mlp.c_proj.weight"].T, 1, tp, t),
            "mlp.dense_4h_to_h.bias": sd[h + "mlp.c_proj.bias"],
        }
    h = f"model.layers.{layer}."
    gate, up = _split(sd[h + "mlp.gate_proj.weight"], 0, tp, t), _split(sd[h + "mlp.up_proj.weight"], 0, tp, t)
    return {
        "input_norm.weight": sd[h + "input_layernorm.weight"],
        f"{attn}.query_key_value.weight": _qkv_rows(
            sd[h + "self_attn.q_proj.weight"], sd[h + "self_attn.k_proj.weight"], sd[h + "self_attn.v_proj.weight"],
            heads, config.num_key_value_heads, tp, t, version),
        f"{attn}.dense.weight": _split(sd[h + "self_attn.o_proj.weight"], 1, tp, t),
        "post_attention_norm.weight": sd[h + "post_attention_layernorm.weight"],
        "mlp.dense_h_to_4h.weight": torch.cat([gate, up]),
        "mlp.dense_4h_to_h.weight": _split(sd[h + "mlp.down_proj.weight"], 1, tp, t),
    }


def _padded(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, torch.zeros(PADDED_VOCAB - t.shape[0], *t.shape[1:])])


def _model_chunk(fx: LegacyFixture, sd: dict[str, torch.Tensor], config: Any, t: int, tp: int, p: int, pp: int, v: int, vpp: int) -> dict[str, Any]:
    """The model dict of TP rank ``t``, stage ``p``, virtual stage ``v`` (layers numbered locally).

    With virtual stages, chunk ``v`` of stage ``p`` holds global layers from ``(v * pp + p) * n``
    on, ``n = layers / (pp * vpp)``: the interleaved schedule's assignment.
    """
    gpt2 = fx.family == "gpt2"
    embed = _padded(sd["transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"])
    per_chunk = config.num_hidden_layers // (pp * vpp)
    first, last = p == 0 and v == 0, p == pp - 1 and v == vpp - 1
    lm: dict[str, Any] = {}
    encoder: dict[str, torch.Tensor] = {}
    if first:
        lm["embedding"] = {"word_embeddings": {"weight": _split(embed, 0, tp, t)}}
        if gpt2:
            lm["embedding"]["position_embeddings"] = {"weight": sd["transformer.wpe.weight"]}
    for local in range(per_chunk):
        layer = (v * pp + p) * per_chunk + local
        for k, x in _layer_tensors(fx, sd, config, layer, tp, t, fx.version or 0.0).items():
            encoder[f"layers.{local}.{k}"] = x
    model_sd: dict[str, Any] = {"language_model": lm}
    if last:
        final = "final_layernorm" if fx.old_names else "final_norm"
        if gpt2:
            encoder[f"{final}.weight"], encoder[f"{final}.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
            if pp > 1:  # tied head on the last stage
                model_sd["word_embeddings_for_head"] = {"weight": _split(embed, 0, tp, t)}
        else:
            encoder[f"{final}.weight"] = sd["model.norm.weight"]
            lm["output_layer"] = {"weight": _split(_padded(sd["lm_head.weight"]), 0, tp, t)}
    lm["transformer" if fx.old_names else "encoder"] = encoder
    return model_sd


def write_layout(fx: LegacyFixture, model: torch.nn.Module, root: Path, tp: int, pp: int, vpp: int = 1) -> Path:
    """Write ``root`` as a Megatron-LM save root; returns the iteration folder."""
    config = model.config
    sd = {k: x.detach().clone() for k, x in model.state_dict().items()}
    iter_dir = root / ("release" if fx.iteration == "release" else f"iter_{int(fx.iteration):07d}")
    gen = torch.Generator().manual_seed(fx.seed + 100)
    for p in range(pp):
        for t in range(tp):
            chunks = [_model_chunk(fx, sd, config, t, tp, p, pp, v, vpp) for v in range(vpp)]
            models = {"model": chunks[0]} if vpp == 1 else {f"model{v}": c for v, c in enumerate(chunks)}
            args = _args(fx, config, tp, pp)
            args.virtual_pipeline_model_parallel_size = vpp if vpp > 1 else None
            params = [x for c in chunks for x in _flat_tensors(c)]
            state = {
                "args": args,
                "iteration": 0 if fx.iteration == "release" else fx.iteration,
                **models,
                "optimizer": {
                    "optimizer": {
                        "state": {i: {"step": torch.tensor(5.0), "exp_avg": torch.randn(x.shape, generator=gen),
                                      "exp_avg_sq": torch.rand(x.shape, generator=gen)} for i, x in enumerate(params)},
                        "param_groups": [{"lr": 1e-4, "params": list(range(len(params)))}],
                    },
                },
                "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": 50},
                "rng_state": [{
                    "random_rng_state": random.Random(fx.seed).getstate(),
                    "np_rng_state": np.random.RandomState(fx.seed).get_state(),
                    "torch_rng_state": torch.get_rng_state(),
                    "rng_tracker_states": {},
                }],
                "num_floating_point_operations_so_far": 0,
            }
            if fx.version is not None:
                state["checkpoint_version"] = fx.version
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            (iter_dir / name).mkdir(parents=True, exist_ok=True)
            torch.save(state, iter_dir / name / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(fx.iteration))
    return iter_dir


def _flat_tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _flat_tensors(v)]
    return []


def write_zip(iter_dir: Path, out: Path) -> Path:
    """A zip holding ``release/mp_rank_00/model_optim_rng.pt`` (how NVIDIA shipped Megatron GPT-2)."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(iter_dir / "mp_rank_00" / "model_optim_rng.pt", "release/mp_rank_00/model_optim_rng.pt")
    return out


def build_all(out: Path) -> Path:
    """Every ``LEGACY_FIXTURES`` entry at its layouts, the HF originals' logits, and one zip."""
    (out / "refs").mkdir(parents=True, exist_ok=True)
    for name, fx in LEGACY_FIXTURES.items():
        model = hf_model(fx)
        tokens = torch.randint(0, VOCAB, TOKENS_SHAPE, generator=torch.Generator().manual_seed(fx.seed + 7))
        with torch.no_grad():
            logits = model(tokens).logits
        torch.save({"tokens": tokens, "logits": logits.float()}, out / "refs" / f"{name}.pt")
        for tp, pp in fx.layouts:
            iter_dir = write_layout(fx, model, out / name / f"tp{tp}pp{pp}", tp, pp)
            if name == "gpt2_v0" and (tp, pp) == (1, 1):
                write_zip(iter_dir, out / "gpt2_v0.zip")
        if name == "gpt2_v3":  # interleaved pipeline schedule: model0/model1 per file
            write_layout(fx, model, out / name / "tp2pp2vpp2", 2, 2, vpp=2)
    return out
