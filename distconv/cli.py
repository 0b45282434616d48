"""Command line: ``[torchrun ...] -m distconv export --load CKPT --save OUT ...``."""

from __future__ import annotations

import argparse
import os
import sys

from distconv.errors import DistconvError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distconv",
        description="Distributed converter between Megatron checkpoints and Hugging Face model folders.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="Megatron torch_dist checkpoint -> HF safetensors folder")
    exp.add_argument("--load", required=True, help="Megatron-LM save root, or one iter_XXXXXXX/release folder")
    exp.add_argument("--save", required=True, help="output HF folder (created atomically)")
    exp.add_argument("--iteration", type=lambda s: s if s == "release" else int(s), help="iteration to export (default: the tracker's)")
    exp.add_argument("--hf-config", help="HF model folder or config.json; authoritative for the HF side")
    exp.add_argument("--tokenizer", help="local HF tokenizer folder to copy (default: args.tokenizer_model if local)")
    exp.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="output dtype (auto: training dtype)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    exp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where gathering happens (auto: NCCL on CUDA if available)")
    exp.add_argument("--window", default="1GiB", help="largest group rank 0 gathers at once (default 1GiB)")
    exp.add_argument("--writers", type=int, default=1, help="ranks that write safetensors files in parallel (default 1: rank 0)")
    exp.add_argument("--timeout", type=float, default=1800.0, help="distributed timeout in seconds")
    exp.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _import_parsers(sub)
    exp.add_argument("--format", default="safetensors", choices=["safetensors", "torch"],
                     help="safetensors shards (default), or torch: one model.pt holding {model_state_dict, model_config}")
    ins = sub.add_parser("inspect", help="describe a Megatron checkpoint from its metadata (no torchrun)")
    ins.add_argument("ckpt", help="Megatron-LM save root, one iter_XXXXXXX/release folder, or a legacy .zip")
    ins.add_argument("--iteration", type=lambda s: s if s == "release" else int(s), help="iteration (default: the tracker's)")
    ins.add_argument("--json", action="store_true", help="print a JSON report")
    return parser


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="target TP (default 1)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="target PP (default 1)")
    p.add_argument("--expert-model-parallel-size", type=int, default=1, help="target EP (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--timeout", type=float, default=1800.0, help="distributed timeout in seconds")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _import_parsers(sub: argparse._SubParsersAction) -> None:
    from distconv.mindspore import add_model_args

    imp = sub.add_parser("import", help="HF (or MindSpore Transformers) safetensors -> Megatron torch_dist checkpoint")
    imp.add_argument("--load", required=True, help="HF model folder, or MindSpore safetensors file/folder with --source mindspore")
    imp.add_argument("--save", required=True, help="Megatron-LM save root to create (atomically)")
    imp.add_argument("--source", default="hf", choices=["hf", "mindspore"], help="what --load is (default hf)")
    imp.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="weights dtype (auto: the source's)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="vocab padding unit, times TP (Megatron-LM default 128)")
    imp.add_argument("--iteration", default="release", type=lambda s: s if s == "release" else int(s), help="iteration folder to write (default release)")
    _layout_args(imp)
    add_model_args(imp)
    res = sub.add_parser("reshard", help="Megatron torch_dist checkpoint -> the same at another TP/PP")
    res.add_argument("--load", required=True, help="Megatron-LM save root, or one iter_XXXXXXX/release folder")
    res.add_argument("--save", required=True, help="Megatron-LM save root to create (atomically)")
    res.add_argument("--iteration", type=lambda s: s if s == "release" else int(s), help="iteration to read (default: the tracker's)")
    res.add_argument("--with-optimizer", action="store_true", help="also reshard optimizer state (not supported yet: an error)")
    _layout_args(res)


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if opts.command == "export":
            from distconv.pipeline import main_export

            return main_export(opts)
        if opts.command == "import":
            from distconv.importer import main_import

            return main_import(opts)
        if opts.command == "reshard":
            from distconv.reshard import main_reshard

            return main_reshard(opts)
        if opts.command == "inspect":
            from distconv.inspector import main_inspect

            return main_inspect(opts)
    except DistconvError as e:
        if rank == 0:
            print(f"distconv: error: {e}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:  # a peer died or the network failed mid-collective
        if rank == 0:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"distconv: error: lost contact with another rank ({first})", file=sys.stderr, flush=True)
        return 1
    return 2


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
