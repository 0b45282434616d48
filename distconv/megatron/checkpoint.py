"""Stage 1: locate a Megatron checkpoint and describe it (format, args, tensors) from metadata.

Nothing here reads tensor payloads. The common state and the DCP ``.metadata`` are unpickled
with allow-lists only: ``torch.load(weights_only=True)`` plus the argparse/pathlib/megatron
types Megatron-LM stores in ``args``, and a restricted unpickler for DCP metadata.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import importlib
import io
import os
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from distconv.engine.folder import inside
from distconv.engine.plan import Read, numel
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
    source: str = ""  # legacy: the tensor's key inside ``file``; plain DCP: its stored key (torch_dist: unused)
    source_offsets: tuple[int, ...] = ()  # legacy format: where the chunk starts in that tensor
    stored_offsets: tuple[int, ...] = ()  # plain DCP: the chunk's offsets under its stored key ``source``


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize

    def chunks_near(self, read: Read) -> tuple[Chunk, ...]:
        """The chunks whose range on the first axis meets ``read``'s (``overlaps`` checks the rest): a
        bisection, where a stacked tensor holds a chunk per layer and rank, so that reading every
        layer's box costs no time quadratic in the depth."""
        if not self.shape:
            return self.chunks
        chunks, starts, longest = self._by_start
        lo = bisect.bisect_left(starts, read.offsets[0] - longest + 1)
        return chunks[lo:bisect.bisect_left(starts, read.offsets[0] + read.sizes[0])]

    @functools.cached_property
    def _by_start(self) -> tuple[tuple[Chunk, ...], list[int], int]:
        """The chunks sorted by their first offset, those offsets, and the longest chunk's first size."""
        chunks = tuple(sorted(self.chunks, key=lambda c: c.offsets[0]))
        return chunks, [c.offsets[0] for c in chunks], max((c.sizes[0] for c in chunks), default=0)


def overlaps(read: Read, chunks: tuple[Chunk, ...]) -> Iterator[tuple[Chunk, tuple[slice, ...], tuple[slice, ...]]]:
    """The stored chunks ``read``'s box overlaps, each with the overlap's slices inside the chunk
    (offset by its ``source_offsets``) and inside the box."""
    for chunk in chunks:
        lo = [max(o, co) for o, co in zip(read.offsets, chunk.offsets)]
        hi = [min(o + s, co + cs) for o, s, co, cs in zip(read.offsets, read.sizes, chunk.offsets, chunk.sizes)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        starts = chunk.source_offsets or (0,) * len(lo)
        src = tuple(slice(l - co + so, h - co + so) for l, h, co, so in zip(lo, hi, chunk.offsets, starts))
        dst = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, read.offsets))
        yield chunk, src, dst


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
        iteration = tracker_iteration(tracker, tracker.read_text())
    folder = root / iteration_dir(iteration)
    if not folder.is_dir():
        raise DistconvError(f"iteration {iteration} not found: {folder} does not exist")
    return folder, iteration


def iteration_dir(iteration: int | str) -> str:
    """Megatron-LM's name for an iteration's folder: ``release`` or ``iter_0000042``."""
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def tracker_iteration(tracker: Path, text: str) -> int | str:
    """The iteration a tracker file's ``text`` names: a number or ``release``; else an error naming the file."""
    text = text.strip()
    if text == "release":
        return text
    if re.fullmatch(r"[0-9]+", text):  # ASCII digits only: ``str.isdigit`` also takes "²", which ``int`` refuses
        return int(text)
    raise DistconvError(f"{tracker} holds {text[:100]!r}, neither an iteration number nor 'release'")


def detect_format(folder: Path) -> str:
    """``torch_dist`` (metadata.json, written last by a complete save), ``legacy`` (mp_rank_*) or
    ``dcp``: DCP files alone, which a ``torch_dcp`` or ``fsdp_dtensor`` save writes (and an unfinished
    torch_dist one leaves); ``fsdp_dtensor.describe_plain_dcp`` tells them apart by their keys and args."""
    if folder.is_file():
        return "legacy"  # a .zip, see locate()
    if (folder / "metadata.json").exists():
        return "torch_dist"
    if any(folder.glob("mp_rank_*")):
        return "legacy"
    if (folder / ".metadata").exists():
        return "dcp"
    raise DistconvError(f"{folder} is not a Megatron checkpoint (no metadata.json, no mp_rank_* folders)")


# Enums newer megatron-cores put in ``args`` (0.19: ``inference_cuda_graph_scope``), by exact
# (module, name); where the installed megatron-core lacks one, ``_newer_enum`` stands in for it.
NEWER_ENUMS = (("megatron.core.transformer.enums", "InferenceCudaGraphScope"),
               ("megatron.core.transformer.enums", "CudaGraphModule"))


class NewerEnumMember:
    """A member of an enum of a newer megatron-core than the installed one: keeps its value, and
    pickles back as that enum's member (``Enum.__reduce_ex__``'s form), so that a reshard writes
    the source's args as they were."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return type(self), (self.value,)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.value == self.value

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, self.value))

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__}: {self.value!r}>"


def _newer_enum(module_name: str, name: str) -> Any:
    """The installed megatron-core's ``module.name``; where it lacks it, a ``NewerEnumMember``
    class of that name, set on the module (pickle finds a class by its module and name)."""
    module = importlib.import_module(module_name)
    found = getattr(module, name, None)
    if found is None:
        found = type(name, (NewerEnumMember,), {"__module__": module_name, "__qualname__": name})
        setattr(module, name, found)
    return found


def safe_globals() -> list[Any]:
    """Types Megatron-LM puts in ``args`` and the common state (besides plain containers)."""
    allowed: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, io.BytesIO]
    try:  # megatron-core >= 0.14 keeps its own list; use it when importable
        from megatron.core.safe_globals import SAFE_GLOBALS

        allowed += list(SAFE_GLOBALS)
    except ImportError:
        pass
    for module_name, name in NEWER_ENUMS:
        try:
            allowed.append(_newer_enum(module_name, name))
        except ImportError:  # no megatron-core at all: the args cannot name its enums either
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


# Every global a DCP ``.metadata`` may name, exactly: ``(module, name)``. Nothing else resolves.
_METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch._utils", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id, as torch's own DCP save writes it
    ("pathlib", "PurePosixPath"),
    *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata``; any global outside ``_METADATA_GLOBALS`` is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _METADATA_GLOBALS:  # dotted names never match: no attribute walks
            raise DistconvError(f"refusing to unpickle {module}.{name} from DCP .metadata: not a DCP metadata type")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise DistconvError(f"DCP .metadata names {module}.{name}, which this torch/megatron-core lacks") from None


def read_dcp_metadata(folder: Path) -> Any:
    """The DCP ``Metadata`` of a torch_dist folder, unpickled with the allow-list, its file names checked."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / ".metadata"
    if not path.exists():
        raise DistconvError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except DistconvError as e:
        raise DistconvError(f"{path}: {e}") from None
    except Exception as e:  # EOFError, UnpicklingError, and whatever a crafted stream raises
        raise DistconvError(f"{path} is unreadable or truncated: {type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise DistconvError(f"{path} does not hold DCP metadata (it unpickles to {type(metadata).__name__})")
    checked: set[str] = set()  # thousands of items name a few files: each name is resolved once
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name not in checked:
            inside(folder, name, str(path))
            checked.add(name)
        if not all(isinstance(getattr(info, a, None), int) and getattr(info, a) >= 0 for a in ("offset", "length")):
            raise DistconvError(f"{path} gives a data file range that is not a pair of byte counts")
    return metadata


def read_stored(folder: Path, info: Any, what: str, random_access: bool = False) -> bytes:
    """The bytes of one DCP item (``info``: its ``_StorageInfo`` from the allow-listed metadata),
    from a data file that must lie inside ``folder``; a short file is an error naming it."""
    if getattr(info, "transform_descriptors", None):
        raise DistconvError(f"{folder}: {what} is stored with transforms {info.transform_descriptors}, which distconv does not read")
    path = inside(folder, info.relative_path, f"{folder}/.metadata")
    try:
        with path.open("rb") as f:
            if random_access and hasattr(os, "posix_fadvise"):  # no kernel read-ahead into the neighbours
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            f.seek(int(info.offset))
            data = f.read(int(info.length))
    except OSError as e:
        raise DistconvError(f"cannot read checkpoint shard {path}: {e.strerror or e}") from None
    if len(data) != int(info.length):
        raise DistconvError(f"checkpoint shard {path} is truncated: {what} needs {info.length} bytes at {info.offset}")
    return data


def load_common_state(folder: Path, metadata: Any = None) -> dict[str, Any]:
    """``common.pt`` (megatron-core <= 0.18) or the ``common_state`` bytes inside DCP (0.19).

    Both are unpickled with ``torch.load(weights_only=True)`` and the allow-list; the DCP
    bytes are read straight from the file the (allow-listed) metadata names.
    """
    common = folder / "common.pt"
    if common.exists():
        state = safe_torch_load(common, str(common))
        if not isinstance(state, dict):
            raise DistconvError(f"{common} holds a {type(state).__name__}, not Megatron-LM's common state dict")
        return state
    metadata = metadata if metadata is not None else read_dcp_metadata(folder)
    from torch.distributed.checkpoint.metadata import MetadataIndex

    info = metadata.storage_data.get(MetadataIndex("common_state/shard_0_1"))
    if info is None:
        info = next((v for k, v in metadata.storage_data.items() if k.fqn.startswith("common_state")), None)
    if info is None:
        raise DistconvError(f"{folder} has neither common.pt nor a common_state in its DCP metadata")
    state = safe_torch_load(io.BytesIO(read_stored(folder, info, "common_state")), f"{folder} common_state")
    if isinstance(state, io.BytesIO):  # torch's DCP stores a bytes entry as a saved buffer
        state.seek(0)
        state = safe_torch_load(state, f"{folder} common_state")
    state = state[0] if isinstance(state, list) and state else state
    if not isinstance(state, dict):
        raise DistconvError(f"{folder}: the common_state inside DCP is a {type(state).__name__}, not a dict")
    return state


def read_tensor_index(folder: Path, metadata: Any) -> tuple[dict[str, TensorInfo], int]:
    """Model tensors (global shape, dtype, stored chunks with their files) and other bytes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors: dict[str, TensorInfo] = {}
    other = 0
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        shape = tuple(md.size)
        if key.startswith(NON_MODEL_PREFIXES) or "._extra_state" in key:
            other += numel(shape) * md.properties.dtype.itemsize
            continue
        tensors[key] = TensorInfo(key, shape, md.properties.dtype, stored_chunks(folder, metadata, key, md))
    return tensors, other


def stored_chunks(folder: Path, metadata: Any, key: str, md: Any) -> tuple[Chunk, ...]:
    """The chunks ``folder``'s DCP ``metadata`` lists for ``key`` (``md``: its ``TensorStorageMetadata``), each with
    its data file and the rank that wrote it (from ``__{rank}_{n}.distcp``).

    A chunk must lie inside the tensor and its stored bytes must hold at least its elements: shapes
    come from a file that may be crafted, and are trusted from here on (a box of that size is
    allocated before the bytes are read)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    shape, itemsize = tuple(md.size), md.properties.dtype.itemsize
    chunks = []
    for c in md.chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape) \
                or any(o < 0 or s < 0 or o + s > g for o, s, g in zip(c.offsets, c.sizes, shape)):
            raise DistconvError(f"{folder}/.metadata: a chunk of {key} at {tuple(c.offsets)} of {tuple(c.sizes)} lies outside "
                                f"its shape {shape}")
        info = metadata.storage_data.get(MetadataIndex(key, torch.Size(c.offsets)))
        if info is not None and info.length < numel(tuple(c.sizes)) * itemsize:
            raise DistconvError(f"{folder}/.metadata: the chunk of {key} at {tuple(c.offsets)} has {numel(tuple(c.sizes))} "
                                f"elements but stores {info.length} bytes")
        file = info.relative_path if info is not None else ""
        m = _WRITER_FILE.search(file)
        chunks.append(Chunk(tuple(c.offsets), tuple(c.sizes), file, int(m.group(1)) if m else 0))
    return tuple(chunks)


def check_files(folder: Path, metadata: Any) -> None:
    """Every data file the metadata names exists and is long enough (cheap ``stat`` only)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        path = inside(folder, name, f"{folder}/.metadata")
        if not path.exists():
            raise DistconvError(f"checkpoint shard {path} is missing")
        size = path.stat().st_size
        if size < length:
            raise DistconvError(f"checkpoint shard {path} is truncated: {size} bytes, metadata needs {length}")
