"""The HF folder sink: safetensors shards (or one ``model.pt``), then config, tokenizer and index.

Everything goes into the run's temporary folder (``distconv.engine.folder``).
Shards are written tensor by tensor: the header is known from the plan, so no shard is ever
built in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import torch

from distconv.engine.marker import HashedWrites
from distconv.engine.plan import Output, Slab, file_order, whole
from distconv.errors import DistconvError
from distconv.hf.source import HUB_MODEL_TYPE

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
INDEX = "model.safetensors.index.json"


def _header(outputs: list[Output]) -> bytes:
    """The file's header (``outputs`` in ``file_order``); a tensor of slabs is one entry."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype, _) in whole(outputs).items():
        nbytes = math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


class _Arrivals:
    """Where each planned output goes in ``file_order``: the k-th output written under a name is
    the k-th planned under it (a tensor's slabs are planned in order)."""

    def __init__(self, outputs: list[Output]) -> None:
        self.order = file_order(outputs)
        at = {id(o): i for i, o in enumerate(self.order)}
        self._positions: dict[str, list[int]] = {}
        for o in outputs:
            self._positions.setdefault(o.name, []).append(at[id(o)])
        self._seen: dict[str, int] = {}

    def position(self, name: str) -> int | None:
        """The file position of the next output written under ``name`` (None: none is left)."""
        k = self._seen.get(name, 0)
        positions = self._positions.get(name, [])
        if k >= len(positions):
            return None
        self._seen[name] = k + 1
        return positions[k]


class ShardWriter:
    """Writes the planned outputs into their safetensors files, each file in ``file_order``: an
    output that arrives before its turn (MXFP4 scales, which come with each expert's blocks but
    are stored after every expert's) is held until then."""

    def __init__(self, folder: Path, outputs: list[Output]) -> None:
        self.folder = folder
        self.arrivals = _Arrivals(outputs)
        self.outputs = self.arrivals.order
        self.held: dict[int, torch.Tensor] = {}
        self.next = 0
        self.file: BinaryIO | None = None
        self.file_name: str | None = None
        self.bytes_written = 0
        self.sums: dict[str, dict[str, Any]] = {}  # file -> size and SHA-256, hashed as written
        self._hash: Any = None
        self._size = 0
        self._writes = HashedWrites()  # the hash of a buffer computed while it is written

    def _put(self, data: Any) -> None:
        assert self.file is not None
        self._writes.write(self.file, self._hash, data)
        self._size += memoryview(data).nbytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        at = self.arrivals.position(name)
        if at is None:
            raise DistconvError(f"internal: unplanned output tensor {name}")
        out = self.outputs[at]
        if (name, tuple(tensor.shape), tensor.dtype) != (out.name, out.shape, out.dtype):
            raise DistconvError(
                f"internal: expected {out.name} {out.shape} {out.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous()
        if at != self.next:
            self.held[at] = data.clone()
            return
        self._store(out, data)
        while self.next in self.held:
            self._store(self.outputs[self.next], self.held.pop(self.next))

    def _store(self, out: Output, data: torch.Tensor) -> None:
        if out.file != self.file_name:
            self._open(out.file)
        try:
            self._put(data.reshape(-1).view(torch.uint8).numpy().data)
        except OSError as e:
            raise _write_error(self.folder / out.file, e) from None
        self.bytes_written += out.nbytes
        self.next += 1

    def _open(self, file_name: str) -> None:
        self._close_file()
        self.file = open(self.folder / file_name, "wb")
        self.file_name = file_name
        self._hash, self._size = hashlib.sha256(), 0
        self._put(_header([o for o in self.outputs if o.file == file_name]))

    def _close_file(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
            except OSError as e:
                raise _write_error(self.folder / str(self.file_name), e) from None
            self.file.close()
            self.file = None
            self.sums[str(self.file_name)] = {"bytes": self._size, "sha256": self._hash.hexdigest()}

    def close(self) -> None:
        """Finish the last file; every planned tensor must have been written."""
        self._close_file()
        self._writes.close()
        if self.next != len(self.outputs):
            missing = self.outputs[self.next].name
            raise DistconvError(f"internal: output incomplete, {missing} and later tensors were never written")

    def abort(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # flushing what is buffered can fail again (a full disk)
                pass
            self.file = None
        self._writes.close()


class TorchFileWriter:
    """``--format torch``: the planned outputs in one ``model.pt`` (the one writer rank holds them all).

    The file is ``{"model_state_dict": {HF name: tensor}, "model_config": HF config dict}``,
    loadable with ``torch.load(weights_only=True)``.
    """

    FILE = "model.pt"

    def __init__(self, folder: Path, outputs: list[Output], config: dict[str, Any]) -> None:
        self.folder = folder
        self.arrivals = _Arrivals(outputs)
        self.outputs = self.arrivals.order
        self.shapes = whole(outputs)
        self.tensors: dict[str, torch.Tensor] = {}
        self.next = 0  # outputs taken
        self.config = config

    def write(self, name: str, tensor: torch.Tensor) -> None:
        at = self.arrivals.position(name)
        out = self.outputs[at] if at is not None else None
        if out is None or (name, tuple(tensor.shape), tensor.dtype) != (out.name, out.shape, out.dtype):
            raise DistconvError(f"internal: unplanned output tensor {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu")
        if isinstance(out.place, Slab):  # one tensor of every slab
            if name not in self.tensors:
                self.tensors[name] = torch.empty(self.shapes[name][0], dtype=out.dtype)
            self.tensors[name][out.place.index].copy_(data)
        else:
            self.tensors[name] = data.contiguous().clone()
        self.next += 1

    @property
    def bytes_written(self) -> int:
        """Bytes of the tensors taken so far (for progress; the file is written on ``close``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def close(self) -> None:
        if self.next != len(self.outputs):
            raise DistconvError(f"internal: output incomplete, {self.outputs[self.next].name} and later tensors were never written")
        path = self.folder / self.FILE
        try:
            with open(path, "wb") as f:
                torch.save({"model_state_dict": self.tensors, "model_config": self.config}, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _write_error(path, e) from None

    def abort(self) -> None:
        self.tensors.clear()


def write_index(folder: Path, outputs: list[Output]) -> None:
    index = {
        "metadata": {"total_size": sum(o.nbytes for o in outputs)},
        "weight_map": {o.name: o.file for o in outputs},
    }
    _write_json(folder / INDEX, index)


def complete(folder: Path, names: set[str]) -> bool:
    """``names`` (the files of an HF folder) hold what the format needs: ``config.json`` with the
    weights, ``model.pt`` or the safetensors index and every shard it names (read from the index)."""
    if "config.json" not in names:
        return False
    if TorchFileWriter.FILE in names:
        return True
    shards = json.loads((folder / INDEX).read_text())["weight_map"].values() if INDEX in names else ()
    return bool(shards) and all(isinstance(s, str) and s in names for s in shards)


def write_config(folder: Path, config: Any, dtype: torch.dtype, quantization: dict[str, Any] | None = None) -> None:
    """``config.json`` from transformers' own config class, with ``dtype`` and ``torch_dtype``
    (and ``quantization_config`` when given: the FP8 export).

    RoPE settings are also written in the pre-v5 spelling (``rope_theta``/``rope_scaling``)
    so serving engines on older transformers read them too. A config read under a hub-only
    ``model_type`` (``hf.source.HUB_MODEL_TYPE``: Kimi-K2's ``kimi_k2``) is written with it.
    """
    config.dtype = dtype
    data = config.to_diff_dict()
    if HUB_MODEL_TYPE in data:
        data["model_type"] = data.pop(HUB_MODEL_TYPE)
    dtype_name = str(dtype).removeprefix("torch.")
    data["dtype"] = data["torch_dtype"] = dtype_name
    data.pop("quantization_config", None)  # a given config's (a release's) describes its files, not these
    if quantization is not None:
        data["quantization_config"] = quantization
    rope = data.get("rope_parameters")
    if isinstance(rope, dict):
        data.setdefault("rope_theta", rope.get("rope_theta"))
        if rope.get("rope_type", "default") != "default":
            data.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    _write_json(folder / "config.json", data)


def write_generation_config(folder: Path, config: Any, source: Path | None) -> None:
    """Copy the given ``generation_config.json`` if there is one, else derive it from config.

    A derived one always states ``bos_token_id`` and ``eos_token_id``, as null when the config
    has none (transformers would leave them out).
    """
    path = folder / "generation_config.json"
    try:
        if source is not None and (source / "generation_config.json").exists():
            shutil.copyfile(source / "generation_config.json", path)
            return
    except OSError as e:
        raise _write_error(path, e) from None
    from transformers import GenerationConfig

    data = GenerationConfig.from_model_config(config).to_diff_dict()
    for name in ("bos_token_id", "eos_token_id"):
        data.setdefault(name, getattr(config, name, None))
    _write_json(path, data)


def write_tokenizer(folder: Path, tokenizer: Any) -> None:
    """The tokenizer's files, saved by transformers into a scratch folder, then copied one by
    one so that a failed write names its file."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="distconv-tokenizer-") as scratch:
        try:
            tokenizer.save_pretrained(scratch)
        except OSError as e:
            raise DistconvError(f"cannot save the tokenizer: {e.strerror or e}") from None
        for source in sorted(Path(scratch).iterdir()):
            try:
                shutil.copyfile(source, folder / source.name)
            except OSError as e:
                raise _write_error(folder / source.name, e) from None


def _write_json(path: Path, data: Any) -> None:
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _write_error(path, e) from None


def _write_error(path: Path, error: OSError) -> DistconvError:
    """A failed write (a full disk, a quota, a size limit) naming the file."""
    return DistconvError(f"cannot write {path}: {error.strerror or error}")
