"""Multi-token prediction computed from an HF folder's tensors by the published formula.

DeepSeek-V3's report (section 2.2), for MTP depth ``k`` at position ``i``:
``h'_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]``, ``h^k = TRM_k(h')``,
``P^k_{i+k+1} = OutHead(h^k_i)``. As released (DeepSeek-V3, GLM-4.5), the MTP layer ``k`` is HF
layer ``num_hidden_layers + k``: ``enorm`` (the embedding's norm), ``hnorm`` (the hidden state's),
``eh_proj`` (M_k, taking ``[embedding; hidden]``), a decoder layer, ``shared_head.norm`` and
``shared_head.head`` (the output head), and its own ``embed_tokens`` (GLM-4.6 leaves the last two
out: the main model's are used then); ``h^0`` is the main model's
last hidden state (after its final norm), and each depth feeds the next its normed output.

Only the decoder layer inside comes from transformers (loaded by transformers from the same
folder, as a model with the MTP layers counted as ordinary layers); everything else is written
here from the tensors, independently of distconv's tables.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.no_grad()
def hf_mtp_logits(folder: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' logits of the main model, and each MTP depth's logits at every position
    (the token after the last is taken as id 0, as megatron-core rolls its inputs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    n = config.num_hidden_layers
    depth = getattr(config, "num_mtp_layers", None) or config.num_nextn_predict_layers  # DeepSeek-V3.2: no alias
    main = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False).eval()
    # the same folder with the MTP layers as ordinary decoder layers: transformers loads their weights
    # per-layer type lists (DeepSeek-V3.2's mlp_layer_types, ...) grow by the MTP layers, built like the last layer
    grown = {key: value + value[-1:] * depth for key in ("mlp_layer_types", "layer_types", "indexer_types")
             if isinstance(value := getattr(config, key, None), list)}
    extended = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, num_hidden_layers=n + depth,
                                                    **grown, trust_remote_code=False).eval()
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(str(f)).items() if k.startswith("model.layers.")})
    out = main.model(input_ids=tokens)
    hidden, logits = out.last_hidden_state, main(input_ids=tokens).logits
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None].expand(b, 1, s, s)
    eps = config.rms_norm_eps
    ids, per_depth = tokens, []
    for k in range(depth):
        at = f"model.layers.{n + k}."
        w = {name.removeprefix(at): t for name, t in weights.items() if name.startswith(at)}
        ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        # the layer's own copies of the embedding and output head, where the folder has them
        emb = torch.nn.functional.embedding(ids, w.get("embed_tokens.weight", main.model.embed_tokens.weight))
        x = torch.cat([_rms(emb, w["enorm.weight"], eps), _rms(hidden, w["hnorm.weight"], eps)], dim=-1) @ w["eh_proj.weight"].T
        layer = extended.model.layers[n + k]
        rope = extended.model.rotary_emb(x, positions)
        x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        x = x[0] if isinstance(x, tuple) else x
        hidden = _rms(x, w["shared_head.norm.weight"], eps)
        per_depth.append(hidden @ w.get("shared_head.head.weight", main.lm_head.weight).T)
    return logits, per_depth


@torch.no_grad()
def qwen3_next_mtp_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The MTP logits of a Qwen3-Next folder laid out as its release is (one MTP layer apart from the
    model's: ``mtp.*``), by the same formula: ``h' = fc [RMSNorm(Emb(t_{i+1})); RMSNorm(h)]`` with
    ``pre_fc_norm_embedding`` and ``pre_fc_norm_hidden``, the decoder layer ``mtp.layers.0`` (built
    like the model's last), ``mtp.norm``, then the model's own output head. Its norms are zero-centred,
    as every Qwen3-Next RMSNorm: ``x_hat * (1 + w)``. As vLLM's ``Qwen3NextMTP`` computes it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    n = config.num_hidden_layers
    main = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update({k.removeprefix("mtp."): v.float() for k, v in load_file(str(f)).items() if k.startswith("mtp.")})
    # the decoder layer, loaded by transformers as layer n of the model grown by one layer like the last
    with tempfile.TemporaryDirectory() as tmp:
        grown = AutoConfig.from_pretrained(str(folder), num_hidden_layers=n + 1,
                                           layer_types=config.layer_types + config.layer_types[-1:])
        grown.save_pretrained(tmp)
        state = {k: v for k, v in main.state_dict().items()}
        state.update({f"model.layers.{n}." + k.removeprefix("layers.0."): v for k, v in weights.items() if k.startswith("layers.0.")})
        main.__class__(grown).save_pretrained(tmp, state_dict=state)
        layer = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval().model.layers[n]
    hidden = main.model(input_ids=tokens).last_hidden_state
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None].expand(b, 1, s, s)
    eps = config.rms_norm_eps
    ids = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    emb = main.model.embed_tokens(ids)
    x = torch.cat([_rms(emb, 1 + weights["pre_fc_norm_embedding.weight"], eps),
                   _rms(hidden, 1 + weights["pre_fc_norm_hidden.weight"], eps)], dim=-1) @ weights["fc.weight"].T
    x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=main.model.rotary_emb(x, positions))
    x = x[0] if isinstance(x, tuple) else x
    return _rms(x, 1 + weights["norm.weight"], eps) @ main.lm_head.weight.T
