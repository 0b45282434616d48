"""The legacy ``torch`` format: one ``model_optim_rng.pt`` per (TP, PP) rank.

``describe_legacy`` turns the per-rank files into the same ``Checkpoint`` description the
torch_dist path produces: megatron-core key names, global shapes, and chunks whose offsets
place each rank's piece in the global tensor (TP split axis, PP layer offset). The plan and the
gather stages then work unchanged; ``LegacyReader`` loads each planned box from the one file
that holds it. Both legacy (non-core) GPT models (``language_model.{embedding, encoder|
transformer, output_layer}``) and megatron-core models saved in this format (local module
keys) are understood: a layer tensor's name is read back by the catalogue (its ``aliases``), which
also gives its TP split axis. Files are opened with ``torch.load(weights_only=True, mmap=True)`` and
the allow-list, so describing reads metadata only and reading touches only the needed bytes;
optimizer and RNG state are never materialised.

QKV rows are stored in an order that depends on ``checkpoint_version`` (0: ``[3, np, hn]``,
1.0: ``[np, hn, 3]``, >= 2.0: ``[np, 3, hn]``, the megatron-core layout); each rank's QKV is
brought to the megatron-core layout as it is read, so families see one layout only.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from distconv.engine.plan import Read
from distconv.errors import DistconvError
from distconv.megatron.args import arg
from distconv.megatron.catalogue import canonical, param_of, split_name
from distconv.megatron.checkpoint import Checkpoint, Chunk, TensorInfo, overlaps, safe_globals

FILE_NAME = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^(?:encoder|transformer|decoder)\.layers\.(\d+)\.(.+)$")
_FINAL_NORM = re.compile(r"^(?:encoder|transformer|decoder)\.(?:final_layernorm|final_norm)\.(weight|bias)$")
_IGNORED = re.compile(r"(^word_embeddings_for_head\.|_extra_state$|\.inv_freq$)")


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One model tensor of one rank file, under its megatron-core name."""

    name: str  # global megatron-core key (per-layer: decoder.layers.{global}.<sub>)
    source: str  # key inside the file's flattened model dict
    shape: tuple[int, ...]
    dtype: torch.dtype
    axis: int | None  # the TP split axis (the catalogue's)
    gated: bool  # [gate; up] halves split separately (the catalogue's, when the MLP is gated)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tree
    return out


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def rank_files(folder: Path) -> dict[tuple[int, int], str]:
    """``{(tp, pp): file}``; file names are relative to the folder, or zip member names."""
    if folder.is_file():
        try:
            with zipfile.ZipFile(folder) as zf:
                names = [n for n in zf.namelist() if n.endswith("/" + FILE_NAME)]
        except zipfile.BadZipFile as e:
            raise DistconvError(f"--load {folder}: not a readable zip file ({e})") from None
        roots = {n.rsplit("/", 2)[0] for n in names}
        if len(roots) > 1:
            raise DistconvError(f"{folder} holds more than one checkpoint ({', '.join(sorted(roots))})")
    else:
        names = [str(p.relative_to(folder)) for p in folder.glob(f"mp_rank_*/{FILE_NAME}")]
    files: dict[tuple[int, int], str] = {}
    for name in names:
        m = _RANK_DIR.search(name.rsplit("/", 2)[-2])
        if m is None:
            continue
        if m.group(3) is not None:
            raise DistconvError(f"{name}: expert-parallel legacy checkpoints (mp_rank_TT_PPP_EEE) are not supported")
        files[(int(m.group(1)), int(m.group(2) or 0))] = name
    if not files:
        raise DistconvError(f"{folder} has no mp_rank_*/{FILE_NAME} files")
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(p for _, p in files)
    missing = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") for p in range(pp) for t in range(tp) if (t, p) not in files]
    if missing:
        raise DistconvError(f"{folder}: rank file(s) {', '.join(missing)}/{FILE_NAME} missing")
    return files


def open_rank_file(folder: Path, name: str, data: bool = True) -> dict[str, Any]:
    """One rank file, unpickled with the allow-list; tensors are mmapped (or fake: ``data=False``)."""
    what = f"{folder}/{name}" if folder.is_dir() else f"{folder}:{name}"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            if folder.is_dir():
                return torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            with zipfile.ZipFile(folder) as zf, zf.open(name) as f:
                if data:
                    return torch.load(f, map_location="cpu", weights_only=True)
                from torch._subclasses.fake_tensor import FakeTensorMode

                with FakeTensorMode():  # shapes and dtypes only; no payload is read
                    return torch.load(f, map_location="cpu", weights_only=True)
    except DistconvError:
        raise
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, OSError, EOFError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistconvError(f"cannot read {what}: {first}") from None


def _models(state: dict[str, Any], what: str) -> list[dict[str, Any]]:
    """The model dicts of one file: ``model`` or, with virtual pipeline stages, ``model0``, ``model1`` ..."""
    if "model" in state:
        return [state["model"]]
    chunks = sorted((int(k[5:]), v) for k, v in state.items() if re.fullmatch(r"model\d+", k))
    if not chunks:
        raise DistconvError(f"{what} holds no 'model' state")
    return [v for _, v in chunks]


def _pieces(model: dict[str, Any], chunk: int, layer_offset: int, tied: bool, what: str) -> tuple[list[_Piece], int]:
    """Normalise one model dict's keys; returns the pieces and how many layers it holds.

    A piece's ``source`` is ``"{chunk}:{key}"``: the virtual-stage chunk and the flattened key.
    """
    pieces, layers = [], set()
    for flat_key, t in _flatten(model).items():
        key = f"{chunk}:{flat_key}"
        if not isinstance(t, torch.Tensor):
            continue
        local = flat_key.removeprefix("language_model.")
        if _IGNORED.search(local) or (tied and local == "output_layer.weight"):
            continue  # a tied model's last stage keeps a copy of the embedding for its head
        shape, dtype = tuple(t.shape), t.dtype
        m = _FINAL_NORM.match(local)
        if m:
            local = f"decoder.final_layernorm.{m.group(1)}"
        m = _LAYER.match(local)
        if m:
            layer = int(m.group(1))
            name = canonical(f"decoder.layers.{layer + layer_offset}.{m.group(2)}")
            if param_of(name) is None:
                raise DistconvError(f"{what}: distconv does not know the legacy layer tensor {flat_key}")
            layers.add(layer)
        elif split_name(local)[0] is None and param_of(local) is not None:
            name = local
        else:
            raise DistconvError(f"{what}: distconv does not know the legacy tensor {flat_key}")
        param = param_of(name)
        pieces.append(_Piece(name, key, shape, dtype, param.split.axis, param.gated))
    if layers and layers != set(range(len(layers))):
        raise DistconvError(f"{what}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}")
    return pieces, len(layers)


def describe_legacy(folder: Path, iteration: int | str) -> Checkpoint:
    """Stage 1 for ``mp_rank_*`` folders (and zips of one): metadata only, like torch_dist."""
    files = rank_files(folder)
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(p for _, p in files)
    states = {k: open_rank_file(folder, name, data=False) for k, name in files.items()}
    first = states[(0, 0)]
    args = first.get("args")
    if not isinstance(args, argparse.Namespace):
        raise DistconvError(f"{folder}: {files[(0, 0)]} has no Megatron-LM 'args'; distconv needs them to describe the model")
    version = float(first.get("checkpoint_version", 0))
    tied = not arg(args, "untie_embeddings_and_output_weights", default=False)
    other = 0
    # layers are numbered per stage (and per virtual stage); global order is (virtual stage, stage)
    models = {k: _models(s, f"{folder}/{files[k]}") for k, s in states.items()}
    vpp = len(models[(0, 0)])
    by_rank: dict[tuple[int, int], list[_Piece]] = {k: [] for k in files}
    offset = 0
    for v in range(vpp):
        for p in range(pp):
            count = None
            for t in range(tp):
                what = f"{folder}/{files[(t, p)]}"
                if len(models[(t, p)]) != vpp:
                    raise DistconvError(f"{what}: holds {len(models[(t, p)])} model chunks, rank 0 holds {vpp}")
                pieces, n = _pieces(models[(t, p)][v], v, offset, tied, what)
                if count is not None and n != count:
                    raise DistconvError(f"{what}: holds {n} layers, its TP peers hold {count}")
                count = n
                by_rank[(t, p)] += pieces
            offset += count or 0
    for s in states.values():
        other += sum(_tensor_bytes(v) for k, v in s.items() if k not in ("args",) and not re.fullmatch(r"model\d*", k))
    if folder.is_dir():
        other += sum(p.stat().st_size for p in folder.glob("mp_rank_*/distrib_optim.pt"))
    if offset != int(arg(args, "num_layers", default=offset)):
        raise DistconvError(f"{folder}: the rank files hold {offset} layers, args.num_layers is {args.num_layers}")
    gated = bool(arg(args, "swiglu", default=False))
    tensors = _assemble(by_rank, files, tp, gated, str(folder))
    args = argparse.Namespace(**vars(args))
    args.num_layers = offset
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    if arg(args, "padded_vocab_size") is None and "embedding.word_embeddings.weight" in tensors:
        args.padded_vocab_size = tensors["embedding.word_embeddings.weight"].shape[0]
    common = {"args": args, "checkpoint_version": version, "iteration": first.get("iteration", iteration)}
    if not tensors:
        raise DistconvError(f"{folder} holds no model tensors")
    return Checkpoint(folder, iteration, "legacy", args, common, tensors, other, tp * pp)


def _assemble(by_rank: dict[tuple[int, int], list[_Piece]], files: dict[tuple[int, int], str], tp: int, gated: bool, where: str) -> dict[str, TensorInfo]:
    """Global shapes and chunks from every rank's pieces; a replicated tensor is read from TP rank 0.

    A chunk's ``writer`` is the file's model-parallel rank ``pp * TP + tp`` (the training rank
    when data parallelism is 1), so an export at TP x PP ranks reads one file per rank.
    """
    named: dict[str, dict[int, tuple[_Piece, str, int]]] = {}
    for (t, p), pieces in sorted(by_rank.items()):
        for piece in pieces:
            named.setdefault(piece.name, {})[t] = (piece, files[(t, p)], p * tp + t)
    tensors: dict[str, TensorInfo] = {}
    for name, per_tp in named.items():
        piece0 = per_tp[min(per_tp)][0]
        zeros = (0,) * len(piece0.shape)
        if piece0.axis is None:
            pc, file, w = per_tp[min(per_tp)]
            tensors[name] = TensorInfo(name, pc.shape, pc.dtype, (Chunk(zeros, pc.shape, file, w, pc.source, zeros),))
            continue
        if sorted(per_tp) != list(range(tp)):
            raise DistconvError(f"{where}: {name} is split over TP but only ranks {sorted(per_tp)} hold it")
        axis, local = piece0.axis, piece0.shape
        if any(pc.shape != local for pc, _, _ in per_tp.values()):
            raise DistconvError(f"{where}: TP ranks hold {name} with different shapes")
        shape = tuple(s * tp if d == axis else s for d, s in enumerate(local))
        chunks = []
        for t, (pc, file, w) in sorted(per_tp.items()):
            if pc.gated and gated:  # each rank holds [gate_t; up_t]; globally [gate; up]
                half = local[0] // 2
                for j in range(2):
                    off = (j * half * tp + t * half,) + zeros[1:]
                    chunks.append(Chunk(off, (half,) + local[1:], file, w, pc.source, (j * half,) + zeros[1:]))
            else:
                off = tuple(t * s if d == axis else 0 for d, s in enumerate(local))
                chunks.append(Chunk(off, local, file, w, pc.source, zeros))
        tensors[name] = TensorInfo(name, shape, piece0.dtype, tuple(chunks))
    return tensors


# ---------------------------------------------------------------- reading


def _qkv_to_core(t: torch.Tensor, version: float, head_dim: int) -> torch.Tensor:
    """One rank's fused QKV rows from checkpoint_version 0 / 1.0 order to ``[np, 3, hn]``."""
    if version >= 2.0:
        return t
    rest = tuple(t.shape[1:])
    heads = t.shape[0] // (3 * head_dim)
    if version >= 1.0:
        return t.reshape(heads, head_dim, 3, *rest).transpose(1, 2).reshape(t.shape)
    return t.reshape(3, heads, head_dim, *rest).transpose(0, 1).reshape(t.shape)


class LegacyReader:
    """Reads legacy checkpoints: each planned box is cut from the rank files holding it.

    Reading is local (no collective); a rank opens only the files its reads name, each once
    per run (memory-mapped, so only the bytes sliced are read).
    """

    collective = False

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.version = float(ckpt.common.get("checkpoint_version", 0))
        args = ckpt.args
        self.head_dim = int(arg(args, "kv_channels", default=args.hidden_size // args.num_attention_heads))
        self._files: dict[str, dict[str, torch.Tensor]] = {}

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._files:
            folder = self.ckpt.path
            if folder.is_dir() and not (folder / name).exists():
                raise DistconvError(f"checkpoint file {folder / name} is missing")
            state = open_rank_file(folder, name)
            self._files[name] = {
                f"{i}:{key}": t
                for i, model in enumerate(_models(state, f"{folder}/{name}"))
                for key, t in _flatten(model).items()
                if isinstance(t, torch.Tensor)
            }
        return self._files[name]

    def files(self, reads: list[Read]) -> list[str]:
        return sorted({c.file for r in reads for c, _, _ in overlaps(r, self.ckpt.tensors[r.key].chunks)})

    def read(self, reads: list[Read], dtype: torch.dtype) -> list[torch.Tensor]:
        """This rank's planned boxes as CPU tensors of ``dtype`` (a box may span rank files)."""
        out = []
        for read in reads:
            box = torch.empty(read.sizes, dtype=dtype)
            for chunk, src, dst in overlaps(read, self.ckpt.tensors[read.key].chunks):
                source = self._tensors(chunk.file).get(chunk.source)
                if source is None:
                    raise DistconvError(f"{self.ckpt.path}/{chunk.file}: tensor {chunk.source} disappeared since the checkpoint was described")
                if read.key.endswith(("linear_qkv.weight", "linear_qkv.bias")):
                    source = _qkv_to_core(source, self.version, self.head_dim)
                box[dst] = source[src]
            out.append(box)
        return out
