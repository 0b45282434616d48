"""``distconv verify --load CKPT --hf OUT``: the export's logits against megatron-core's own.

The Megatron side is megatron-core's ``GPTModel`` built from the checkpoint's args at TP1 PP1
in this one process on CPU (fp32), its weights loaded from the checkpoint as saved (any
training layout): a torch_dist one with ``dist_checkpointing.load``, a legacy ``mp_rank_*`` one
(any TP/PP/VPP) through distconv's own legacy reader, which yields the same megatron-core
tensors whole (QKV in megatron-core order, TP pieces joined); the HF side is transformers'
``AutoModelForCausalLM`` on the exported folder. Both run on the same seeded token sequences.
The model is built by ``distconv.megatron.model``, which the test fixtures use too, so it
covers the families the fixtures cover (dense GPT, MoE, MLA).

megatron-core 0.16 makes a few CUDA calls unconditionally; on a machine without CUDA they are
made harmless only while the model is built and run (``cpu_compat``), and restored after.
It needs the whole model in fp32 twice in CPU memory.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from distconv.engine.plan import Read, numbered
from distconv.errors import DistconvError, warn
from distconv.hf.source import auto_map_file, remote_code
from distconv.megatron.args import arg
from distconv.megatron.catalogue import COUNTS, other_spellings, stored_counts
from distconv.megatron.checkpoint import Checkpoint
from distconv.megatron.source import describe
from distconv.megatron.torch_dist import serving_metadata


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
    from distconv.megatron.legacy import LegacyReader

    reader, state = LegacyReader(ckpt), {}
    for name, source, info, _ in _legacy_sources(ckpt, model):
        zeros = (0,) * len(info.shape)
        box = Read(0, 0, source, tuple(info.shape), zeros, tuple(info.shape), tuple(slice(None) for _ in info.shape),
                   info.nbytes)
        state[name] = reader.read([box], torch.float32)[0]
    return state


def _legacy_sources(ckpt: Checkpoint, model: torch.nn.Module) -> Iterator[tuple[str, str, Any, torch.Tensor]]:
    """Each of the model's sharded-state tensors with the legacy checkpoint's key for it and what it
    stores there, its shape checked."""
    from distconv.megatron.model import sharded_state_dict

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
        yield name, source, info, data


def _as_stored(sharded: dict[str, Any], ckpt: Checkpoint) -> dict[str, Any]:
    """The (local spec) model's tensors under the keys the checkpoint spells them by, where it spells
    them another way (the catalogue's spellings): MoE pre-MLP norms (``pre_mlp_layernorm.*``), MLA's
    latent norms (fused into the up projections) and the dense MLPs' pre-MLP norm in MLA models
    (fused into ``linear_fc1``, where the local spec's MLA layers keep a module of their own); the TE
    norms' extra state is not read."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for t in nested_values(sharded):
        if isinstance(t, ShardedTensor) and t.key not in ckpt.tensors:
            t.key = next((key for key in other_spellings(t.key) if key in ckpt.tensors), t.key)
    return sharded


def _check_args(ckpt: Checkpoint, args: argparse.Namespace) -> None:
    """args' layer and expert counts must be what the checkpoint stores (numbered from 0, none
    missing): a model of args is then no larger than the checkpoint's, even on the meta device
    (each module costs memory and time)."""
    extent, numbers = stored_counts(ckpt.tensors.values())
    for name in COUNTS:
        value = getattr(args, name, None) or 0
        if extent[name]:  # stacked keys hold them all; keys of their own may number only those
            ok = value == extent[name] and all(n < value for n in numbers[name])
        else:
            ok = isinstance(value, int) and numbered(numbers[name], value)
        if not ok:
            raise DistconvError(f"{ckpt.path}: the checkpoint's args say {name}={value}, but it stores "
                                f"{extent[name] or len(numbers[name])}; megatron-core's model is not built from "
                                "args that contradict the tensors")


def _check_shapes(ckpt: Checkpoint, meta: torch.nn.Module) -> None:
    """Every tensor of megatron-core's model of the args (built on the meta device: no memory) has
    the shape the checkpoint stores, so that building it for real allocates no more than that."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from distconv.megatron.model import sharded_state_dict

    if ckpt.format == "legacy":
        list(_legacy_sources(ckpt, meta))  # raises at the first key missing or of another shape
        return
    sharded = _as_stored(sharded_state_dict(meta), ckpt)
    apply_factories(sharded)
    for t in nested_values(sharded):
        info = ckpt.tensors.get(t.key) if isinstance(t, ShardedTensor) else None
        if info is not None and tuple(info.shape) != tuple(t.global_shape):
            raise DistconvError(f"{ckpt.path}: {t.key} is stored as {list(info.shape)}, but megatron-core's model of "
                                f"the checkpoint's args has {list(t.global_shape)}: the args contradict the tensors")


def _tensors_only(sharded: dict[str, Any]) -> dict[str, Any]:
    """The sharded state dict without its ``ShardedObject``s (the modules' ``_extra_state``):
    torch's DCP reads those bytes back with ``torch.load(weights_only=False)``, which would run
    whatever a checkpoint stores there."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    _, tensors = extract_matching_values(sharded, lambda v: isinstance(v, ShardedObject))
    return tensors


def _torch_dist_state(ckpt: Checkpoint, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors from a torch_dist checkpoint through ``dist_checkpointing.load``
    (no ``_extra_state``: see ``_tensors_only``)."""
    from megatron.core import dist_checkpointing

    from distconv.megatron.model import sharded_state_dict

    try:
        with serving_metadata(ckpt.path, ckpt.metadata):
            request = _tensors_only(_as_stored(sharded_state_dict(model), ckpt))
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

    from distconv.megatron.model import build_gpt, cpu_compat, forward_logits

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
            _check_args(ckpt, args)
            try:
                with torch.device("meta"):
                    meta = build_gpt(args, 1, 1, init=False)
            except (AttributeError, TypeError, ValueError, AssertionError) as e:  # megatron-core checks args by assert too
                raise DistconvError(f"cannot build the megatron-core model from the checkpoint's args: {e}") from None
            _check_shapes(ckpt, meta)
            model = build_gpt(args, 1, 1)
            state = _legacy_state(ckpt, model) if ckpt.format == "legacy" else _torch_dist_state(ckpt, model)
            missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.endswith("_extra_state")]
            if missing:
                raise DistconvError(f"{ckpt.path}: the checkpoint gives no value for {', '.join(missing[:8])}")
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
    remote = auto_map_file(hf)
    try:  # safetensors only: a pytorch_model.bin is never unpickled
        model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False).eval()
    except Exception as e:  # transformers raises many types for a bad folder
        if remote:
            raise DistconvError(remote_code(remote, "--hf", False)) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistconvError(f"--hf {hf}: transformers cannot load its safetensors weights: {first}") from None
    if remote:
        warn(remote_code(remote, "--hf", True))
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
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
        raise DistconvError(f"--hf {hf}: config.json gives no vocab_size as a positive whole number "
                            f"({'vocab_size ' + repr(vocab) if isinstance(config, dict) else 'not a JSON object'})")
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
