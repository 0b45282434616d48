"""Build and run megatron-core's own ``GPTModel`` from a checkpoint's Megatron-LM args (read by the
args table, ``megatron.args``).

``distconv verify`` compares an export against this model, and the test fixtures are built
with it. The model is built from megatron-core's local layer specs (no transformer-engine; the
tests build models from its transformer-engine spec too, with stand-in modules); gated delta net
models, which megatron-core builds from its transformer-engine spec only, from that spec with the
stand-ins of ``distconv.megatron.gated_delta_net``, DSA models (DeepSeek-V3.2, GLM-5) from its DSA
attention spec with those of ``distconv.megatron.dsa``, and hybrid models (Nemotron-H) as megatron-core's
``MambaModel`` with those of ``distconv.megatron.mamba``, active only while the model is built or run.
megatron-core 0.16 makes a few CUDA calls unconditionally; ``cpu_compat`` makes exactly those
harmless on a machine without CUDA, only while it is active, and restores them on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from typing import Any, Iterator

import torch

from distconv.megatron import dsa, gated_delta_net, mamba
from distconv.megatron.args import DSA, GATED_DELTA_NET, arg, config_fields, gpt_yarn_attributes, rope_args, spec_from_args

Change = tuple[Any, str, Any]  # (object, attribute, the value it takes while a context is active)


def no_device_calls() -> list[Change]:
    """``torch.cuda.synchronize`` as a no-op and ``current_device`` as ``"cpu"``: megatron-core
    0.16's save and load call both unconditionally (after staging tensors to CPU, and for the
    failure flag they broadcast), though neither needs a GPU for CPU tensors on gloo."""
    return [(torch.cuda, "synchronize", lambda *a, **k: None), (torch.cuda, "current_device", lambda: "cpu")]


@contextlib.contextmanager
def stand_ins(changes: list[Change]) -> Iterator[None]:
    """Set every attribute in ``changes`` while active; put each back (or remove it) on exit."""
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


@contextlib.contextmanager
def cpu_compat() -> Iterator[None]:
    """Without CUDA: make megatron-core's unconditional CUDA calls harmless while active.

    Replaced, and put back on exit: ``torch.cuda.synchronize`` (dist_checkpointing's preload)
    and ``current_device`` (finalize step, rotary embedding, masks), ``Tensor.cuda`` (the
    tied-embedding sync across PP stages), the CUDA RNG tracker's ``fork``, the sliding-window
    mask (built on the CPU instead), a missing
    ``moe_utils.te_general_gemm``, and ``multi_latent_attention.HAVE_TE`` (wrongly True when
    transformer-engine is absent: its extension imports with stand-ins). With CUDA nothing
    changes.
    """
    if torch.cuda.is_available():
        yield
        return
    from megatron.core import tensor_parallel
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    changes = no_device_calls() + [
        (torch.Tensor, "cuda", lambda self, *a, **k: self),
        (tensor_parallel.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext()),
    ]
    if hasattr(fused_softmax, "get_sliding_window_causal_mask"):  # 0.16 builds the mask on "cuda"
        changes.append((fused_softmax, "get_sliding_window_causal_mask", _sliding_window_mask))
    if not hasattr(moe_utils, "te_general_gemm"):
        changes.append((moe_utils, "te_general_gemm", None))
    if importlib.util.find_spec("transformer_engine") is None:
        changes.append((multi_latent_attention, "HAVE_TE", False))
    with stand_ins(changes):
        yield


class _StageGroup:
    """The pipeline group of one stage of a model whose stages this one process builds and runs in
    turn (``pipeline_stage``): its rank and size; no collective ever runs on it."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@contextlib.contextmanager
def pipeline_stage(stage: int, stages: int) -> Iterator[None]:
    """While active, megatron-core's parallel state says that this process (rank 0 of a world of
    one: TP, EP and DP stay 1) is pipeline stage ``stage`` of ``stages``, so that ``build_gpt(args,
    1, stages)`` builds that stage's layers, numbered as in the whole model, and its forward takes
    the previous stage's output (``set_input_tensor``). Its pipeline group is registered with
    torch.distributed under its rank, as megatron-core 0.19's hybrid models ask torch for it. There
    is no embedding group (a tied output layer is not synchronised with the first stage's
    embedding: the caller reads its weights). Put back on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state as state

    group = _StageGroup(stage, stages)
    names = ("_PIPELINE_MODEL_PARALLEL_GROUP", "_EMBEDDING_GROUP", "_POSITION_EMBEDDING_GROUP",
             "_MPU_PIPELINE_MODEL_PARALLEL_RANK", "_MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE")
    ranks = dist.distributed_c10d._world.pg_group_ranks
    ranks[group] = {dist.get_rank(): stage}
    try:
        with stand_ins([(state, name, value) for name, value in zip(names, (group, None, None, stage, stages))]):
            yield
    finally:
        del ranks[group]


def _sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """megatron-core's sliding-window mask on the CPU: True where query ``q`` may not see key ``k``,
    i.e. outside ``[q - left, q + right]`` (queries are the last ``sq`` of ``skv`` positions)."""
    left, right = window_size
    q = torch.arange(sq)[:, None] + (skv - sq)
    k = torch.arange(skv)[None, :]
    return (k < q - left) | (k > q + right)


def transformer_config(args: argparse.Namespace, tp: int, pp: int, init: bool = True):
    """The ``TransformerConfig`` (``MLATransformerConfig`` for MLA) of the model ``args`` describe
    (``megatron.args``: an arg missing without a Megatron-LM default is an error naming it), built
    at TP x PP (and the args' EP x ETP) on the CPU in float32, with no fused kernels."""
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    spec = spec_from_args(args)
    experts = dict(moe_grouped_gemm=bool(arg(args, "moe_grouped_gemm", default=False)),
                   expert_model_parallel_size=int(arg(args, "expert_model_parallel_size", default=1)),
                   expert_tensor_parallel_size=arg(args, "expert_tensor_parallel_size")) if spec.num_experts else {}
    config_class = MLATransformerConfig if spec.multi_latent_attention else TransformerConfig
    config = config_class(
        **config_fields(args),
        **experts,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        perform_initialization=init,
    )
    for name, value in gpt_yarn_attributes(spec).items():  # GPT YaRN: attributes, not fields (0.16 to 0.19)
        setattr(config, name, value)
    return config


def build_gpt(args: argparse.Namespace, tp: int, pp: int, init: bool = True, transformer_engine: bool = False):
    """A megatron-core ``GPTModel`` (local layer spec) for this rank's pipeline stage.

    ``init=False`` skips weight initialisation (fast; for benchmarks that fill weights later).
    ``transformer_engine=True``: from megatron-core's transformer-engine decoder block spec, as
    Megatron-LM builds models by default (needs transformer-engine's modules, or the tests'
    stand-ins).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    spec = spec_from_args(args)
    config = transformer_config(args, tp, pp, init)
    if spec.hybrid_pattern:
        return _build_hybrid(spec, config)
    gdn = spec.experimental_attention_variant == GATED_DELTA_NET
    sparse = spec.experimental_attention_variant == DSA
    if sparse:  # megatron-core's DSA spec: transformer-engine's layers (``distconv.megatron.dsa``)
        with stand_ins(dsa.spec_changes()):
            layers = dsa.layer_specs(config, spec.normalization)
    elif gdn:  # megatron-core's one spec for these: its transformer-engine block spec
        from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
            get_transformer_block_with_experimental_attention_variant_spec,
        )

        with stand_ins(gated_delta_net.spec_changes()):
            layers = get_transformer_block_with_experimental_attention_variant_spec(config)
    elif transformer_engine:
        layers = get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization=spec.normalization)
    elif spec.num_experts and not all(spec.moe_layers):  # dense and MoE layers mixed
        layers = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=spec.normalization)
    else:
        layers = get_gpt_layer_local_spec(
            num_experts=spec.num_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=spec.qk_layernorm, normalization=spec.normalization,
            multi_latent_attention=spec.multi_latent_attention,
        )
    if spec.multi_latent_attention and not sparse:
        _use_local_mla_attention(layers)
    mtp = {}
    if spec.mtp_num_layers:  # MTP layers (on the last stage), built like the last decoder layer
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        with stand_ins(dsa.spec_changes() if sparse else gated_delta_net.spec_changes() if gdn else []):
            mtp["mtp_block_spec"] = get_gpt_mtp_block_spec(config, layers,
                                                           use_transformer_engine=transformer_engine or sparse or gdn)
    rope = rope_args(spec)
    with stand_ins(gated_delta_net.kernel_changes() if gdn else dsa.spec_changes() if sparse else []):
        return GPTModel(
            **mtp,
            **_language_model_args(spec, config),
            transformer_layer_spec=layers,
            rope_scaling=rope["use_rope_scaling"],
            rope_scaling_factor=rope["rope_scaling_factor"],
            seq_len_interpolation_factor=rope["rotary_seq_len_interpolation_factor"],
        )


def _language_model_args(spec: Any, config: Any) -> dict[str, Any]:
    """The arguments ``GPTModel`` and ``MambaModel`` share, for this rank's pipeline stage."""
    from megatron.core import parallel_state

    return dict(
        config=config,
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type=spec.position_embedding,
        rotary_percent=spec.rotary_percent,
        rotary_base=spec.rotary_base,
    )


def _build_hybrid(spec: Any, config: Any) -> Any:
    """megatron-core's ``MambaModel`` (its hybrid stack, ``spec.hybrid_pattern``) for this rank's stage."""
    with mamba.imported():
        from megatron.core.models.mamba import MambaModel

        with stand_ins(mamba.kernel_changes()):
            return MambaModel(**_language_model_args(spec, config), mamba_stack_spec=mamba.stack_spec(config),
                              hybrid_override_pattern=spec.hybrid_pattern)


def _kernel_changes(config: Any) -> list[Change]:
    """The kernel stand-ins a model of ``config`` runs with (gated delta net, DSA, Mamba)."""
    variant = config.experimental_attention_variant
    if getattr(config, "is_hybrid_model", False):
        return mamba.kernel_changes()
    return gated_delta_net.kernel_changes() if variant == GATED_DELTA_NET else dsa.kernel_changes() if variant == DSA else []


def _mla_core_attention():
    """megatron-core's local ``DotProductAttention``, taking MLA's separate key/value head sizes.

    In 0.16.1 the local MLA spec fails to build: ``MLASelfAttention`` passes ``k_channels`` and
    ``v_channels``, which only transformer-engine's attention accepts. The local attention's
    forward already works with any key and value head sizes (MLA passes the softmax scale);
    only its output width, ``heads x v_channels``, has to be set.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)  # (Attention builds it once without, MLA again with them)
            if v_channels is not None:
                self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels

    return MLADotProductAttention


def _use_local_mla_attention(spec: Any) -> None:
    """Point every MLA layer of a layer or block spec at ``_mla_core_attention``."""
    layers = getattr(spec, "layer_specs", None) or [spec]
    core = _mla_core_attention()
    for layer in layers:
        layer.submodules.self_attention.submodules.core_attention = core


def sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model.sharded_state_dict()`` with the metadata Megatron-LM passes: the data-parallel group,
    over which an MTP stage that is not the first ties its copy of the embedding."""
    from megatron.core import parallel_state

    return model.sharded_state_dict(metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})


@torch.no_grad()
def forward_logits(model: torch.nn.Module, tokens: torch.Tensor, mtp: bool = False) -> Any:
    """megatron-core's own forward pass (one stage), on ``tokens``' device: logits [batch, seq, padded_vocab].

    With ``mtp``: ``(logits, [logits of each MTP layer])``; MTP layer ``k``'s logits at position
    ``i`` predict token ``i + k + 2``. megatron-core computes MTP outputs only as a loss (it needs
    labels); they are taken from its MTP block's output, through the model's output layer. Gated
    delta net, DSA and hybrid models run with their kernel stand-ins (``_kernel_changes``).
    """
    with stand_ins(_kernel_changes(model.config)):
        return _forward(model, tokens, mtp)


def _forward(model: torch.nn.Module, tokens: torch.Tensor, mtp: bool) -> Any:
    model.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=tokens.device), diagonal=1).view(1, 1, s, s)
    block = getattr(model, "mtp", None)
    if block is None:
        logits = model(tokens, position_ids, mask)
        return (logits, []) if mtp else logits
    seen: list[torch.Tensor] = []
    hook = block.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        model(tokens, position_ids, mask, labels=tokens)
    finally:
        hook.remove()
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    hidden = torch.chunk(seen[0], 1 + len(block.layers), dim=0)  # [s, b, h] each: the decoder's, then each MTP layer's
    logits = [model.output_layer(h, weight=weight)[0].transpose(0, 1).contiguous() for h in hidden]
    return (logits[0], logits[1:]) if mtp else logits[0]
