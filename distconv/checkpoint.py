"""Stage 1: locate a Megatron checkpoint and describe it (format, args, tensors) from metadata.

Nothing here reads tensor payloads. The common state and the DCP ``.metadata`` are unpickled
with allow-lists only: ``torch.load(weights_only=True)`` plus the argparse/pathlib/megatron
types Megatron-LM stores in ``args``, and a restricted unpickler for DCP metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from distconv.errors import DistconvError

TRACKER = "latest_checkpointed_iteration.txt"
# Keys that are never model weights (optimizer state, RNG, rerun state, TE fp8 metadata).
NON_MODEL_PREFIXES = ("optimizer.", "chained_", "rng_state", "rerun_state_machine")
_WRITER_FILE = re.compile(r"__(\d+)_\d+\.distcp$")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the global tensor and who wrote it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    writer: int  # the training rank that saved it (from ``__{rank}_{n}.distcp``)
    source: str = ""  # legacy format: the tensor's key inside ``file`` (torch_dist: unused)
    source_offsets: tuple[int, ...] = ()  # legacy format: where the chunk starts in that tensor


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclasses.dataclass
class Checkpoint:
    """What stage 1 learns about a checkpoint folder."""

    path: Path  # the iteration folder
    iteration: int | str
    format: str
    args: argparse.Namespace
    common: dict[str, Any]
    tensors: dict[str, TensorInfo]  # model weights only
    other_bytes: int  # optimizer and other non-model tensor bytes (never read)
    writers: int  # how many ranks wrote tensor files
    metadata: Any = None  # the DCP Metadata, parsed once with the allow-list

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def locate(load: str | Path, iteration: int | str | None = None) -> tuple[Path, int | str]:
    """Resolve ``--load`` (a save root or one ``iter_XXXXXXX``/``release`` folder) to a folder."""
    path = Path(load)
    if not path.exists():
        raise DistconvError(f"--load {path}: no such file or directory")
    if path.is_file() and path.suffix == ".zip":  # a zipped legacy release (e.g. NVIDIA's GPT-2)
        return path, "release"
    iter_name = re.fullmatch(r"iter_(\d+)|release", path.name)
    if iteration is None and iter_name and not (path / TRACKER).exists():
        return path, "release" if path.name == "release" else int(iter_name.group(1))
    root = path.parent if iter_name and not (path / TRACKER).exists() else path
    if iteration is None:
        tracker = root / TRACKER
        if not tracker.exists():
            raise DistconvError(
                f"--load {path} is not a Megatron checkpoint: no {TRACKER} and not an "
                "iter_XXXXXXX or release folder"
            )
        text = tracker.read_text().strip()
        if text == "release":
            iteration = "release"
        elif text.isdigit():
            iteration = int(text)
        else:
            raise DistconvError(f"{tracker} holds {text!r}, neither an iteration number nor 'release'")
    folder = root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    if not folder.is_dir():
        raise DistconvError(f"iteration {iteration} not found: {folder} does not exist")
    return folder, iteration


def detect_format(folder: Path) -> str:
    """``torch_dist`` (metadata.json, written last by a complete save) or ``legacy`` (mp_rank_*)."""
    if folder.is_file():
        return "legacy"  # a .zip, see locate()
    if (folder / "metadata.json").exists():
        return "torch_dist"
    if any(folder.glob("mp_rank_*")):
        return "legacy"
    if (folder / ".metadata").exists():
        raise DistconvError(
            f"{folder} has DCP files but no metadata.json: the save did not finish, or it is a "
            "torch_dcp/fsdp_dtensor checkpoint, which distconv does not read"
        )
    raise DistconvError(f"{folder} is not a Megatron checkpoint (no metadata.json, no mp_rank_* folders)")


def safe_globals() -> list[Any]:
    """Types Megatron-LM puts in ``args`` and the common state (besides plain containers)."""
    allowed: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, io.BytesIO]
    try:  # megatron-core >= 0.14 keeps its own list; use it when importable
        from megatron.core.safe_globals import SAFE_GLOBALS

        allowed += list(SAFE_GLOBALS)
    except ImportError:
        pass
    return allowed


def safe_torch_load(source: Path | io.BytesIO, what: str) -> Any:
    """``torch.load(weights_only=True)`` with distconv's allow-list; a clear error otherwise."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DistconvError(
            f"{what} holds a type outside distconv's allow-list, so it was not unpickled: "
            f"{str(e).splitlines()[0]}"
        ) from None
    except (EOFError, RuntimeError, OSError) as e:
        raise DistconvError(f"cannot read {what}: {e}") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` but refuses any global outside the DCP metadata types."""

    def find_class(self, module: str, name: str) -> Any:
        ok = (
            module.startswith(("torch.distributed.checkpoint", "megatron.core.dist_checkpointing"))
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module, name) in {("torch._utils", "_get_layout"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
        )
        if not ok:
            raise DistconvError(f"refusing to unpickle {module}.{name} from DCP .metadata")
        return super().find_class(module, name)


def read_dcp_metadata(folder: Path) -> Any:
    """The DCP ``Metadata`` of a torch_dist folder, unpickled with an allow-list."""
    import megatron.core.dist_checkpointing  # noqa: F401  (registers megatron's metadata classes)

    path = folder / ".metadata"
    if not path.exists():
        raise DistconvError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with path.open("rb") as f:
            return _MetadataUnpickler(f).load()
    except (EOFError, pickle.UnpicklingError, AttributeError, ValueError) as e:
        raise DistconvError(f"{path} is unreadable or truncated: {e}") from None


def load_common_state(folder: Path) -> dict[str, Any]:
    """``common.pt`` (megatron-core <= 0.18) or the ``common_state`` object inside DCP (0.19)."""
    common = folder / "common.pt"
    if common.exists():
        return safe_torch_load(common, str(common))
    from torch.distributed.checkpoint import FileSystemReader, load

    buf: dict[str, Any] = {"common_state/shard_0_1": io.BytesIO()}
    try:
        load(buf, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    except BaseException as e:  # DCP raises CheckpointException, a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise DistconvError(f"{folder} has neither common.pt nor a readable common_state: {e}") from None
    data = buf["common_state/shard_0_1"]
    data.seek(0)
    state = safe_torch_load(data, f"{folder} common_state")
    return state[0] if isinstance(state, list) else state


def read_tensor_index(folder: Path, metadata: Any) -> tuple[dict[str, TensorInfo], int]:
    """Model tensors (global shape, dtype, stored chunks with their files) and other bytes."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    tensors: dict[str, TensorInfo] = {}
    other = 0
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        shape = tuple(md.size)
        if key.startswith(NON_MODEL_PREFIXES) or "._extra_state" in key:
            other += _numel(shape) * md.properties.dtype.itemsize
            continue
        chunks = []
        for c in md.chunks:
            info = metadata.storage_data.get(MetadataIndex(key, torch.Size(c.offsets)))
            file = info.relative_path if info is not None else ""
            m = _WRITER_FILE.search(file)
            chunks.append(Chunk(tuple(c.offsets), tuple(c.sizes), file, int(m.group(1)) if m else 0))
        tensors[key] = TensorInfo(key, shape, md.properties.dtype, tuple(chunks))
    return tensors, other


def check_files(folder: Path, metadata: Any) -> None:
    """Every data file the metadata names exists and is long enough (cheap ``stat`` only)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        path = folder / name
        if not path.exists():
            raise DistconvError(f"checkpoint shard {path} is missing")
        size = path.stat().st_size
        if size < length:
            raise DistconvError(f"checkpoint shard {path} is truncated: {size} bytes, metadata needs {length}")


def describe(load: str | Path, iteration: int | str | None = None) -> Checkpoint:
    """Stage 1: everything the plan needs, from metadata alone."""
    folder, iteration = locate(load, iteration)
    fmt = detect_format(folder)
    if fmt == "legacy":
        from distconv.legacy import describe_legacy

        return describe_legacy(folder, iteration)
    metadata = read_dcp_metadata(folder)
    check_files(folder, metadata)
    common = load_common_state(folder)
    args = common.get("args")
    if not isinstance(args, argparse.Namespace):
        raise DistconvError(f"{folder}: the common state has no Megatron-LM 'args'; pass a checkpoint saved by Megatron-LM")
    tensors, other = read_tensor_index(folder, metadata)
    if not tensors:
        raise DistconvError(f"{folder} holds no model tensors")
    writers = 1 + max((c.writer for t in tensors.values() for c in t.chunks), default=0)
    return Checkpoint(folder, iteration, fmt, args, common, tensors, other, writers, metadata)
