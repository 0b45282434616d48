"""``distconv inspect CKPT``: what a checkpoint (or an HF folder) holds, from metadata only (no torchrun, no payload)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from distconv.directions.export import tokenizer_folder
from distconv.errors import DistconvError
from distconv.families import FAMILIES, HUB_TYPES, pick_family
from distconv.hf.fp8 import SCALE
from distconv.megatron.args import arg, arg_names, is_hybrid, parallel_sizes, spec_from_args
from distconv.megatron.checkpoint import Checkpoint
from distconv.megatron.source import describe
from distconv.megatron.tokenizer import checkpoint_tokenizer, outside_checkpoint, tokenizer_file

# The Megatron-LM args that decide how a checkpoint converts (missing ones are left out): the
# model's (the args table's), its layout, tokenizer and layer spec.
ARGS_THAT_MATTER = (*arg_names(), "is_hybrid_model", "spec", "make_vocab_size_divisible_by", "tokenizer_type", "tokenizer_model",
                    "transformer_impl", "ckpt_format")


def inspect_checkpoint(load: str | Path, iteration: int | str | None = None) -> dict[str, Any]:
    """A JSON-ready report on the checkpoint at ``load``."""
    ckpt = describe(load, iteration)
    args = ckpt.args
    try:
        family = pick_family(FAMILIES, spec_from_args(args), None).architecture
    except (DistconvError, TypeError, ValueError) as e:  # args of any type reach here: say what is wrong
        family = f"none ({e})"
    tp, pp, ep, _ = parallel_sizes(args)
    layout = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": arg(args, "virtual_pipeline_model_parallel_size"),
        "expert_model_parallel_size": ep,
        "data_parallel_size": arg(args, "data_parallel_size"),
        "world_size": arg(args, "world_size"),
        "files_or_writers": ckpt.writers,
    }
    report: dict[str, Any] = {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "iteration": ckpt.iteration,
        "layout": layout,
        "args": {name: _plain(getattr(args, name)) for name in ARGS_THAT_MATTER if getattr(args, name, None) is not None},
        "megatron_model": megatron_model(args),
        "hf_family": family,
        "tokenizer": tokenizer_report(ckpt),
        "tensors": [
            {"name": t.key, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "bytes": t.nbytes}
            for t in sorted(ckpt.tensors.values(), key=lambda t: t.key)
        ],
        "model_bytes": ckpt.weight_bytes,
        "other_bytes": ckpt.other_bytes,
    }
    if ckpt.format == "legacy":
        report["checkpoint_version"] = ckpt.common.get("checkpoint_version")
    return report


def megatron_model(args: Any) -> str:
    """The megatron-core model class the args build: a hybrid stack (``MambaModel``, ``HybridModel``
    from megatron-core 0.18) or ``GPTModel``."""
    try:
        return "MambaModel (HybridModel in megatron-core 0.18+)" if is_hybrid(args) else "GPTModel"
    except (TypeError, AttributeError):  # args of any type reach here
        return "unknown"


def tokenizer_report(ckpt: Checkpoint) -> dict[str, Any]:
    """Which tokenizer an export without ``--tokenizer`` reads, and from where (no tokenizer file is
    read): an HF tokenizer folder (written into the export), else the file Megatron-LM's file-based
    tokenizer type reads (for the vocab size only), else none."""
    folder, origin, warnings = tokenizer_folder(None, ckpt)
    if folder is not None:
        return {"kind": "HF tokenizer", "path": str(folder), "from": origin, "outside_checkpoint": bool(warnings)}
    kind = arg(ckpt.args, "tokenizer_type")
    path, origin = tokenizer_file(ckpt.args, checkpoint_tokenizer(Path(ckpt.path))) or (None, "")
    if path is not None:
        return {"kind": f"{kind} file (the vocab size only)", "path": str(path), "from": origin,
                "outside_checkpoint": outside_checkpoint(path, Path(ckpt.path))}
    return {"kind": "none", "path": None, "from": f"no tokenizer of args' tokenizer_type {kind} is readable here",
            "outside_checkpoint": False}


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (name -> dtype, shape, data_offsets), each entry checked."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 100 * 2**20:
            raise DistconvError(f"{path} is not a safetensors file (header length {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise DistconvError(f"{path} is not a safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise DistconvError(f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and _ints(info.get("shape"))
                and _ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2
                and info["data_offsets"][0] <= info["data_offsets"][1]):
            raise DistconvError(f"{path} is not a safetensors file: its header entry {name!r} is not "
                                "{dtype, shape, data_offsets}")
    return header


def _ints(value: Any) -> bool:
    """A JSON list of non-negative whole numbers."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def inspect_hf(folder: str | Path) -> dict[str, Any]:
    """A JSON-ready report on an HF model folder: its architecture, ``quantization_config`` and
    tensors (from the safetensors headers); a block-wise FP8 weight lists its ``_scale_inv``."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DistconvError(f"{folder}/config.json cannot be read: {e}") from None
    if not isinstance(config, dict):
        raise DistconvError(f"{folder}/config.json holds a JSON {type(config).__name__}, not an object")
    for key, kind in (("architectures", list), ("quantization_config", dict)):
        if config.get(key) is not None and not isinstance(config[key], kind):
            raise DistconvError(f"{folder}/config.json: {key} is {config[key]!r}, not a JSON {kind.__name__}")
    if not all(isinstance(a, str) for a in config.get("architectures") or []):
        raise DistconvError(f"{folder}/config.json: architectures {config['architectures']!r} are not all names")
    entries = {name: (f.name, info) for f in sorted(folder.glob("*.safetensors")) for name, info in _safetensors_header(f).items()}
    quantization = config.get("quantization_config")
    tensors = []
    for name in sorted(entries):
        file, info = entries[name]
        if name.endswith(SCALE) and name.removesuffix(SCALE) in entries:
            continue
        entry = {"name": name, "shape": info["shape"], "dtype": info["dtype"], "bytes": info["data_offsets"][1] - info["data_offsets"][0], "file": file}
        if name + SCALE in entries:
            scale = entries[name + SCALE][1]
            entry["scale_inv"] = {"shape": scale["shape"], "dtype": scale["dtype"],
                                  "block": (quantization or {}).get("weight_block_size")}
        tensors.append(entry)
    return {
        "path": str(folder.resolve()),
        "format": "hf-safetensors",
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "read_as": _read_as(config),
        "auto_map": "auto_map" in config,
        "dtype": config.get("dtype", config.get("torch_dtype")),
        "quantization": quantization,
        "tensors": tensors,
        "quantized": sum("scale_inv" in t for t in tensors),
        "model_bytes": sum(i["data_offsets"][1] - i["data_offsets"][0] for _, i in entries.values()),
    }


def _read_as(config: dict[str, Any]) -> str | None:
    """How distconv reads a ``model_type`` transformers lacks (``families.HUB_TYPES``), else None."""
    read_as = HUB_TYPES.get(config.get("model_type"))
    return f"{read_as[1]} ({read_as[0]})" if read_as else None


def render_hf(report: dict[str, Any]) -> str:
    """The human-readable form of ``inspect_hf``'s report."""
    read_as = f", read as {report['read_as']}" if report.get("read_as") else ""
    lines = [
        f"HF folder     {report['path']}",
        f"architecture  {', '.join(report['architectures'] or ['?'])}, dtype {report['dtype']}",
        f"model_type    {report.get('model_type')}{read_as}"
        + (", auto_map ignored (the folder's code is never run)" if report.get("auto_map") else ""),
        f"quantization  {json.dumps(report['quantization']) if report['quantization'] else 'none'}",
        "",
    ]
    width = max((len(t["name"]) for t in report["tensors"]), default=4)
    lines.append(f"{'tensor':<{width}}  {'shape':<14} {'dtype':<8} {'bytes':>12}  scale_inv")
    for t in report["tensors"]:
        scale = t.get("scale_inv")
        lines.append(f"{t['name']:<{width}}  {str(t['shape']):<14} {t['dtype']:<8} {t['bytes']:>12}  "
                     + (f"{scale['shape']} {scale['dtype']}, blocks {scale['block']}" if scale else ""))
    lines += ["", f"{len(report['tensors'])} tensors ({report['quantized']} block-wise FP8), {_gb(report['model_bytes'])} "
                  f"({report['model_bytes']} bytes) with scales"]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _tokenizer_line(tok: dict[str, Any]) -> str:
    if tok["path"] is None:
        return f"none ({tok['from']})"
    where = ", outside the checkpoint: export warns" if tok["outside_checkpoint"] else ""
    return f"{tok['kind']} {tok['path']} (from {tok['from']}{where})"


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def render(report: dict[str, Any]) -> str:
    """The human-readable form of ``inspect_checkpoint``'s report."""
    lay = report["layout"]
    lines = [
        f"checkpoint   {report['path']}",
        f"format       {report['format']}" + (f" (checkpoint_version {report['checkpoint_version']})" if "checkpoint_version" in report else ""),
        f"iteration    {report['iteration']}",
        f"trained at   TP{lay['tensor_model_parallel_size']} PP{lay['pipeline_model_parallel_size']}"
        + (f" VPP{lay['virtual_pipeline_model_parallel_size']}" if lay["virtual_pipeline_model_parallel_size"] else "")
        + (f" EP{lay['expert_model_parallel_size']}" if lay["expert_model_parallel_size"] > 1 else "")
        + (f" DP{lay['data_parallel_size']}" if lay["data_parallel_size"] else "")
        + f"; {lay['files_or_writers']} {'rank files' if report['format'] == 'legacy' else 'writer ranks'}",
        f"model        {report['megatron_model']}",
        f"HF family    {report['hf_family']}",
        f"tokenizer    {_tokenizer_line(report['tokenizer'])}",
        "args         " + ", ".join(f"{k}={v}" for k, v in report["args"].items()),
        "",
    ]
    width = max((len(t["name"]) for t in report["tensors"]), default=4)
    lines.append(f"{'tensor':<{width}}  {'shape':<20} {'dtype':<9} {'bytes':>12}")
    for t in report["tensors"]:
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        lines.append(f"{t['name']:<{width}}  {shape:<20} {t['dtype']:<9} {t['bytes']:>12}")
    lines += [
        "",
        f"model weights              {len(report['tensors'])} tensors, {_gb(report['model_bytes'])} ({report['model_bytes']} bytes)",
        f"optimizer and other state  {_gb(report['other_bytes'])} ({report['other_bytes']} bytes)",
    ]
    return "\n".join(lines)


def main_inspect(opts: Any) -> int:
    """CLI entry for ``distconv inspect``."""
    with warnings.catch_warnings():  # megatron-core warns about missing TE/Apex on import
        warnings.simplefilter("ignore", UserWarning)
        if (Path(opts.ckpt) / "config.json").is_file():  # an HF folder (Megatron saves have none)
            report = inspect_hf(opts.ckpt)
            print(json.dumps(report, indent=1) if opts.json else render_hf(report), flush=True)
            return 0
        report = inspect_checkpoint(opts.ckpt, opts.iteration)
    print(json.dumps(report, indent=1) if opts.json else render(report), flush=True)
    return 0
