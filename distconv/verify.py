"""``distconv verify --load CKPT --hf OUT``: the export's logits against megatron-core's own.

The Megatron side is megatron-core's ``GPTModel`` built from the checkpoint's args at TP1 PP1
in this one process on CPU (fp32), its weights loaded from the checkpoint as saved (any
training layout): a torch_dist one with ``dist_checkpointing.load``, a legacy ``mp_rank_*`` one
(any TP/PP/VPP) through distconv's own legacy reader, which yields the same megatron-core
tensors whole (QKV in megatron-core order, TP pieces joined); the HF side is transformers'
``AutoModelForCausalLM`` on the exported folder. Both run on the same seeded token sequences.
The model is built by ``distconv.megatron_model``, which the test fixtures use too, so it
covers the families the fixtures cover (dense GPT, MoE, MLA).

megatron-core 0.16 makes a few CUDA calls unconditionally; on a machine without CUDA they are
made harmless only while the model is built and run (``cpu_compat``), and restored after.
It needs the whole model in fp32 twice in CPU memory.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from distconv.engine.layout import LOCAL_MLA_NORMS, TE_MOE_NORM
from distconv.sources.checkpoint import Checkpoint, Read
from distconv.sources.megatron import describe
from distconv.errors import DistconvError
from distconv.sources.torch_dist import serving_metadata
from distconv.spec import arg


def _known_common(common: dict[str, Any]):
    """A megatron-core common-state strategy that hands back what ``describe`` already read
    (with the allow-list), so ``load`` never unpickles ``common.pt`` itself."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class KnownCommon(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir: Any) -> dict[str, Any]:
            return dict(common)

        def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> Any:
            raise DistconvError("internal: verify loads no sharded objects outside the torch_dist files")

    return KnownCommon()


def _legacy_state(ckpt: Checkpoint, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict from a legacy checkpoint: each sharded-state key (per-layer ones as
    ``decoder.layers.{i}.X``, the legacy reader's names) read whole in fp32."""
    from distconv.megatron_model import sharded_state_dict
    from distconv.sources.legacy import LegacyReader

    reader, state = LegacyReader(ckpt), {}
    for name, sharded in sharded_state_dict(model).items():
        key = getattr(sharded, "key", None)
        data = getattr(sharded, "data", None)
        if key is None or not isinstance(data, torch.Tensor) or name.endswith("_extra_state"):
            continue
        layer = re.match(r"decoder\.layers\.(\d+)\.", name)
        source = f"decoder.layers.{layer.group(1)}.{key.removeprefix('decoder.layers.')}" if layer else key
        info = ckpt.tensors.get(source)
        if info is None:
            raise DistconvError(f"{ckpt.path}: the legacy checkpoint holds no {source} (megatron-core's {name})")
        if tuple(info.shape) != tuple(data.shape):
            raise DistconvError(f"{ckpt.path}: {source} is {list(info.shape)}, megatron-core's {name} is {list(data.shape)}")
        zeros = (0,) * len(info.shape)
        box = Read(0, 0, source, tuple(info.shape), zeros, tuple(info.shape), tuple(slice(None) for _ in info.shape))
        state[name] = reader.read([box], torch.float32)[0]
    return state


def _as_stored(sharded: dict[str, Any], ckpt: Checkpoint) -> dict[str, Any]:
    """The (local spec) model's norms under the transformer-engine spec's keys where the checkpoint
    is spelled so: MoE pre-MLP norms (``pre_mlp_layernorm.*``), MLA's latent norms (fused into the
    up projections) and the dense MLPs' pre-MLP norm in MLA models (fused into ``linear_fc1``, where
    the local spec's MLA layers keep a module of their own); the TE norms' extra state is not read."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    renames = {**TE_MOE_NORM, **LOCAL_MLA_NORMS, **{te: local for local, te in TE_MOE_NORM.items()}}
    for t in nested_values(sharded):
        if isinstance(t, ShardedTensor) and t.key not in ckpt.tensors:
            for local, te in renames.items():
                if t.key.endswith(local) and t.key.removesuffix(local) + te in ckpt.tensors:
                    t.key = t.key.removesuffix(local) + te
                    break  # one rename: the reverse pair must not undo it
    return sharded


def _stored_extra_state_only(sharded: dict[str, Any], ckpt: Checkpoint) -> dict[str, Any]:
    """``_extra_state`` objects the checkpoint does not store are not requested (kept local), as
    Megatron-LM's ``--ckpt-drop-redundant-extra-state`` (#5552) saves and loads them."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    stored = ckpt.metadata.state_dict_metadata

    def local_if_absent(x: Any) -> Any:
        if isinstance(x, ShardedObject) and x.key.endswith("_extra_state") and x.unique_key not in stored:
            return LocalNonpersistentObject(x.data)
        return x

    return dict_list_map_inplace(local_if_absent, sharded)


def _torch_dist_state(ckpt: Checkpoint, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict from a torch_dist checkpoint through ``dist_checkpointing.load``."""
    from megatron.core import dist_checkpointing

    from distconv.megatron_model import sharded_state_dict

    request = _stored_extra_state_only(_as_stored(sharded_state_dict(model), ckpt), ckpt)
    try:
        with serving_metadata(ckpt.path, ckpt.metadata):
            loaded = dist_checkpointing.load({"model": request}, str(ckpt.path),
                                             common_strategy=_known_common(ckpt.common),
                                             validate_access_integrity=False)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise DistconvError(f"megatron-core could not load {ckpt.path}: {str(e).strip().splitlines()[-1]}") from None
    return loaded["model"]


def megatron_logits(ckpt: Checkpoint, tokens: torch.Tensor) -> torch.Tensor:
    """megatron-core's logits (padded vocab) for ``tokens``, from the described checkpoint."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from distconv.megatron_model import build_gpt, cpu_compat, forward_logits

    args = argparse.Namespace(**vars(ckpt.args))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "expert_tensor_parallel_size"):
        setattr(args, name, 1)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with cpu_compat():
            parallel_state.initialize_model_parallel(1, 1)
            try:
                model = build_gpt(args, 1, 1)
            except (AttributeError, TypeError, ValueError) as e:
                raise DistconvError(f"cannot build the megatron-core model from the checkpoint's args: {e}") from None
            if ckpt.format == "legacy":
                state = _legacy_state(ckpt, model)
                missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.endswith("_extra_state")]
                if missing:
                    raise DistconvError(f"{ckpt.path}: the legacy checkpoint gives no value for {', '.join(missing[:8])}")
            else:
                model.load_state_dict(_torch_dist_state(ckpt, model))
            model = model.float()
            return forward_logits(model, tokens).float()
    finally:
        parallel_state.destroy_model_parallel()
        if owns:
            dist.destroy_process_group()


def hf_logits(hf: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:  # safetensors only: a pytorch_model.bin is never unpickled
        model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, use_safetensors=True).eval()
    except Exception as e:  # transformers raises many types for a bad folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistconvError(f"--hf {hf}: transformers cannot load its safetensors weights: {first}") from None
    with torch.no_grad():
        return model(tokens).logits.float()


def verify(
    load: str | Path,
    hf: str | Path,
    *,
    iteration: int | str | None = None,
    sequences: int = 4,
    length: int = 32,
    seed: int = 0,
    tol: float = 1e-3,
) -> dict[str, Any]:
    """Compare logits on ``sequences`` random token sequences; ``ok`` when max |diff| <= ``tol``."""
    import json

    try:
        config = json.loads((Path(hf) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DistconvError(f"--hf {hf}: no readable config.json ({e})") from None
    vocab = int(config["vocab_size"])
    ckpt = describe(load, iteration)
    length = min(length, int(arg(ckpt.args, "max_position_embeddings", "seq_length", default=length)))
    tokens = torch.randint(0, vocab, (sequences, length), generator=torch.Generator().manual_seed(seed))
    theirs = hf_logits(hf, tokens)
    ours = megatron_logits(ckpt, tokens)
    if ours.shape[-1] < vocab:
        raise DistconvError(f"the HF vocab ({vocab}) is larger than the checkpoint's ({ours.shape[-1]})")
    ours = ours[..., :vocab]  # megatron's padding rows are not part of the model
    diff = (theirs - ours).abs()
    result = {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item(),
        "tokens": list(tokens.shape),
        "tolerance": tol,
        "format": ckpt.format,
    }
    result["ok"] = result["max_abs_diff"] <= tol
    return result
