"""Import: HF safetensors (or MindSpore Transformers safetensors) -> Megatron torch_dist.

The family tables run in reverse (``Transform.import_``; a rule's first Megatron spelling is
the canonical name). Each rank owns some chunks of the target layout (``distconv.layout``),
reads only the rows and columns of the HF tensors those chunks come from
(``safe_open(...).get_slice``), and all ranks write them together with megatron-core's
``dist_checkpointing.save``. Any world size works; the chunks of target rank ``r`` go to rank
``r % world``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from distconv.errors import DistconvError
from distconv.families import FAMILIES, Family
from distconv.families.base import Rule
from distconv.fp8 import SCALE, check_scale, dequantize
from distconv.gather import Comm
from distconv.layout import ExtraState, Shard, check_layout, extra_states, padded_vocab, shards_of
from distconv.megatron_write import MegatronRoot, extra_state_object, save_and_commit, sharded_tensor
from distconv.spec import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Source(Protocol):
    """HF-named tensors that can be read a box at a time."""

    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor: ...


class SafetensorsFiles:
    """Tensors of one ``.safetensors`` file or a folder of them, opened lazily, read by slice."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.glob("*.safetensors"))
        else:
            raise DistconvError(f"--load {path}: no such file or directory")
        if not files:
            raise DistconvError(f"--load {path} holds no .safetensors files")
        self.where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        for f in files:
            for name in self._handle(f).keys():
                if name in self.where:
                    raise DistconvError(f"tensor {name} is in both {self.where[name].name} and {f.name}")
                self.where[name] = f

    def _handle(self, file: Path) -> Any:
        from safetensors import safe_open

        if file not in self._open:
            try:
                self._open[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise DistconvError(f"{file} is not a readable safetensors file: {e}") from None
        return self._open[file]

    def names(self) -> list[str]:
        return list(self.where)

    def _slice(self, name: str) -> Any:
        return self._handle(self.where[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def code(self, name: str) -> str:
        """The safetensors dtype code of ``name`` (``BF16``, ``F8_E4M3``, ...)."""
        return self._slice(name).get_dtype()

    def dtype(self, name: str) -> torch.dtype:
        code = self.code(name)
        if code not in _ST_DTYPES:
            raise DistconvError(f"tensor {name} has dtype {code}; import reads floating-point weights only")
        return _ST_DTYPES[code]

    def read(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        return self._slice(name)[box]


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
            raise DistconvError(f"quantization_config {quantization!r}: import reads block-wise FP8 only "
                                "(quant_method fp8, fmt e4m3, weight_block_size [rows, cols])")
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
        return dequantize(q, scale, r0, c0, self.block)


@dataclasses.dataclass(frozen=True)
class Item:
    """One Megatron tensor (per layer) and the HF tensors it is made of."""

    name: str
    hf: tuple[str, ...]
    rule: Rule
    shape: tuple[int, ...]


def expected_hf_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """The state dict transformers expects for ``config`` (tied aliases left out), from a meta model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if getattr(config, "tie_word_embeddings", False):
        aliases |= set(getattr(model, "all_tied_weights_keys", None) or {})
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in aliases}


def _items(family: Family, spec: ModelSpec, source: Source, expected: dict[str, tuple[int, ...]]) -> list[Item]:
    """Every Megatron tensor of the model, checked against what the source holds."""
    have = set(source.names())
    missing = sorted(set(expected) - have)
    if missing:
        raise DistconvError(f"the source lacks tensors the {family.architecture} model needs: {', '.join(missing[:8])}"
                            f"{' ...' if len(missing) > 8 else ''}")
    wrong = sorted(n for n in expected if source.shape(n) != expected[n])
    if wrong:
        raise DistconvError("shape mismatch with the config: " + ", ".join(f"{n} {source.shape(n)} vs {expected[n]}" for n in wrong[:8]))
    items, used = [], set()
    for rule in family.rules:
        layers = range(spec.num_layers) if "{layer}" in rule.megatron_names[0] else (None,)
        for layer in layers:
            fmt = {"layer": layer} if layer is not None else {}
            hf = tuple(h.format(**fmt) for h in rule.hf_names)
            if not any(h in expected for h in hf):
                continue
            if not all(h in expected for h in hf):
                raise DistconvError(f"internal: {family.architecture} expects only some of {', '.join(hf)}")
            metas = tuple(torch.empty(expected[h], device="meta") for h in hf)
            out = rule.transform.import_(metas, spec)
            if any(tuple(out.shape[1:]) != tuple(m.shape[1:]) for m in metas):
                raise DistconvError(f"internal: the {rule.megatron_names[0]} transform is not row-wise; import cannot slice it")
            items.append(Item(rule.megatron_names[0].format(**fmt), hf, rule, tuple(out.shape)))
            used.update(hf)
    unused = sorted(have - used)
    tied_extra = {"lm_head.weight"} if spec.tie_embeddings else set()
    unused = [n for n in unused if n not in tied_extra]
    if unused:
        raise DistconvError(f"the source has tensors the {family.architecture} mapping does not use: "
                            f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}")
    return items


def read_shard(source: Source, item: Item, shard: Shard, spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """Read one chunk: only the HF rows (and columns) it is made of.

    Running the transform on row numbers tells which row of which HF tensor each Megatron row
    comes from (0 marks vocab padding, which stays zero).
    """
    rows_in = [source.shape(h)[0] for h in item.hf]
    base = max(rows_in) + 1
    codes = tuple(torch.arange(n, dtype=torch.int64) + (i + 1) * base for i, n in enumerate(rows_in))
    rowmap = item.rule.transform.import_(codes, spec)[shard.box[0]]
    out = torch.zeros(shard.sizes, dtype=dtype)
    for i, name in enumerate(item.hf):
        sel = rowmap // base == i + 1
        if not bool(sel.any()):
            continue
        rows = rowmap[sel] % base
        lo, hi = int(rows.min()), int(rows.max()) + 1
        data = source.read(name, (slice(lo, hi),) + shard.box[1:]).to(dtype)
        out[sel] = data[rows - lo]
    return out


def megatron_args(spec: ModelSpec, tp: int, pp: int, ep: int, divisible_by: int, tokenizer: str | None) -> argparse.Namespace:
    """Megatron-LM 0.16 training args describing ``spec`` (what ``spec_from_args`` reads back)."""
    rope = spec.rope_scaling or {}
    base = spec.rotary_base
    return argparse.Namespace(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, kv_channels=spec.head_dim,
        group_query_attention=spec.num_query_groups != spec.num_attention_heads, num_query_groups=spec.num_query_groups,
        max_position_embeddings=spec.max_position_embeddings, seq_length=spec.max_position_embeddings,
        position_embedding_type=spec.position_embedding, rotary_base=int(base) if base == int(base) else base,
        rotary_percent=spec.rotary_percent, rotary_interleaved=spec.rotary_interleaved,
        rotary_seq_len_interpolation_factor=rope.get("factor") if rope.get("rope_type") == "linear" else None,
        use_rope_scaling=rope.get("rope_type") == "llama3", rope_scaling_factor=rope.get("factor", 8.0),
        normalization=spec.normalization, layernorm_epsilon=spec.norm_epsilon,
        layernorm_zero_centered_gamma=spec.zero_centered_gamma, swiglu=spec.gated_mlp, squared_relu=False,
        openai_gelu=False, bias_gelu_fusion=False, add_bias_linear=spec.add_bias_linear, add_qkv_bias=spec.add_qkv_bias,
        qk_layernorm=spec.qk_layernorm, untie_embeddings_and_output_weights=not spec.tie_embeddings,
        vocab_size=spec.vocab_size, padded_vocab_size=spec.padded_vocab_size, make_vocab_size_divisible_by=divisible_by,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer,
        window_size=spec.window_size, num_experts=None, multi_latent_attention=False,
        bf16=spec.train_dtype == torch.bfloat16, fp16=spec.train_dtype == torch.float16, params_dtype=spec.train_dtype,
        init_method_std=spec.init_std, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, world_size=tp * pp, data_parallel_size=1, ckpt_format="torch_dist",
        transformer_impl="transformer_engine",
    )


def family_for(config: Any) -> Family:
    arch = (getattr(config, "architectures", None) or [None])[0]
    by_name = {f.architecture: f for f in FAMILIES}
    if arch not in by_name:
        raise DistconvError(f"unsupported HF architecture {arch}; supported: {', '.join(sorted(by_name))}")
    return by_name[arch]


@dataclasses.dataclass
class ImportJob:
    """Everything every rank decides identically before reading."""

    family: Family
    spec: ModelSpec
    items: list[Item]
    shards: list[Shard]
    extras: list[ExtraState]
    args: argparse.Namespace


def plan_import(source: Source, config: Any, tp: int, pp: int, ep: int, dtype: str, divisible_by: int,
                tokenizer: str | None) -> ImportJob:
    family = family_for(config)
    if dtype == "auto":
        dtypes = {source.dtype(n) for n in source.names()}
        if len(dtypes) != 1:
            raise DistconvError(f"the source mixes dtypes {sorted(map(str, dtypes))}; pass --dtype")
        target = dtypes.pop()
    elif dtype in DTYPES:
        target = DTYPES[dtype]
    else:
        raise DistconvError(f"--dtype {dtype}: choose auto, bf16, fp16 or fp32")
    if ep != 1:
        raise DistconvError(f"--expert-model-parallel-size {ep}: the {family.architecture} model has no experts; use 1")
    spec = family.spec_from_hf_config(config, padded_vocab(int(config.vocab_size), divisible_by, tp), target)
    check_layout(spec, tp, pp)
    items = _items(family, spec, source, expected_hf_tensors(config))
    shards = [s for item in items for s in shards_of(item.name, item.shape, spec, tp, pp)]
    return ImportJob(family, spec, items, shards, extra_states(spec, tp, pp), megatron_args(spec, tp, pp, ep, divisible_by, tokenizer))


def write_megatron(comm: Comm, job: ImportJob, source: Source, save: str | Path, iteration: int | str,
                   overwrite: bool, protect: tuple[str | Path | None, ...]) -> int:
    """Collective: read this rank's chunks, save all ranks' together; returns bytes this rank read."""
    root, error, state, nbytes = None, None, {}, 0
    try:
        root = MegatronRoot(comm, save, overwrite, protect)
        by_name = {i.name: i for i in job.items}
        for n, shard in enumerate(job.shards):
            if shard.target_rank % comm.world == comm.rank:
                data = read_shard(source, by_name[shard.name], shard, job.spec, job.spec.train_dtype)
                nbytes += data.numel() * data.element_size()
                state[f"t{n}"] = sharded_tensor(shard, data)
        for n, extra in enumerate(job.extras):
            if extra.target_rank % comm.world == comm.rank:
                state[f"x{n}"] = extra_state_object(extra)
    except Exception as e:
        error = e
    comm.agree(error)
    common = {"args": job.args, "checkpoint_version": 3.0, "iteration": 0 if iteration == "release" else int(iteration),
              "num_floating_point_operations_so_far": 0}
    save_and_commit(comm, root, state, common, iteration)
    return nbytes


def hf_source(load: str | Path) -> tuple[Source, Any, str | None]:
    """An HF model folder: its tensors, its config, and itself as tokenizer if it holds one."""
    from transformers import AutoConfig

    path = Path(load)
    if not (path / "config.json").exists():
        raise DistconvError(f"--load {path} is not an HF model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise DistconvError(f"--load {path}: cannot read config.json: {e}") from None
    tokenizer = str(path.absolute()) if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")) else None
    files = SafetensorsFiles(path)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
        return DequantizedFP8(files, quantization), config, tokenizer
    return files, config, tokenizer


def run_import(comm: Comm, source: Source, config: Any, save: str | Path, *, tp: int, pp: int, ep: int, dtype: str,
               divisible_by: int, iteration: int | str, overwrite: bool, tokenizer: str | None, quiet: bool,
               what: str, protect: tuple[str | Path | None, ...]) -> dict[str, Any]:
    """Collective: plan and write an import; ``protect`` are the inputs ``save`` must stay clear of."""
    start = time.perf_counter()
    job, error = None, None
    try:
        job = plan_import(source, config, tp, pp, ep, dtype, divisible_by, tokenizer)
    except Exception as e:
        error = e
    comm.agree(error)
    assert job is not None
    if comm.rank == 0 and not quiet:
        s = job.spec
        print(f"import      {what} as {job.family.architecture}: {s.num_layers} layers, hidden {s.hidden_size}, "
              f"heads {s.num_attention_heads}/{s.num_query_groups}, vocab {s.vocab_size} padded to {s.padded_vocab_size}\n"
              f"layout      TP{tp} PP{pp}, {len(job.shards)} chunks of {str(s.train_dtype).removeprefix('torch.')} "
              f"written by {comm.world} rank(s)", flush=True)
    nbytes = write_megatron(comm, job, source, save, iteration, overwrite, protect)
    seconds = time.perf_counter() - start
    if comm.rank == 0 and not quiet:
        print(f"wrote Megatron torch_dist TP{tp} PP{pp} to {Path(save).resolve()} in {seconds:.1f} s", flush=True)
    return {"architecture": job.family.architecture, "save": str(Path(save).resolve()), "chunks": len(job.shards),
            "bytes_read": nbytes, "seconds": seconds, "padded_vocab_size": job.spec.padded_vocab_size}


def import_hf(load: str | Path, save: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, dtype: str = "auto",
              divisible_by: int = 128, iteration: int | str = "release", overwrite: bool = False,
              timeout_s: float = 1800.0, quiet: bool = False) -> dict[str, Any]:
    """HF folder -> Megatron torch_dist save root at TP x PP; collective over all ranks."""
    comm = Comm.setup("cpu", timeout_s)
    try:
        source, config, error = None, None, None
        tokenizer = None
        try:
            source, config, tokenizer = hf_source(load)
        except Exception as e:
            error = e
        comm.agree(error)
        return run_import(comm, source, config, save, tp=tp, pp=pp, ep=ep, dtype=dtype, divisible_by=divisible_by,
                          iteration=iteration, overwrite=overwrite, tokenizer=tokenizer, quiet=quiet, what=str(load),
                          protect=(load,))
    finally:
        comm.close()


def main_import(opts: Any) -> int:
    """CLI entry for ``distconv import``."""
    common = dict(tp=opts.tensor_model_parallel_size, pp=opts.pipeline_model_parallel_size,
                  ep=opts.expert_model_parallel_size, dtype=opts.dtype, divisible_by=opts.make_vocab_size_divisible_by,
                  iteration=opts.iteration, overwrite=opts.overwrite, timeout_s=opts.timeout, quiet=opts.quiet)
    if opts.source == "mindspore":
        from distconv.mindspore import import_mindspore

        import_mindspore(opts.load, opts.save, ms_config=opts.ms_config, ms_args=opts, **common)
    else:
        import_hf(opts.load, opts.save, **common)
    return 0
