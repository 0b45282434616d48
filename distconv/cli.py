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
    exp.add_argument("--format", default="safetensors", choices=["safetensors", "torch"],
                     help="safetensors shards (default), or torch: one model.pt holding {model_state_dict, model_config}")
    ins = sub.add_parser("inspect", help="describe a Megatron checkpoint from its metadata (no torchrun)")
    ins.add_argument("ckpt", help="Megatron-LM save root, one iter_XXXXXXX/release folder, or a legacy .zip")
    ins.add_argument("--iteration", type=lambda s: s if s == "release" else int(s), help="iteration (default: the tracker's)")
    ins.add_argument("--json", action="store_true", help="print a JSON report")
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if opts.command == "export":
            from distconv.pipeline import main_export

            return main_export(opts)
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
