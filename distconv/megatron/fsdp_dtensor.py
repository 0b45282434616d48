"""Megatron-LM's plain DCP saves, described model-free from ``.metadata`` alone: ``--ckpt-format
fsdp_dtensor`` (Megatron-FSDP) and ``torch_dcp`` (FSDP2, TP = PP = 1).

Both are one ``torch.distributed.checkpoint.save`` of Megatron-LM's state dict (no
``metadata.json``, no ``common.pt``): the model's ``state_dict_for_save_checkpoint()`` under
``model.`` (one key per layer tensor, layers numbered globally), and ``args``, ``iteration``,
``checkpoint_version`` and the rest as pickled DCP bytes items, read here with the allow-list.
Megatron-LM itself tells the two apart only by the loading job's flags; here ``args.ckpt_format``
says which, and the keys must agree with it:

- ``fsdp_dtensor``: keys ``model.module.<GPTModel key>`` (the ``MegatronFSDP`` wrapper's
  ``module``). Each tensor is a DTensor sharded unevenly over data parallelism on dim 0 (composed
  with TP's split where TP > 1); ``.metadata`` lists every rank's chunk (none for a rank with an
  empty shard). Routed experts are keyed one per expert with global numbers
  (``mlp.experts.local_experts.<e>.``, or TE's grouped ``linear_fc1.weight<e>``). With
  ``args.swiglu`` every gated ``linear_fc1`` weight and bias is saved as two tensors, ``..._w``
  (the whole gate) and ``..._v`` (the whole up projection): read back here as the one
  ``[gate; up]`` tensor megatron-core's other formats store. ``_extra_state`` is not saved.
- ``torch_dcp``: keys ``model.<GPTModel key>``, FSDP2's even ``Shard(0)`` chunks, ``linear_fc1``
  fused ``[gate; up]`` as the module holds it (TP = 1, so it is the whole tensor).

Reading is ``TorchDistReader``'s local mode (each rank reads the stored chunks its boxes overlap);
each chunk names its stored key (``Chunk.source``), a ``_w``/``_v`` one also its stored offsets
(``Chunk.stored_offsets``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
from pathlib import Path
from typing import Any

from distconv.engine.plan import numel
from distconv.errors import DistconvError
from distconv.megatron.args import arg
from distconv.megatron.checkpoint import (
    NON_MODEL_PREFIXES,
    Checkpoint,
    TensorInfo,
    check_files,
    read_dcp_metadata,
    read_stored,
    safe_torch_load,
    stored_chunks,
)

PREFIXES = {"fsdp_dtensor": "model.module.", "torch_dcp": "model."}
# a gated fc1 weight or bias Megatron-FSDP saved as its gate (_w) and up (_v) halves
_HALF = re.compile(r"^(?P<base>.+\.linear_fc1\.(?:weight|bias)\d*)_(?P<half>[wv])$")
_FC1 = re.compile(r"\.linear_fc1\.(?:weight|bias)\d*$")


def read_item(folder: Path, metadata: Any, name: str) -> Any:
    """A pickled DCP bytes item (``args``, ``iteration`` ...), unpickled with the allow-list; None if absent."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    if not isinstance(metadata.state_dict_metadata.get(name), BytesStorageMetadata):
        return None
    info = metadata.storage_data.get(MetadataIndex(name))
    if info is None:
        raise DistconvError(f"{folder}/.metadata lists {name!r} but names no data for it")
    value = safe_torch_load(io.BytesIO(read_stored(folder, info, name)), f"{folder} {name}")
    if isinstance(value, io.BytesIO):  # a value saved as a buffer
        value.seek(0)
        value = safe_torch_load(value, f"{folder} {name}")
    return value


def plain_dcp_args(folder: Path, metadata: Any) -> argparse.Namespace:
    """The ``args`` item of a plain DCP save; an error naming what the folder is otherwise."""
    args = read_item(folder, metadata, "args")
    if not isinstance(args, argparse.Namespace):
        raise DistconvError(
            f"{folder} has DCP files but neither metadata.json nor Megatron-LM's 'args' in them: a torch_dist "
            "save that did not finish, or not a Megatron-LM checkpoint")
    return args


def _format(folder: Path, args: argparse.Namespace, keys: list[str]) -> str:
    """``fsdp_dtensor`` or ``torch_dcp``: ``args.ckpt_format``, checked against the keys."""
    claimed = arg(args, "ckpt_format")
    if claimed not in PREFIXES:
        raise DistconvError(f"{folder} is a plain DCP save (no metadata.json), but args.ckpt_format is {claimed!r}: "
                            f"distconv reads plain DCP saves of {' and '.join(PREFIXES)} only")
    held = "fsdp_dtensor" if any(k.startswith(PREFIXES["fsdp_dtensor"]) for k in keys) else \
        "torch_dcp" if any(k.startswith(PREFIXES["torch_dcp"]) for k in keys) else None
    if held != claimed:
        found = f"keys under {PREFIXES[held]!r}, as {held} saves them" if held else "no model keys under 'model.'"
        raise DistconvError(f"{folder}: args.ckpt_format is {claimed} (keys under {PREFIXES[claimed]!r}), "
                            f"but the checkpoint has {found}")
    return claimed


def model_tensors(folder: Path, metadata: Any, fmt: str, swiglu: bool) -> tuple[dict[str, TensorInfo], int]:
    """The model tensors under their GPTModel names (``fmt``'s prefix stripped, ``_w``/``_v`` halves
    joined into ``[gate; up]``), and the bytes of everything else (optimizer, ``_extra_state``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = PREFIXES[fmt]
    tensors: dict[str, TensorInfo] = {}
    halves: dict[str, dict[str, TensorInfo]] = {}
    other = 0
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        name = key.removeprefix(prefix)
        if name == key or name.startswith(NON_MODEL_PREFIXES) or "._extra_state" in name:
            other += numel(tuple(md.size)) * md.properties.dtype.itemsize
            continue
        chunks = tuple(dataclasses.replace(c, source=key) for c in stored_chunks(folder, metadata, key, md))
        info = TensorInfo(name, tuple(md.size), md.properties.dtype, chunks)
        half = _HALF.match(name) if fmt == "fsdp_dtensor" else None
        if half:
            halves.setdefault(half["base"], {})[half["half"]] = dataclasses.replace(info, key=key)
        else:
            tensors[name] = info
    if halves and not swiglu:
        raise DistconvError(f"{folder}: {prefix}{next(iter(halves))} is saved as SwiGLU halves (_w, _v), but args.swiglu "
                            "is not set: the args contradict the tensors")
    if swiglu and fmt == "fsdp_dtensor":
        unsplit = sorted(n for n in tensors if _FC1.search(n))
        if unsplit:  # a TP > 1 fc1 would hold [gate_r; up_r] per rank: reading it whole would mix them
            raise DistconvError(f"{folder}: args.swiglu is set but {prefix}{unsplit[0]} is not saved as its _w and _v "
                                "halves, as Megatron-FSDP saves a gated linear_fc1")
    for base, pair in halves.items():
        tensors[base] = _joined(folder, base, pair)
    return tensors, other


def _joined(folder: Path, base: str, pair: dict[str, TensorInfo]) -> TensorInfo:
    """``base`` as ``[gate; up]`` from its ``_w`` and ``_v`` tensors: their chunks, the up half's moved
    down by the gate's rows, each naming its stored key and offsets."""
    if set(pair) != {"w", "v"}:
        raise DistconvError(f"{folder}: {base} has its _{''.join(pair)} half only")
    w, v = pair["w"], pair["v"]
    if w.shape != v.shape or w.dtype != v.dtype or not w.shape:
        raise DistconvError(f"{folder}: {base}'s halves differ: _w {w.shape} {w.dtype}, _v {v.shape} {v.dtype}")
    rows = w.shape[0]
    chunks = tuple(dataclasses.replace(c, offsets=(c.offsets[0] + shift,) + c.offsets[1:], source=half.key,
                                       stored_offsets=c.offsets)
                   for half, shift in ((w, 0), (v, rows)) for c in half.chunks)
    return TensorInfo(base, (2 * rows,) + w.shape[1:], w.dtype, chunks)


def describe_plain_dcp(folder: Path, iteration: int | str) -> Checkpoint:
    """Stage 1 for a ``fsdp_dtensor`` or ``torch_dcp`` folder: metadata and the allow-listed items only."""
    metadata = read_dcp_metadata(folder)
    check_files(folder, metadata)
    args = plain_dcp_args(folder, metadata)
    fmt = _format(folder, args, list(metadata.state_dict_metadata))
    if any(k.startswith("model0.") for k in metadata.state_dict_metadata):
        raise DistconvError(f"{folder}: model chunks of virtual pipeline stages (model0., model1. ...) are not read")
    tensors, other = model_tensors(folder, metadata, fmt, bool(arg(args, "swiglu", default=False)))
    if not tensors:
        raise DistconvError(f"{folder} holds no model tensors")
    common = {"args": args, **{name: read_item(folder, metadata, name) for name in ("iteration", "checkpoint_version")}}
    writers = 1 + max((c.writer for t in tensors.values() for c in t.chunks), default=0)
    return Checkpoint(folder, iteration, fmt, args, common, tensors, other, writers, metadata)
