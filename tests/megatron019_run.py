"""Write and check Megatron-LM checkpoints with megatron-core 0.19.2 itself, on CPU (gloo).

Run by ``.venv-m019``'s python (``tests/setup_megatron019.sh``), never the project's: it imports
only torch and megatron-core 0.19.2 (whose wheel ships ``megatron.training`` too), nothing of
distconv.

    torchrun --nproc-per-node 4 tests/megatron019_run.py build OUT
    torchrun --nproc-per-node 4 tests/megatron019_run.py check JOBS.json RESULTS.json

``build``: for every model of ``FIXTURES`` the args come from Megatron-LM 0.19.2's own
``parse_args`` + ``validate_args`` on a training command line, the model from those args as
``gpt_builders.gpt_builder`` builds it (``core_transformer_config_from_args``, the
transformer-engine layer spec, Megatron-LM's default). It is built at TP1 PP1 EP1 with seeded
random weights, megatron-core's own logits on fixed tokens are recorded (``OUT/refs/NAME.pt``,
fp32), the weights are moved to the fixture's layout through ``dist_checkpointing`` and saved
there by Megatron-LM 0.19.2's ``megatron.training.checkpointing.save_checkpoint``: a save root
``OUT/NAME`` with the tracker file, ``iter_0000100/`` and no ``common.pt`` (args, iteration, RNG and
rerun state are the ``common_state`` object inside DCP). No optimizer state: a megatron-core
optimizer cannot be built on CPU, so these runs are saved as with ``--no-save-optim``.

``check``: for each job, the proof that a checkpoint (written by distconv) is one megatron-core
0.19.2 takes: its args are read with 0.19.2's ``load_common_state_dict``, the model is built at the
args' layout and (1) the chunks its ``sharded_state_dict`` saves (main replicas, all ranks) must
equal the stored ones, (2) ``dist_checkpointing.load`` is tried as a job without and as one with
``--ckpt-drop-redundant-extra-state`` requests it (``strict_load``), (3) at TP1 PP1 EP1 the model,
loaded as the checkpoint's own args say, computes the logits of the given tokens.

What 0.19.2 needs on a machine without CUDA or transformer-engine is replaced only while
``cpu_stand_ins`` is active (see there).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # validate_args asks for it with TP > 1, as Megatron-LM's launchers set it

TOKENS_SHAPE = (2, 12)
VOCAB = 250  # NullTokenizer's vocab_size (Megatron-LM pads it to a multiple of 128 x TP)
ITERATION = 100
COMMON = ["--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
          "--seq-length", "32", "--max-position-embeddings", "128", "--position-embedding-type", "rope",
          "--rotary-base", "10000", "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu",
          "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0.0",
          "--hidden-dropout", "0.0", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "1000",
          "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine", "--tokenizer-type", "NullTokenizer",
          "--vocab-size", str(VOCAB), "--ckpt-format", "torch_dist", "--save-interval", str(ITERATION),
          "--transformer-impl", "transformer_engine", "--use-cpu-initialization", "--no-gradient-accumulation-fusion",
          "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
          "--no-persist-layer-norm", "--no-save-optim"]


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One training run's checkpoint: Megatron-LM flags, the layout it is saved at, a seed."""

    flags: tuple[str, ...]
    tp: int = 1
    pp: int = 1
    ep: int = 1
    seed: int = 0
    bf16: bool = False  # --bf16 (weights chosen exactly representable in bf16)
    drop_extra_state: bool = False  # --ckpt-drop-redundant-extra-state (Megatron-LM #5552)


FIXTURES: dict[str, Fixture] = {
    # Llama-like: GQA, SwiGLU, RMSNorm, RoPE, untied embeddings; TP2 x DP2
    "dense_tp2": Fixture(("--num-layers", "4", "--ffn-hidden-size", "128"), tp=2, seed=31),
    # Mixtral-like: 4 experts, top-2, every layer MoE; EP2 x DP2 (expert DP 2)
    "moe_ep2": Fixture(("--num-layers", "2", "--ffn-hidden-size", "128", "--num-experts", "4", "--moe-router-topk", "2",
                        "--moe-ffn-hidden-size", "32", "--moe-token-dispatcher-type", "allgather",
                        "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.0"),
                       ep=2, seed=32),
    # the dense model at TP2 x PP2, bf16, saved with the redundant TE _extra_state dropped
    "dense_dropped": Fixture(("--num-layers", "4", "--ffn-hidden-size", "128"), tp=2, pp=2, seed=33, bf16=True,
                             drop_extra_state=True),
}


# ---- what megatron-core 0.19.2 needs on a CPU without transformer-engine -----------------------

Change = tuple[Any, str, Any]


@contextlib.contextmanager
def stand_ins(changes: list[Change]) -> Iterator[None]:
    """Set each attribute while active; put each back (or remove it) on exit."""
    saved = [(obj, name, name in vars(obj), vars(obj).get(name)) for obj, name, _ in changes]
    for obj, name, value in changes:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, had, value in reversed(saved):
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


class _ExtraState:
    """The ``_extra_state`` transformer-engine's modules save (empty without FP8: ``None`` here)."""

    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state: Any) -> None:
        """Ignored, as megatron-core's local linears ignore theirs."""


class _RMSNorm(_ExtraState, torch.nn.RMSNorm):
    pass


class _LayerNorm(_ExtraState, torch.nn.LayerNorm):
    pass


class TENorm:
    """``TENorm``'s stand-in: a torch norm with TE's parameter names and its ``_extra_state``."""

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:
        norm = _LayerNorm if config.normalization == "LayerNorm" else _RMSNorm
        return norm(hidden_size, eps=eps)


def _layer_norm_linear() -> type:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        """``TELayerNormColumnParallelLinear``'s stand-in: the norm before a column-parallel linear,
        its weight the linear's own ``layer_norm_weight``, replicated across TP (as TE saves it)."""

        def __init__(self, input_size: int, output_size: int, *, config: Any, init_method: Any, **kwargs: Any) -> None:
            kwargs.pop("tp_comm_buffer_name", None)
            super().__init__(input_size, output_size, config=config, init_method=init_method, **kwargs)
            self.normalization, self.eps = config.normalization, config.layernorm_epsilon
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            if self.normalization == "LayerNorm":
                self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype))

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
            if self.normalization == "LayerNorm":
                x = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
            else:
                x = F.rms_norm(x, x.shape[-1:], self.layer_norm_weight, self.eps)
            return super().forward(x, *args, **kwargs)

    return LayerNormColumnParallelLinear


def _spec_provider() -> type:
    """``TESpecProvider``'s stand-in: megatron-core's local modules, saved under TE's names."""
    from functools import partial

    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    fused = _layer_norm_linear()

    class TESpecProvider(LocalSpecProvider):
        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self) -> type:
            return fused

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False) -> type:
            return TENorm

        def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
            if moe_use_grouped_gemm:
                raise NotImplementedError("grouped GEMM: no stand-in for TEGroupedMLP")
            return partial(SequentialMLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                   linear_fc2=RowParallelLinear))

    return TESpecProvider


@contextlib.contextmanager
def cpu_stand_ins() -> Iterator[None]:
    """While active: megatron-core 0.19.2 and its training code on a CPU without transformer-engine.

    - ``torch.cuda.synchronize`` a no-op, ``current_device`` "cpu", ``Tensor.cuda`` the tensor
      itself, ``get_rng_state`` the CPU generator's state (dist_checkpointing's save/load steps,
      rotary embedding, masks, the RNG state a training save records);
    - the CUDA RNG tracker's ``fork`` a null context (no dropout here);
    - ``get_device_arch_version`` 9 (validate_args asks the GPU's architecture);
    - inside the training loader's ``read_metadata``, ``torch.tensor(..., device="cuda")`` on the CPU
      (it all-reduces the tracker's iteration over the ranks);
    - the transformer-engine spec's ``TESpecProvider`` and ``TENorm`` the stand-ins above, also as
      the final norm of a block built from one layer spec (``transformer_block.LayerNormImpl``,
      TENorm when transformer-engine is installed).
    """
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import transformer_block
    from megatron.training import arguments, checkpointing

    tensor, read_metadata = torch.tensor, checkpointing.read_metadata

    def cpu_tensor(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return tensor(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)

    def read_metadata_on_cpu(tracker_filename: str) -> Any:
        with stand_ins([(torch, "tensor", cpu_tensor)]):
            return read_metadata(tracker_filename)

    changes: list[Change] = [
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (torch.Tensor, "cuda", lambda self, *a, **k: self),
        (tensor_parallel.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext()),
        (arguments, "get_device_arch_version", lambda: 9),
        (checkpointing, "read_metadata", read_metadata_on_cpu),
        (gpt_layer_specs, "TESpecProvider", _spec_provider()),
        (gpt_layer_specs, "TENorm", TENorm),
        (transformer_block, "LayerNormImpl", TENorm),
    ]
    with stand_ins(changes):
        yield


# ---- args and model, as Megatron-LM 0.19.2 makes them --------------------------------------

def training_args(fx: Fixture, layout: list[str], save: Path | None = None, load: Path | None = None) -> argparse.Namespace:
    """Megatron-LM 0.19.2's args for a run of ``fx`` (``parse_args``, then with ``load`` what
    ``--use-checkpoint-args --use-mp-args-from-checkpoint-args`` takes from that checkpoint through
    0.19.2's own reader, ``validate_args``, and the tokenizer's padded vocab), as ``pretrain`` makes them."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.checkpointing import load_args_from_checkpoint

    argv = [*COMMON, *fx.flags, *layout, "--seed", str(fx.seed)]
    if fx.bf16:
        argv.append("--bf16")
    if save is not None:
        argv += ["--save", str(save)]
    if load is not None:
        argv += ["--load", str(load), "--use-checkpoint-args", "--use-mp-args-from-checkpoint-args"]
    saved_argv = sys.argv
    sys.argv = ["pretrain_gpt.py", *argv]
    try:
        args = parse_args()
    finally:
        sys.argv = saved_argv
    if load is not None:
        load_args_from_checkpoint(args)
    validate_args(args)
    build_tokenizer(args)  # as set_global_variables does: sets args.padded_vocab_size
    if fx.drop_extra_state:  # the flag of Megatron-LM #5552, newer than the 0.19 release's parser
        args.ckpt_drop_redundant_extra_state = True
    return args


def layout_flags(tp: int, pp: int, ep: int = 1, etp: int | None = None) -> list[str]:
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--expert-model-parallel-size", str(ep)]
    return flags + (["--expert-tensor-parallel-size", str(etp)] if etp is not None else [])


def build_model(args: argparse.Namespace):
    """The GPTModel ``gpt_builders.gpt_builder`` builds from these args (this rank's stage)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.training.arguments import core_transformer_config_from_args

    config = core_transformer_config_from_args(args)
    use_te = args.transformer_impl == "transformer_engine"
    if args.num_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=args.normalization)
    elif use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(config.num_moe_experts, config.moe_grouped_gemm,
                                                          config.qk_layernorm, config.multi_latent_attention)
    else:
        spec = get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm,
                                        config.multi_latent_attention, normalization=config.normalization)
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(), parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
    )
    return model.to(config.params_dtype)


def model_sharded_state_dict(model) -> dict:
    from megatron.core import parallel_state

    return model.sharded_state_dict(metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})


@contextlib.contextmanager
def model_parallel(tp: int, pp: int, ep: int = 1, etp: int | None = None) -> Iterator[None]:
    """megatron-core's parallel state at TP x PP x EP (x ETP) for the block; its groups destroyed after."""
    from megatron.core import parallel_state

    made: list = []
    original = dist.new_group

    def recording(*args: Any, **kwargs: Any):
        group = original(*args, **kwargs)
        made.append(group)
        return group

    parallel_state.destroy_model_parallel()
    dist.new_group = recording
    try:
        parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    finally:
        dist.new_group = original
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        for group in {id(g): g for g in made}.values():
            if group is None or group == dist.GroupMember.NON_GROUP_MEMBER or group == dist.GroupMember.WORLD:
                continue
            try:
                dist.destroy_process_group(group)
            except ValueError:
                pass


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, bf16_exact: bool) -> None:
    """Distinct random values for every parameter; norms around 1 (not 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        else:
            value = 0.05 * torch.randn(p.shape, generator=gen)
        if bf16_exact:
            value = value.to(torch.bfloat16).float()
        p.copy_(value)


@torch.no_grad()
def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """megatron-core's forward on CPU (one stage holding the whole model): [batch, seq, padded vocab]."""
    model.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    return model(tokens, position_ids, mask).float()


# ---- --ckpt-drop-redundant-extra-state ------------------------------------------------------

def localize_redundant_extra_states(state_dict: dict) -> None:
    """What Megatron-LM #5552 does to the state dict of a run with ``--ckpt-drop-redundant-extra-state``
    (in ``generate_state_dict``, for the save and for the load request alike): every ``_extra_state``
    ShardedObject whose payload holds no delayed-scaling FP8 state (``None``, an empty tensor, a
    recipe-only blob) becomes a ``LocalNonpersistentObject``, which is neither saved nor requested."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    markers = (b"amax_history_fwd", b"scale_fwd", b"scale_bwd")

    def persistent(data: Any) -> bool:
        if data is None:
            return False
        if isinstance(data, torch.Tensor):
            return data.numel() > 0 and any(m in data.detach().cpu().contiguous().numpy().tobytes() for m in markers)
        return True

    def localize(value: Any) -> Any:
        if isinstance(value, ShardedObject) and value.key.endswith("_extra_state") and not persistent(value.data):
            return LocalNonpersistentObject(value.data)
        return value

    dict_list_map_inplace(localize, state_dict)


@contextlib.contextmanager
def dropping_redundant_extra_state(on: bool) -> Iterator[None]:
    """0.19.2's ``generate_state_dict`` followed by #5552's step, for a run with the flag."""
    from megatron.training import checkpointing

    original = checkpointing.generate_state_dict

    def generate(args: argparse.Namespace, *a: Any, **k: Any) -> dict:
        state = original(args, *a, **k)
        if args.ckpt_format == "torch_dist" and getattr(args, "ckpt_drop_redundant_extra_state", False):
            localize_redundant_extra_states(state)
        return state

    with stand_ins([(checkpointing, "generate_state_dict", generate)] if on else []):
        yield


# ---- build ------------------------------------------------------------------------------------

def build(out: Path) -> None:
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.training import checkpointing, global_vars

    rank = dist.get_rank()
    for name, fx in FIXTURES.items():
        if rank == 0:
            print(f"building {name} at TP{fx.tp} PP{fx.pp} EP{fx.ep} with megatron-core 0.19.2", flush=True)
        scratch = out / "_reference" / name
        with model_parallel(1, 1):
            tensor_parallel.model_parallel_cuda_manual_seed(fx.seed)
            args = training_args(fx, layout_flags(1, 1))
            model = build_model(args)
            randomize_(model, fx.seed, fx.bf16)
            if rank == 0:
                gen = torch.Generator().manual_seed(fx.seed + 7)
                tokens = torch.randint(0, VOCAB, TOKENS_SHAPE, generator=gen)
                logits = forward_logits(model.float(), tokens)
                (out / "refs").mkdir(parents=True, exist_ok=True)
                torch.save({"tokens": tokens, "logits": logits}, out / "refs" / f"{name}.pt")
            model = model.to(args.params_dtype)
            if rank == 0:
                scratch.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            dist_checkpointing.save({"model": model_sharded_state_dict(model)}, str(scratch))
        with model_parallel(fx.tp, fx.pp, fx.ep):
            tensor_parallel.model_parallel_cuda_manual_seed(fx.seed)
            args = training_args(fx, layout_flags(fx.tp, fx.pp, fx.ep), save=out / name)
            model = build_model(args)
            loaded = dist_checkpointing.load({"model": model_sharded_state_dict(model)}, str(scratch))
            model.load_state_dict(loaded["model"])
            global_vars.set_args(args)
            try:
                with dropping_redundant_extra_state(fx.drop_extra_state):
                    checkpointing.save_checkpoint(ITERATION, [model], None, None, 0)
            finally:
                global_vars.unset_global_variables()
        dist.barrier()


# ---- check ------------------------------------------------------------------------------------

def stored_chunks(folder: Path) -> set:
    """(key, offsets, sizes) of every tensor chunk the checkpoint's DCP metadata lists (model only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    return {(key, tuple(c.offsets), tuple(c.sizes)) for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and not key.startswith(("optimizer.", "rng_state"))
            for c in md.chunks}


def model_chunks(model) -> set:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model_sharded_state_dict(model)
    apply_factories(sd)
    return {(x.key, tuple(x.global_offset), (1,) * x.prepend_axis_num + tuple(x.local_shape))
            for x in nested_values(sd) if isinstance(x, ShardedTensor)
            and all(r == 0 for r in (x.replica_id if isinstance(x.replica_id, tuple) else (x.replica_id,)))}


NON_MODEL = ("rng_state", "optimizer.", "rerun_state_machine", "common_state")  # what a model-only request leaves


def strict_load(model, folder: Path, drop_extra_state: bool) -> None:
    """Load ``folder`` into ``model`` as a job without (with) ``--ckpt-drop-redundant-extra-state``
    requests its model: every ``_extra_state`` (none of the redundant ones). Strict as ``RAISE_ALL``
    over the model: every requested key must be stored, and every stored model key requested, except
    (with the flag) the ``_extra_state`` a checkpoint holds beyond the request, which such a job
    never reads. Raises ``CheckpointingException`` naming the keys otherwise."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    request = {"model": model_sharded_state_dict(model)}
    if drop_extra_state:
        localize_redundant_extra_states(request)
    loaded, missing, unexpected = dist_checkpointing.load(request, str(folder), strict=StrictHandling.RETURN_ALL)
    unread = {k for k in missing if not k.startswith(NON_MODEL) and not (drop_extra_state and k.endswith("_extra_state"))}
    if unexpected or unread:
        raise CheckpointingException(f"requested but not stored: {sorted(unexpected)[:10]}; stored but not requested: "
                                     f"{sorted(unread)[:10]}")
    model.load_state_dict(loaded["model"])


def check(root: str, fixture: str, tokens: list, logits_out: str) -> dict:
    """Resume ``fixture``'s run from ``root`` as Megatron-LM 0.19.2 would (its args, model and layout
    from the checkpoint's args); see the module's docstring for what is recorded."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    text = (Path(root) / "latest_checkpointed_iteration.txt").read_text().strip()
    folder = Path(root) / ("release" if text == "release" else f"iter_{int(text):07d}")
    stored_args = load_common_state_dict(str(folder))["args"]
    etp = getattr(stored_args, "expert_tensor_parallel_size", None)  # not among the args --use-checkpoint-args takes
    args = training_args(FIXTURES[fixture], layout_flags(1, 1, 1, etp), load=Path(root))
    args.transformer_impl = getattr(stored_args, "transformer_impl", args.transformer_impl)
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    result: dict[str, Any] = {"args_tp": tp, "args_pp": pp, "args_ep": ep, "args_etp": args.expert_tensor_parallel_size,
                              "args_impl": args.transformer_impl, "common_pt": (folder / "common.pt").exists()}
    with model_parallel(tp, pp, ep, etp):
        model = build_model(args)
        chunks = [None] * dist.get_world_size()
        dist.all_gather_object(chunks, model_chunks(model))
        expected, stored = set().union(*chunks), stored_chunks(folder)
        result.update(layout_equal=expected == stored, only_ckpt=sorted(stored - expected)[:5],
                      only_model=sorted(expected - stored)[:5])
        for drop in (False, True):
            try:
                strict_load(model, folder, drop)
                result[f"strict_load{'_dropping' if drop else ''}"] = "ok"
            except Exception as e:  # the test names what megatron-core said
                result[f"strict_load{'_dropping' if drop else ''}"] = f"{type(e).__name__}: {str(e)[:2000]}"
    single = argparse.Namespace(**{**vars(args), "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                                   "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1})
    with model_parallel(1, 1):
        model = build_model(single)
        strict_load(model, folder, bool(getattr(stored_args, "ckpt_drop_redundant_extra_state", False)))
        if dist.get_rank() == 0:
            torch.save(forward_logits(model.float(), torch.tensor(tokens)), logits_out)
    return result


def main() -> None:
    mode = sys.argv[1]
    dist.init_process_group("gloo")
    with cpu_stand_ins():
        if mode == "build":
            build(Path(sys.argv[2]))
        elif mode == "check":
            results = []
            for job in json.loads(Path(sys.argv[2]).read_text()):
                try:
                    results.append({"ok": True, "report": check(**job)})
                except Exception as e:  # one job's failure is that job's result
                    import traceback

                    results.append({"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"})
                dist.barrier()
            if dist.get_rank() == 0:
                Path(sys.argv[3]).write_text(json.dumps(results, indent=1, default=str))
        else:
            raise SystemExit(f"unknown mode {mode!r}: build or check")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
