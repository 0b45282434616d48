"""Command line: ``[torchrun ...] -m distconv export --load CKPT --save OUT ...``."""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
from typing import Any, Callable, NoReturn

from distconv.errors import DistconvError

_WATCH_ONLY = {"poll": "--poll", "watch_timeout": "--watch-timeout", "once": "--once"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distconv",
        description="Distributed converter between Megatron checkpoints and Hugging Face model folders.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="Megatron torch_dist checkpoint -> HF safetensors folder")
    source = exp.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="Megatron-LM save root, or one iter_XXXXXXX/release folder")
    source.add_argument("--watch", metavar="ROOT", help="export each new iteration of this save root as training saves it")
    exp.add_argument("--save", required=True, help="output HF folder (created atomically); with --watch a parent "
                     "folder (-> SAVE/iter_XXXXXXX) or a pattern with {iteration} or {name}")
    exp.add_argument("--iteration", type=lambda s: s if s == "release" else int(s), help="iteration to export (default: the tracker's)")
    exp.add_argument("--hf-config", help="HF model folder or config.json; authoritative for the HF side")
    exp.add_argument("--tokenizer", help="local HF tokenizer folder to copy (default: args.tokenizer_model if local)")
    exp.add_argument("--vocab-size", type=int, help="true (unpadded) vocab size; wins over tokenizer and args, "
                     "must agree with --hf-config")
    exp.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp8", "mxfp4"],
                     help="output dtype (auto: training dtype; fp8: block-wise e4m3 linear weights, the rest bf16; "
                          "mxfp4: gpt-oss's experts as its hub release stores them, the rest bf16)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --save (with --watch: each iteration's target)")
    exp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where gathering happens (auto: NCCL on CUDA if available)")
    exp.add_argument("--window", default="256MiB", help="largest group rank 0 gathers at once; it holds about 3 (default 256MiB)")
    exp.add_argument("--writers", type=int, default=1, help="ranks that write safetensors files in parallel (default 1: rank 0)")
    exp.add_argument("--read-at", default="saver", choices=["saver", "writer"],
                     help="who reads a stored chunk: saver (default: the rank at its saver's position; each rank reads "
                          "its own shard) or writer (its unit's writer, which gathers nothing: every rank must see "
                          "every file, e.g. a shared file system)")
    exp.add_argument("--timeout", type=float, default=1800.0, help="distributed timeout in seconds")
    exp.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")
    exp.add_argument("--allow-nonfinite", action="store_true", help="export tensors holding NaN or Inf (default: an error naming them)")
    exp.add_argument("--dry-run", action="store_true", help="print the plan (reads per rank, output files) and stop")
    exp.add_argument("--report", help="also write the JSON run report to this file")
    exp.add_argument("--poll", type=float, help="with --watch: seconds between looks at the tracker (default 60)")
    exp.add_argument("--watch-timeout", type=float, help="with --watch: stop after this many seconds without a new iteration")
    exp.add_argument("--once", action="store_true", help="with --watch: export the current iteration if needed, then stop")

    ver = sub.add_parser("verify", help="compare an HF export's logits with megatron-core's on the checkpoint")
    ver.add_argument("--load", required=True, help="Megatron-LM save root, or one iter_XXXXXXX/release folder")
    ver.add_argument("--hf", required=True, help="the exported HF folder")
    ver.add_argument("--iteration", type=lambda s: s if s == "release" else int(s), help="iteration (default: the tracker's)")
    ver.add_argument("--sequences", type=int, default=4, help="how many random token sequences (default 4)")
    ver.add_argument("--length", type=int, default=32, help="tokens per sequence (default 32)")
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--tol", type=float, default=1e-3, help="largest allowed max |logit diff| (default 1e-3)")
    ver.add_argument("--window", default="256MiB", help="most bytes of an MoE layer's routed experts transformers' side "
                     "holds at once, in fp32 (at least one expert; default 256MiB)")
    ver.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where both models run: cpu (default), or cuda (the local rank's GPU under torchrun or srun)")
    ver.add_argument("--json", action="store_true", help="print the result as JSON")

    lay = sub.add_parser("layout", help="print the training's model-parallel size (TP x PP x EP), for launchers")
    lay.add_argument("load", help="Megatron-LM save root, or one iter_XXXXXXX/release folder")
    lay.add_argument("--nodes", type=int, default=1, help="print processes per node for this many nodes (rounded up)")
    lay.add_argument("--cpu", action="store_true", help="the processes run on CPUs: at most the checkpoint's writer "
                     "count in all, and this node's usable cores")
    _import_parsers(sub)
    exp.add_argument("--format", default="safetensors", choices=["safetensors", "torch"],
                     help="safetensors shards (default), or torch: one model.pt holding {model_state_dict, model_config}")
    ins = sub.add_parser("inspect", help="describe a Megatron checkpoint or an HF folder from its metadata (no torchrun)")
    ins.add_argument("ckpt", help="Megatron-LM save root, one iter_XXXXXXX/release folder, or a legacy .zip")
    ins.add_argument("--iteration", type=lambda s: s if s == "release" else int(s), help="iteration (default: the tracker's)")
    ins.add_argument("--json", action="store_true", help="print a JSON report")
    return parser


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="target TP (default 1)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="target PP (default 1)")
    p.add_argument("--expert-model-parallel-size", type=int, default=1, help="target EP (default 1)")
    p.add_argument("--expert-tensor-parallel-size", type=int, help="target expert TP (default: the target TP, as Megatron-LM)")
    p.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction, default=None,
                   help="experts chunked as megatron-core's GroupedMLP saves them, and args.moe_grouped_gemm set "
                   "(Megatron-LM's flag; import default: no, reshard default: the source's)")
    p.add_argument("--transformer-impl", choices=("transformer_engine", "local"), default=None,
                   help="the layer spec the target is saved as, and args.transformer_impl (Megatron-LM's flag; "
                   "import default: transformer_engine, as Megatron-LM; reshard default: the source's). "
                   "transformer_engine saves an MoE layer's pre-MLP norm as pre_mlp_layernorm.* and an empty "
                   "_extra_state per TE norm; multi-latent attention is written only this way")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--timeout", type=float, default=1800.0, help="distributed timeout in seconds")
    p.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")
    p.add_argument("--window", default="256MiB", help="bytes each rank reads ahead of its writer (default 256MiB)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (chunks, reads and writes per rank) and stop")
    p.add_argument("--report", help="also write the JSON run report to this file")


def _import_parsers(sub: argparse._SubParsersAction) -> None:
    from distconv.mindspore.flags import add_model_args

    imp = sub.add_parser("import", help="HF (or MindSpore Transformers) safetensors -> Megatron torch_dist checkpoint")
    imp.add_argument("--load", required=True, help="HF model folder; with --source mindspore: a MindFormers save root or iteration folder, or safetensors file/folder")
    imp.add_argument("--save", required=True, help="Megatron-LM save root to create (atomically)")
    imp.add_argument("--source", default="hf", choices=["hf", "mindspore"], help="what --load is (default hf)")
    imp.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="weights dtype (auto: the source's)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="vocab padding unit, times TP (Megatron-LM default 128)")
    imp.add_argument("--iteration", default="release", type=lambda s: s if s == "release" else int(s), help="iteration folder to write (default release)")
    _layout_args(imp)
    add_model_args(imp)
    res = sub.add_parser("reshard", help="Megatron torch_dist checkpoint -> the same at another TP/PP/EP/ETP")
    res.add_argument("--load", required=True, help="Megatron-LM save root, or one iter_XXXXXXX/release folder")
    res.add_argument("--save", required=True, help="Megatron-LM save root to create (atomically)")
    res.add_argument("--iteration", type=lambda s: s if s == "release" else int(s), help="iteration to read (default: the tracker's)")
    res.add_argument("--with-optimizer", action="store_true", help="also reshard optimizer state (not supported yet: an error)")
    _layout_args(res)


class Stopped(SystemExit):
    """SIGTERM (torchrun stopping the ranks after one failed, or ``scancel``): unwind and clean up."""


def _on_sigterm(signum, frame) -> None:
    raise Stopped("stopped by SIGTERM (another rank failed, or the job was cancelled)")


def _unraisable(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """``sys.unraisablehook`` while a command runs: a ``Stopped`` raised where Python swallows
    exceptions (the SIGTERM handler ran inside a finalizer or a weakref callback) is not printed as
    a traceback; the signal is sent again a moment later, to stop the run outside it."""
    import threading

    def handle(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Stopped):
            again = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
            again.daemon = True
            again.start()
        else:
            hook(unraisable)
    return handle


def _record(error: BaseException) -> None:
    """torchelastic's error file: torchrun shows this rank's message as the failure's cause."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors become one ``distconv: error:`` line from rank 0 and exit status 1.
    The options are parsed before torch is imported (``--help`` and bad flags stay light); the
    command then runs under torchelastic's ``record``, as torchrun's workers should."""
    opts = _parser().parse_args(argv)
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(opts)


def _main(opts: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # unwind, so that partial output is removed
    hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    try:
        try:
            return _dispatch(opts)
        finally:
            # the run is over: a SIGTERM now (torchrun stopping the ranks after one failed) must not
            # raise into the report, a finalizer or the interpreter's shutdown (a traceback)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (DistconvError, Stopped) as e:
        _record(e)
        if rank == 0:
            print(f"distconv: error: {e}", file=sys.stderr, flush=True)
        return 1
    except (RuntimeError, MemoryError) as e:  # out of memory; with other ranks: a peer died or the network failed
        _record(e)
        if rank == 0:
            print(f"distconv: error: {_runtime_error(e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        sys.unraisablehook = hook


def _runtime_error(e: BaseException) -> str:
    """What an error that is not distconv's own means: memory ran out, contact with another rank
    was lost (only where there are other ranks), or what it says."""
    import torch

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in first:
        return f"out of memory ({first})"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"lost contact with another rank ({first})"
    return f"{type(e).__name__}: {first}"


def export_keywords(opts: argparse.Namespace) -> dict[str, Any]:
    """``distconv.export``'s keywords from ``export``'s options; a plain and a watched export get the same."""
    return dict(
        iteration=opts.iteration, hf_config=opts.hf_config, tokenizer=opts.tokenizer, dtype=opts.dtype,
        max_shard_size=opts.max_shard_size, overwrite=opts.overwrite, device=opts.device, window=opts.window,
        writers=opts.writers, read_at=opts.read_at, timeout_s=opts.timeout, quiet=opts.quiet, dry_run=opts.dry_run, report=opts.report,
        format=opts.format, allow_nonfinite=opts.allow_nonfinite, vocab_size=opts.vocab_size,
    )


def _dispatch(opts: argparse.Namespace) -> int:
    if opts.command == "export" and opts.watch:
        from distconv.watch import watch

        poll = {} if opts.poll is None else {"poll_s": opts.poll}
        return 1 if watch(opts.watch, opts.save, idle_timeout_s=opts.watch_timeout, once=opts.once, **poll,
                          **export_keywords(opts)) else 0
    if opts.command == "export":
        from distconv.directions.export import export

        given = [flag for dest, flag in _WATCH_ONLY.items() if getattr(opts, dest) not in (None, False)]
        if given:
            raise DistconvError(f"{', '.join(given)}: only with --watch")
        export(opts.load, opts.save, **export_keywords(opts))
        return 0
    if opts.command == "verify":
        from distconv.verify import verify

        result = verify(opts.load, opts.hf, iteration=opts.iteration, sequences=opts.sequences,
                        length=opts.length, seed=opts.seed, tol=opts.tol, window=opts.window, device=opts.device)
        if opts.json:
            print(json.dumps(result))
        else:
            print(f"transformers vs megatron-core ({result['format']} checkpoint) on {result['tokens'][0]}x{result['tokens'][1]} tokens: "
                  f"max |diff| {result['max_abs_diff']:.3e}, mean {result['mean_abs_diff']:.3e}, top-1 agreement "
                  f"{result['top1_agreement']:.2%} -> {'OK' if result['ok'] else 'MISMATCH'} (tolerance {opts.tol:g})")
            first = result["first_mismatch"]
            if first:
                worst = next(layer["max_abs_diff"] for layer in result["layers"] if layer["megatron"] == first["megatron"])
                print(f"first layer beyond the tolerance: {first['megatron']} / {first['hf']} (max |diff| {worst:.3e})")
            elif result["embedding_max_abs_diff"] > opts.tol:
                print(f"the embeddings differ (max |diff| {result['embedding_max_abs_diff']:.3e})")
        return 0 if result["ok"] else 1
    if opts.command in ("import", "reshard"):
        from distconv.directions.import_ import import_hf, import_mindspore
        from distconv.directions.reshard import reshard

        options = dict(tp=opts.tensor_model_parallel_size, pp=opts.pipeline_model_parallel_size,
                       ep=opts.expert_model_parallel_size, etp=opts.expert_tensor_parallel_size,
                       moe_grouped_gemm=opts.moe_grouped_gemm, transformer_impl=opts.transformer_impl,
                       iteration=opts.iteration, overwrite=opts.overwrite,
                       timeout_s=opts.timeout, quiet=opts.quiet, dry_run=opts.dry_run, report=opts.report,
                       window=opts.window)
        if opts.command == "reshard":
            reshard(opts.load, opts.save, with_optimizer=opts.with_optimizer, **options)
        elif opts.source == "mindspore":
            import_mindspore(opts.load, opts.save, ms_config=opts.ms_config, ms_args=opts, dtype=opts.dtype,
                             divisible_by=opts.make_vocab_size_divisible_by, **options)
        else:
            import_hf(opts.load, opts.save, dtype=opts.dtype, divisible_by=opts.make_vocab_size_divisible_by, **options)
        return 0
    if opts.command == "inspect":
        from distconv.inspect import main_inspect

        return main_inspect(opts)
    if opts.command == "layout":
        from distconv.megatron.source import processes_per_node

        print(processes_per_node(opts.load, opts.nodes, opts.cpu))
        return 0
    return 2


def exit_process(code: int) -> NoReturn:
    """End the process with ``code``, the interpreter's last full garbage collection skipped
    (``gc.freeze``): the system frees the run's and the libraries' objects anyway, and that
    traversal of them took over a second after a 2 GB export. ``atexit`` handlers still run."""
    gc.freeze()
    sys.exit(code)


def main_entry() -> None:
    """Console-script entry point."""
    exit_process(main())
