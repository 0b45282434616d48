"""Build real MindFormers models and save them as MindFormers does; run inside .venv-mindspore.

    .venv-mindspore/bin/python tests/mindspore_run.py REQUEST.json RESULT.json

Used by tests/test_mindspore_real.py (MindSpore 2.9, MindFormers 1.9, CPU). REQUEST holds
``out`` (a scratch folder) and ``tokens`` (token-id rows). Every model gets seeded random
weights (norms around 1, so a swapped mapping shows) and is saved with MindFormers' own
``mindformers.checkpoint.checkpoint.save_checkpoint`` into a save root (tracker,
``iteration_XXXXXXXX/[PREFIX-]model-*.safetensors``, ``common.json``), next to the MindFormers
YAML run config it was built from.

- ``legacy_separate``: legacy ``LlamaForCausalLM`` (GQA, untied, FFN size from
  ``multiple_of``), saved with an optimizer (so ``opt-*`` files lie beside the model);
- ``legacy_concat``: the same generation with ``qkv_concat: True`` and q/k/v biases;
  both run forward on CPU (PyNative, ``fused_rms_norm: False``, ``use_rope_slice: True``) and
  their logits are written as ``.npy``;
- ``qwen3_*``: ``TrainingQwen3ForCausalLM`` (parallel_core) built three times from ONE set of
  HF-layout reference weights, converted by the model's own ``convert_hf_weight``: the default
  layouts (``linear_qkv`` grouped per KV head, ``linear_fc1`` interleaved), with
  ``use_interleaved_weight_layout_mlp: False`` and with
  ``use_contiguous_weight_layout_attention: True``. The training graph cannot run forward on CPU
  (no ``RmsNorm``/``FlashAttentionScore`` kernels), but in graph mode layer 0's MLP cell and its
  attention's q/k/v projection (``get_query_key_value_tensors`` with the q/k norms taken out)
  do: their outputs on one random input are written for the test to recompute from the
  converted weights. The reference weights are written too (``qwen3_reference.npz``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

VOCAB, HIDDEN, HEADS, GROUPS = 250, 64, 4, 2


def randomize(net, seed: int) -> None:
    import mindspore as ms

    rng = np.random.default_rng(seed)
    for param in sorted(net.get_parameters(), key=lambda p: p.name):
        norm = "norm" in param.name
        value = (1.0 if norm else 0.0) + (0.2 if norm else 0.05) * rng.standard_normal(param.shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))


def save(net, root: Path, iteration: int, prefix: str | None = None, optimizer=None) -> None:
    from mindformers.checkpoint.checkpoint import CommonInfo, save_checkpoint

    info = CommonInfo(epoch_num=1, step_num=iteration, global_step=iteration, loss_scale=1.0, global_batch_size=1,
                      ckpt_status=0)
    save_checkpoint(iteration, net, optimizer=optimizer, common_info=info, user_prefix=prefix,
                    save_checkpoint_path=str(root))


def write_yaml(path: Path, use_legacy: bool, model_config: dict) -> None:
    import yaml

    run = {"seed": 0, "run_mode": "train", "use_legacy": use_legacy, "load_checkpoint": "",
           "model": {"model_config": model_config}}
    if use_legacy:
        run["model"]["arch"] = {"type": "LlamaForCausalLM"}
    path.write_text(yaml.safe_dump(run, sort_keys=False))


def legacy(out: Path, tokens: np.ndarray) -> dict:
    import mindspore as ms
    from mindformers import LlamaConfig, LlamaForCausalLM

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    common = dict(type="LlamaConfig", batch_size=tokens.shape[0], seq_length=tokens.shape[1], hidden_size=HIDDEN,
                  num_layers=2, num_heads=HEADS, n_kv_heads=GROUPS, vocab_size=VOCAB, rms_norm_eps=1e-6,
                  theta=10000.0, compute_dtype="float32", layernorm_compute_type="float32",
                  softmax_compute_type="float32", rotary_dtype="float32", param_init_type="float32",
                  use_past=False, use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True)
    cases = {
        # FFN size from the legacy rule: 2/3 of 4 x hidden, rounded up to multiple_of -> 192
        "legacy_separate": dict(common, multiple_of=32, qkv_concat=False),
        "legacy_concat": dict(common, intermediate_size=96, qkv_concat=True, qkv_has_bias=True),
    }
    report = {}
    for n, (name, model_config) in enumerate(cases.items()):
        config = LlamaConfig(**{k: v for k, v in model_config.items() if k != "type"})
        net = LlamaForCausalLM(config)
        randomize(net, seed=n + 1)
        net.set_train(False)
        logits = net(ms.Tensor(tokens, ms.int32))
        logits = (logits[0] if isinstance(logits, tuple) else logits).asnumpy().reshape(*tokens.shape, -1)
        np.save(out / f"{name}_logits.npy", logits)
        optimizer = ms.nn.Adam(net.trainable_params(), learning_rate=1e-3) if name == "legacy_separate" else None
        save(net, out / name, iteration=7 + n, prefix=None if name == "legacy_separate" else "llama", optimizer=optimizer)
        write_yaml(out / f"{name}.yaml", True, model_config)
        report[name] = sorted(p.name for p in net.get_parameters())
    return report


def qwen3(out: Path) -> dict:
    import mindspore as ms
    from mindformers import build_context
    from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    build_context({"use_legacy": False, "context": {"mode": 0, "device_target": "CPU"}, "parallel": {}})
    head_dim, ffn, layers = 32, 96, 2
    model_config = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=head_dim, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, max_position_embeddings=128, seq_length=16, hidden_act="swiglu",
                        tie_word_embeddings=False, params_dtype="float32", compute_dtype="float32",
                        layernorm_compute_dtype="float32", softmax_compute_dtype="float32", rotary_dtype="float32",
                        position_embedding_type="rope", qkv_concat=True, model_type="qwen3",
                        architectures=["Qwen3ForCausalLM"])
    rng = np.random.default_rng(7)
    shapes = {"embedding.word_embeddings.weight": (VOCAB, HIDDEN), "output_layer.weight": (VOCAB, HIDDEN),
              "decoder.final_layernorm.weight": (HIDDEN,)}
    for i in range(layers):
        d = f"decoder.layers.{i}"
        shapes.update({
            f"{d}.input_layernorm.weight": (HIDDEN,), f"{d}.pre_mlp_layernorm.weight": (HIDDEN,),
            f"{d}.self_attention.linear_q.weight": (HEADS * head_dim, HIDDEN),
            f"{d}.self_attention.linear_k.weight": (GROUPS * head_dim, HIDDEN),
            f"{d}.self_attention.linear_v.weight": (GROUPS * head_dim, HIDDEN),
            f"{d}.self_attention.linear_proj.weight": (HIDDEN, HEADS * head_dim),
            f"{d}.self_attention.q_layernorm.weight": (head_dim,), f"{d}.self_attention.k_layernorm.weight": (head_dim,),
            f"{d}.mlp.gating.weight": (ffn, HIDDEN), f"{d}.mlp.hidden.weight": (ffn, HIDDEN),
            f"{d}.mlp.linear_fc2.weight": (HIDDEN, ffn),
        })
    reference = {name: ((1.0 if "norm" in name else 0.0) + (0.2 if "norm" in name else 0.05)
                        * rng.standard_normal(shape)).astype(np.float32) for name, shape in sorted(shapes.items())}
    np.savez(out / "qwen3_reference.npz", **reference)
    probe = rng.standard_normal((5, 1, HIDDEN)).astype(np.float32)  # [seq, batch, hidden]
    np.save(out / "qwen3_probe_input.npy", probe)
    variants = {
        "qwen3_default": {},
        "qwen3_fc1_concatenated": {"use_interleaved_weight_layout_mlp": False},
        "qwen3_qkv_contiguous": {"use_contiguous_weight_layout_attention": True},
    }
    report = {}
    for n, (name, layout) in enumerate(variants.items()):
        net = TrainingQwen3ForCausalLM(Qwen3Config(**model_config, **layout))
        fused = net.convert_hf_weight({k: v for k, v in reference.items() if k.split(".")[-2] in
                                       ("linear_q", "linear_k", "linear_v", "gating", "hidden")})
        weights = {**{k: v for k, v in reference.items() if k.split(".")[-2] not in
                      ("linear_q", "linear_k", "linear_v", "gating", "hidden")}, **fused}
        params = {p.name: p for p in net.get_parameters()}
        if sorted(params) != sorted(weights):
            raise SystemExit(f"{name}: parameters {sorted(params)} but weights {sorted(weights)}")
        for key, value in weights.items():
            params[key].set_data(ms.Tensor(value))
        save(net, out / name, iteration=100 + n, prefix="qwen3")
        write_yaml(out / f"{name}.yaml", False, dict(model_config, **layout))
        layer = net.model.decoder.layers[0]
        mlp_out = layer.mlp(ms.Tensor(probe))[0].asnumpy()
        attention = layer.self_attention
        attention.q_layernorm = attention.k_layernorm = None  # RmsNorm has no CPU kernel: probe the projection only
        q, k, v = (t.asnumpy() for t in attention.get_query_key_value_tensors(ms.Tensor(probe)))
        np.savez(out / f"{name}_probe.npz", mlp=mlp_out, q=q, k=k, v=v)
        report[name] = {"mlp_class": type(layer.mlp).__name__, "attention_class": type(attention).__name__,
                        "parameters": sorted(params)}
    return report


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    out = Path(request["out"]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # MindFormers writes ./output/log
    tokens = np.array(request["tokens"], dtype=np.int32)
    import mindformers
    import mindspore

    result = {"mindspore": mindspore.__version__, "mindformers": mindformers.__version__}
    result["legacy"] = legacy(out, tokens)
    result["qwen3"] = qwen3(out)  # after the legacy models: build_context switches MindFormers to parallel_core
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
