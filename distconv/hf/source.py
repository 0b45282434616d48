"""HF safetensors folders as sources: tensors read a box at a time, block-wise FP8 and MXFP4 dequantized as read."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from distconv.engine.folder import files_in, inside
from distconv.errors import DistconvError
from distconv.hf import mxfp4
from distconv.hf.fp8 import SCALE, check_scale, dequantize

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Source(Protocol):
    """HF-named tensors that can be read a box at a time."""

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor: ...


class SafetensorsFiles:
    """Tensors of one ``.safetensors`` file or a folder of them, read by slice.

    The headers are read once; each read opens its file and closes it again, so the pages it
    mapped stop counting in the process's memory as soon as the slice is copied out. Inside
    ``kept_open`` the reads share one opening of each file instead (safetensors parses a file's
    whole header at each opening, 0.6-0.8 ms for a file of 741 tensors: for many tensors of one
    file read together).
    """

    def __init__(self, path: str | Path | list[Path], same_name: str = "") -> None:
        """``path``: a file, a folder (its ``*.safetensors``), or a list of files. A tensor name in two
        files is an error (``same_name`` says what to do about it)."""
        if isinstance(path, list):
            files = path
        elif Path(path).is_file():
            files = [Path(path)]
        elif Path(path).is_dir():
            files = sorted(Path(path).glob("*.safetensors"))
        else:
            raise DistconvError(f"--load {path}: no such file or directory")
        if not files:
            raise DistconvError(f"--load {path} holds no .safetensors files")
        self.where: dict[str, Path] = {}
        self._header: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> shape, dtype code
        for f in files:
            with self._open(f) as handle:
                for name in handle.keys():
                    if name in self.where:
                        raise DistconvError(f"tensor {name} is in both {self.where[name].name} and {f.name}{same_name}")
                    piece = handle.get_slice(name)
                    self.where[name] = f
                    self._header[name] = (tuple(piece.get_shape()), piece.get_dtype())
        self._kept: dict[Path, list[Any]] | None = None  # file -> its opening, bytes read through it
        self._budget: int | None = None

    @contextlib.contextmanager
    def kept_open(self, budget: int | None = None) -> Iterator[None]:
        """Reads inside share one opening of each file; the files are closed at the end. With
        ``budget``, a file is opened afresh once ``budget`` bytes were read through one opening:
        the pages a read maps stay resident while the file is open, so this bounds them."""
        self._kept, self._budget = {}, budget
        try:
            yield
        finally:
            kept, self._kept = self._kept, None
            for handle, _ in kept.values():
                handle.__exit__(None, None, None)

    @staticmethod
    def _open(file: Path) -> Any:
        from safetensors import safe_open

        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise DistconvError(f"{file} is not a readable safetensors file: {e}") from None

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> str:
        return self.where[name].name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._header[name][0]

    def code(self, name: str) -> str:
        """The safetensors dtype code of ``name`` (``BF16``, ``F8_E4M3``, ...)."""
        return self._header[name][1]

    def dtype(self, name: str) -> torch.dtype:
        code = self.code(name)
        if code not in _ST_DTYPES:
            raise DistconvError(f"tensor {name} has dtype {code}; import reads floating-point weights only")
        return _ST_DTYPES[code]

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        file = self.where[name]
        if not file.exists():
            raise DistconvError(f"source file {file} is missing (it was there when the run was planned)")
        if self._kept is not None:
            kept = self._kept.get(file)
            if kept is None:  # kept only once opened: the closing at the end meets no failed opening
                kept = self._kept[file] = [self._open(file).__enter__(), 0]
            data = kept[0].get_slice(name)[box]
            kept[1] += data.nbytes
            if self._budget is not None and kept[1] >= self._budget:
                del self._kept[file]
                kept[0].__exit__(None, None, None)
            return data
        with self._open(file) as handle:
            return handle.get_slice(name)[box]


def kept_open(source: Source, budget: int | None = None) -> contextlib.AbstractContextManager:
    """``SafetensorsFiles.kept_open`` of the files behind ``source``: itself, or those a view of them
    (``DequantizedFP8``, ``DequantizedMXFP4``, a MindSpore source under HF names) reads as its ``files``."""
    return getattr(source, "files", source).kept_open(budget)


class DequantizedFP8:
    """A block-wise FP8 source (``quant_method: fp8``) seen as high-precision tensors.

    A tensor stored ``F8_E4M3`` with a ``<name>_scale_inv`` is read box by box: the FP8 rows and
    columns asked for, times the scale rows and columns of the blocks they lie in (float32;
    partial edge blocks included). Tensors stored in high precision (``modules_to_not_convert``,
    norms, embeddings) read as they are; the scales themselves are not tensors of the model.
    A dequantized tensor reports bfloat16, the format's high-precision dtype.
    """

    def __init__(self, files: SafetensorsFiles, quantization: dict[str, Any]) -> None:
        method, fmt = quantization.get("quant_method"), quantization.get("fmt", "e4m3")
        block = quantization.get("weight_block_size")
        if method != "fp8" or fmt != "e4m3" or not (isinstance(block, (list, tuple)) and len(block) == 2
                                                   and all(isinstance(b, int) and b > 0 for b in block)):
            raise DistconvError(f"quantization_config {quantization!r}: import reads block-wise FP8 "
                                "(quant_method fp8, fmt e4m3, weight_block_size [rows, cols]) or MXFP4 (quant_method mxfp4) only")
        self.files, self.block = files, (block[0], block[1])
        names = set(files.names())
        scaled = {n.removesuffix(SCALE) for n in names if n.endswith(SCALE)}
        orphans = sorted(scaled - names)
        if orphans:
            raise DistconvError(f"{orphans[0]}{SCALE} is a scale of no tensor: the source has no {orphans[0]}")
        scales = {n + SCALE for n in scaled}
        self._names = [n for n in files.names() if n not in scales]  # in the source's order
        self.quantized: set[str] = set()
        for n in sorted(self._names):
            if files.code(n) == "F8_E4M3":
                check_scale(n, files.shape(n), files.shape(n + SCALE) if n in scaled else None, self.block)
                self.quantized.add(n)
            elif n in scaled:
                raise DistconvError(f"tensor {n} has a {SCALE} but is stored {files.code(n)}, not F8_E4M3")

    def names(self) -> list[str]:
        return self._names

    def file_of(self, name: str) -> str:
        return self.files.file_of(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return torch.bfloat16 if name in self.quantized else self.files.dtype(name)

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        if name not in self.quantized:
            return self.files.read(name, box)
        shape = self.files.shape(name)
        (r0, r1, _), (c0, c1, _) = (b.indices(n) for b, n in zip(tuple(box) + (slice(None),) * (2 - len(box)), shape))
        bo, bi = self.block
        q = self.files.read(name, (slice(r0, r1), slice(c0, c1)))
        scale = self.files.read(name + SCALE, (slice(r0 // bo, -(-r1 // bo)), slice(c0 // bi, -(-c1 // bi))))
        if not bool((scale.float() > 0).all() & torch.isfinite(scale.float()).all()):
            raise DistconvError(f"{name}{SCALE} holds a scale that is NaN, infinite, zero or negative (block rows from "
                                f"{r0 // bo}, columns from {c0 // bi}): a block-wise FP8 scale must be finite and positive")
        return dequantize(q, scale, r0, c0, self.block)


class DequantizedMXFP4:
    """An MXFP4 source (``quant_method: mxfp4``, gpt-oss's hub release) seen as high-precision tensors.

    A weight stored as uint8 ``<name>_blocks [..., out, in/32, 16]`` and ``<name>_scales [..., out,
    in/32]`` reads as ``<name> [..., in, out]`` (transformers' parameter: ``hf.mxfp4``), bfloat16
    (which holds every MXFP4 value exactly); a box of it is dequantized from the blocks of the
    experts (leading rows) it covers. Other tensors read as they are.
    """

    def __init__(self, files: SafetensorsFiles, quantization: dict[str, Any]) -> None:
        if quantization.get("quant_method") != "mxfp4":
            raise DistconvError(f"quantization_config {quantization!r}: not MXFP4")
        self.files = files
        names = set(files.names())
        self.quantized: set[str] = set()
        for n in sorted(names):
            if n.endswith(mxfp4.SCALES) and n.removesuffix(mxfp4.SCALES) + mxfp4.BLOCKS not in names:
                raise DistconvError(f"{n} is a scale of no tensor: the source has no {n.removesuffix(mxfp4.SCALES)}{mxfp4.BLOCKS}")
            if not n.endswith(mxfp4.BLOCKS):
                continue
            base = n.removesuffix(mxfp4.BLOCKS)
            scales = base + mxfp4.SCALES
            mxfp4.check(base, files.shape(n), files.shape(scales) if scales in names else None)
            if files.code(n) != "U8" or files.code(scales) != "U8":
                raise DistconvError(f"{base}: MXFP4 blocks and scales are uint8, not {files.code(n)} and {files.code(scales)}")
            if base in names:
                raise DistconvError(f"{base} is in the source both as itself and as MXFP4 {n}")
            self.quantized.add(base)
        parts = {q + suffix for q in self.quantized for suffix in (mxfp4.BLOCKS, mxfp4.SCALES)}
        self._names = [n.removesuffix(mxfp4.BLOCKS) if n in parts and n.endswith(mxfp4.BLOCKS) else n
                       for n in files.names() if not (n in parts and n.endswith(mxfp4.SCALES))]

    def names(self) -> list[str]:
        return self._names

    def file_of(self, name: str) -> str:
        return self.files.file_of(name + mxfp4.BLOCKS if name in self.quantized else name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.quantized:
            return self.files.shape(name)
        *lead, out, groups, _ = self.files.shape(name + mxfp4.BLOCKS)
        return (*lead, groups * mxfp4.BLOCK, out)

    def dtype(self, name: str) -> torch.dtype:
        return torch.bfloat16 if name in self.quantized else self.files.dtype(name)

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        if name not in self.quantized:
            return self.files.read(name, box)
        lead = len(self.shape(name)) - 2
        outer, inner = tuple(box[:lead]), tuple(box[lead:])
        values = mxfp4.dequantize(self.files.read(name + mxfp4.BLOCKS, outer), self.files.read(name + mxfp4.SCALES, outer), name)
        return values.transpose(-1, -2).to(torch.bfloat16)[(slice(None),) * lead + inner]


def expected_hf_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """The tensors an HF folder of ``config`` holds (tied aliases left out), from a meta model.

    transformers 5 fuses some weights when it loads (MoE experts); the names and shapes are
    taken in the saved (hub) form. MTP layers (``num_mtp_layers``) are not part of the model
    transformers builds (``directions.hf_model`` adds them).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if getattr(config, "tie_word_embeddings", False):
        aliases |= set(getattr(model, "all_tied_weights_keys", None) or {})
    state = {n: t for n, t in model.state_dict().items() if n not in aliases}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:
        pass
    return {n: tuple(t.shape) for n, t in state.items()}


@dataclasses.dataclass
class HFSource:
    """An import source under HF names: its tensors, the HF config they follow, and what identifies it."""

    tensors: Source
    config: Any
    tokenizer: str | None  # a folder to name in the target's args, when the source holds a tokenizer
    what: str  # for messages
    inputs: tuple[str | Path | None, ...]  # what the output must stay clear of
    identity: dict[str, Any]  # recorded in the output's marker
    warnings: list[str] = dataclasses.field(default_factory=list)


def file_identity(files: list[Path], *extra: Path) -> dict[str, Any]:
    """Size and modification time of each file, to tell a changed source from the one converted before."""
    return {str(f.resolve()): [f.stat().st_size, f.stat().st_mtime_ns] for f in (*files, *extra) if f.exists()}


def _check_index(folder: Path) -> None:
    """Every shard ``model.safetensors.index.json`` names is in the folder (a missing one is named)."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DistconvError(f"{index} is not a safetensors index: {e}") from None
    for name in names:
        if not inside(folder, name, str(index)).is_file():
            raise DistconvError(f"source file {folder / name} is missing (named by {index.name})")


def auto_map_file(where: str | Path) -> Path | None:
    """The folder's ``config.json`` or ``tokenizer_config.json`` (or the JSON file ``where`` itself)
    that holds an ``auto_map`` (classes in the folder's own Python files), if any. distconv never
    runs such code: transformers is always passed ``trust_remote_code=False``, so it never asks and
    uses its own classes where it has them."""
    where = Path(where)
    for path in (where / "config.json", where / "tokenizer_config.json") if where.is_dir() else (where,):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # no such file, or not JSON: transformers' own reading reports it
            continue
        if isinstance(data, dict) and "auto_map" in data:
            return path
    return None


def remote_code(file: Path, what: str, loaded: bool) -> str:
    """The one line about ``file``'s ``auto_map``: a warning when transformers loaded the folder with
    classes of its own, the error when it cannot load it without running the folder's code."""
    if loaded:
        return (f"{what}: the auto_map in {file} is ignored: transformers' own classes are used, and the folder's "
                "Python files are neither run nor copied")
    return (f"{what}: {file} has an auto_map, and transformers has no class of its own for this folder: it would "
            "have to run the folder's Python code, which distconv never does")


# the attribute a config read under a hub-only ``model_type`` (``read_config``'s ``hub_types``) keeps
# that ``model_type`` in, for the export to write it back (``hf.sink.write_config``)
HUB_MODEL_TYPE = "_hub_model_type"


def read_config(path: str | Path, what: str, hub_types: Mapping[str, tuple[str, str]]) -> tuple[Any, list[str]]:
    """The HF config of a model folder (its ``config.json``) or of a JSON file, and warnings; never the
    folder's own code (``trust_remote_code=False``), its ``auto_map`` dropped with a warning.

    ``hub_types`` maps a ``model_type`` transformers lacks to the architecture and config class that
    read it (``families.HUB_TYPES``: Kimi-K2's ``kimi_k2``, DeepSeek-V3's architecture under fields of
    its own): such a config is read from the JSON into that class, its ``architectures`` required to
    be that one; the ``model_type`` is kept in ``HUB_MODEL_TYPE``, so an export writes it again (vLLM
    reads it; transformers needs the class's own).
    """
    import transformers

    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    remote = auto_map_file(path)
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DistconvError(f"{what} {path}: cannot read an HF config: {e}") from None
    hub_type = data.get("model_type")
    warnings = [remote_code(remote, what, True)] if remote else []
    try:
        if hub_type in hub_types:
            architecture, class_name = hub_types[hub_type]
            if data.get("architectures") != [architecture]:
                raise DistconvError(f"{what} {path}: model_type {hub_type} is read as {architecture} only, "
                                    f"not architectures {data.get('architectures')!r}")
            config_class = getattr(transformers, class_name)
            config = config_class.from_dict({k: v for k, v in data.items() if k not in ("model_type", "auto_map")})
            setattr(config, HUB_MODEL_TYPE, hub_type)
            warnings.append(f"{what}: transformers {transformers.__version__} has no model_type {hub_type}: its config is read as "
                            f"{class_name} (the {architecture} it names), and an export keeps "
                            f"model_type {hub_type}, which vLLM loads; transformers loads such a folder only with "
                            f"model_type {config_class.model_type} (docs/models.md)")
        elif path.is_dir():
            config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        else:
            config = transformers.AutoConfig.for_model(**data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DistconvError(remote_code(remote, what, False) if remote else f"{what} {path}: cannot read an HF config: {e}") from None
    if hasattr(config, "auto_map"):
        del config.auto_map
    return config, warnings


def open_hf(load: str | Path, hub_types: Mapping[str, tuple[str, str]]) -> HFSource:
    """An HF model folder: its tensors, its config (``read_config``), and itself as tokenizer if it holds one."""
    path = Path(load)
    if not (path / "config.json").exists():
        raise DistconvError(f"--load {path} is not an HF model folder (no config.json)")
    config, warnings = read_config(path, "--load", hub_types)
    tokenizer = str(path.absolute()) if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")) else None
    _check_index(path)
    files = SafetensorsFiles(path)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
        mx = quantization.get("quant_method") == "mxfp4"
        tensors: Source = DequantizedMXFP4(files, quantization) if mx else DequantizedFP8(files, quantization)
    else:
        tensors = files
    return HFSource(tensors, config, tokenizer, str(load), (load, *files_in(path)),
                    file_identity(sorted(set(files.where.values())), path / "config.json"), warnings)
