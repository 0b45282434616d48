"""``distconv verify --load CKPT --hf OUT``: the export against megatron-core's own forward, layer by layer.

Neither model is ever built whole, so that a deep model costs no more memory than a shallow one
of the same width. megatron-core's ``GPTModel`` (``distconv.megatron.model``, local layer specs,
fp32, from the checkpoint's args) is built and run one pipeline stage of one decoder layer at a
time: this process plays each stage of a model split into as many stages as it has layers in turn
(``pipeline_stage``), each stage's output the next one's input. transformers'
``AutoModelForCausalLM`` (from the export's ``config.json``, ``trust_remote_code=False``) is built
with a stand-in for each decoder layer (``_LazyLayer``), the layer built again by its own class
while it runs. Both are built on the meta device with accelerate's ``init_empty_weights`` (buffers
such as RoPE's ``inv_freq`` stay real), and their weights are materialized from each side's own
files only while the module using them runs:

- megatron-core: one accelerate ``ModelHook`` per module holding parameters under the stage's
  decoder (and MTP) layers, attached while the stage runs, each parameter put in place by
  accelerate's ``set_module_tensor_to_device`` from a lazy map that reads it when asked: the box
  of the checkpoint tensor megatron-core's ``sharded_state_dict`` names for it (a torch_dist
  folder read by byte range, each chunk unpickled with distconv's allow-list and no
  ``_extra_state`` read; a legacy ``mp_rank_*`` one through distconv's legacy reader). MoE
  experts are modules of their own (``SequentialMLP``'s ``local_experts.{e}``): one expert's
  linear layer is in memory at a time. The embeddings are read with the first stage, the final
  norm and output layer with the last.
- transformers: each decoder layer's safetensors tensors loaded as it runs through transformers'
  own loader (its renames and MoE fusions; block-wise FP8 dequantized as read). A layer's routed
  experts are left out of it and run a window of experts at a time, each window read through the
  same loader (``_ExpertWindows``): at most ``--window`` bytes of them (fp32). The embeddings, final
  norm and output layer stay materialized.

The same seeded token sequences run through both models in step: megatron-core's forward runs in a
thread of its own and hands each decoder layer's input and output to transformers' forward, at
most one layer ahead of it (``_Handoff``). transformers runs the sequences twice in one batch: once
on its own (its logits are the export's logits), once with every decoder layer fed megatron-core's
input to the same layer, so each layer's output is compared on its own. The first layer whose max
|diff| exceeds the tolerance is named (``decoder.layers.{i}`` / ``model.layers.{i}``). Peak memory
is about one HF decoder layer, one megatron-core decoder layer's module, the embeddings, and the
hidden states of two layers, whatever the depth (an MoE layer's routed experts bounded by
``--window``), beside what grows with the depth without being a model: the checkpoint's metadata
and the export's index.

megatron-core 0.16 makes a few CUDA calls unconditionally; on a machine without CUDA they are
made harmless only while the model is built and run (``cpu_compat``), and restored after.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import queue
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch

from distconv.engine.plan import Read, numbered
from distconv.engine.run import parse_size
from distconv.engine.stream import heap_trimmer
from distconv.errors import DistconvError, warn
from distconv.families import HUB_TYPES
from distconv.hf.source import auto_map_file, kept_open, read_config, remote_code
from distconv.megatron.args import arg
from distconv.megatron.catalogue import COUNTS, other_spellings, stored_counts
from distconv.megatron.checkpoint import Checkpoint
from distconv.megatron.source import describe


T = TypeVar("T")
WINDOW = 256 * 2**20  # the default --window: bytes of routed experts transformers' side holds at once (fp32)


def _legacy_sources(ckpt: Checkpoint, model: torch.nn.Module) -> Iterator[tuple[str, str, Any, torch.Tensor]]:
    """Each of the model's sharded-state tensors with the legacy checkpoint's key for it and what it
    stores there, its shape checked."""
    from distconv.megatron.model import sharded_state_dict

    for name, sharded in sharded_state_dict(model).items():
        key = getattr(sharded, "key", None)
        data = getattr(sharded, "data", None)
        if key is None or not isinstance(data, torch.Tensor) or name.endswith("_extra_state"):
            continue
        # a decoder layer's tensor is stored under the layer's number in the whole model (a pipeline stage
        # numbers its layers from 0; megatron-core's layer_number counts from 1 in the whole model)
        local = re.match(r"decoder\.layers\.(\d+)\.", name)
        layer = model.decoder.layers[int(local.group(1))].layer_number - 1 if local else None
        source = f"decoder.layers.{layer}.{key.removeprefix('decoder.layers.')}" if local else key
        info = ckpt.tensors.get(source)
        if info is None:
            raise DistconvError(f"{ckpt.path}: the legacy checkpoint holds no {source} (megatron-core's {name})")
        if tuple(info.shape) != tuple(data.shape):
            raise DistconvError(f"{ckpt.path}: {source} is {list(info.shape)}, megatron-core's {name} is {list(data.shape)}")
        yield name, source, info, data


def _as_stored(sharded: dict[str, Any], ckpt: Checkpoint) -> dict[str, Any]:
    """The (local spec) model's tensors under the keys the checkpoint spells them by, where it spells
    them another way (the catalogue's spellings): MoE pre-MLP norms (``pre_mlp_layernorm.*``), MLA's
    latent norms (fused into the up projections) and the dense MLPs' pre-MLP norm in MLA models
    (fused into ``linear_fc1``, where the local spec's MLA layers keep a module of their own); the TE
    norms' extra state is not read."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for t in nested_values(sharded):
        if isinstance(t, ShardedTensor) and t.key not in ckpt.tensors:
            t.key = next((key for key in other_spellings(t.key) if key in ckpt.tensors), t.key)
    return sharded


def _check_args(ckpt: Checkpoint, args: argparse.Namespace) -> None:
    """args' layer and expert counts must be what the checkpoint stores (numbered from 0, none
    missing): a model of args is then no larger than the checkpoint's, even on the meta device
    (each module costs memory and time)."""
    extent, numbers = stored_counts(ckpt.tensors.values())
    for name in COUNTS:
        value = getattr(args, name, None) or 0
        if extent[name]:  # stacked keys hold them all; keys of their own may number only those
            ok = value == extent[name] and all(n < value for n in numbers[name])
        else:
            ok = isinstance(value, int) and numbered(numbers[name], value)
        if not ok:
            raise DistconvError(f"{ckpt.path}: the checkpoint's args say {name}={value}, but it stores "
                                f"{extent[name] or len(numbers[name])}; megatron-core's model is not built from "
                                "args that contradict the tensors")


def _check_shapes(ckpt: Checkpoint, meta: torch.nn.Module) -> None:
    """Every tensor of megatron-core's model of the args (built on the meta device: no memory) has
    the shape the checkpoint stores, so that building it for real allocates no more than that."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from distconv.megatron.model import sharded_state_dict

    if ckpt.format == "legacy":
        list(_legacy_sources(ckpt, meta))  # raises at the first key missing or of another shape
        return
    sharded = _as_stored(sharded_state_dict(meta), ckpt)
    apply_factories(sharded)
    for t in nested_values(sharded):
        info = ckpt.tensors.get(t.key) if isinstance(t, ShardedTensor) else None
        if info is not None and tuple(info.shape) != tuple(t.global_shape):
            raise DistconvError(f"{ckpt.path}: {t.key} is stored as {list(info.shape)}, but megatron-core's model of "
                                f"the checkpoint's args has {list(t.global_shape)}: the args contradict the tensors")


class _CheckpointWeights(Mapping[str, torch.Tensor]):
    """megatron-core's tensors by name (its ``state_dict`` names), each read from the checkpoint only
    when asked, in fp32: accelerate's lazy ``weights_map``.

    torch_dist: the box of the stored tensor ``sharded_state_dict`` names (TP1: the whole tensor, or
    one layer's or expert's row of a stacked one), read by byte range by this process alone; the
    ``ShardedObject``s (``_extra_state``) are never read: torch's DCP would unpickle them with
    ``weights_only=False``. Legacy: the whole tensor from the rank files, through the legacy reader.
    """

    def __init__(self, ckpt: Checkpoint, model: torch.nn.Module, reader: Any) -> None:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        from distconv.megatron.model import sharded_state_dict

        self.ckpt, self._reader = ckpt, reader
        if ckpt.format == "legacy":
            self._where: dict[str, Any] = {name: (source, tuple(info.shape))
                                           for name, source, info, _ in _legacy_sources(ckpt, model)}
        else:
            self._where = {name: value for name, value in _as_stored(sharded_state_dict(model), ckpt).items()
                           if not isinstance(value, ShardedObject) and not name.endswith("_extra_state")}

    @staticmethod
    def reader(ckpt: Checkpoint) -> Any:
        """The checkpoint's reader for every stage's map (a legacy one keeps each rank file it opened)."""
        if ckpt.format == "legacy":
            from distconv.megatron.legacy import LegacyReader

            return LegacyReader(ckpt)
        from distconv.megatron.torch_dist import TorchDistReader

        return TorchDistReader(ckpt, collective=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        where = self._where[name]
        if isinstance(where, tuple):  # legacy: (key, shape)
            key, shape = where
            return self._box(key, shape, (0,) * len(shape), shape)
        if hasattr(where, "merge_fn"):  # a ShardedTensorFactory: its pieces read, then merged as megatron-core does
            from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

            return where.merge_fn(dict_list_map_inplace(self._sharded, where.build()))
        return self._sharded(where)

    def __contains__(self, name: object) -> bool:
        """Whether the checkpoint stores ``name``, from its metadata (Mapping's own would read the tensor)."""
        where = self._where.get(name)  # type: ignore[call-overload]
        if where is None or isinstance(where, tuple) or hasattr(where, "merge_fn"):
            return where is not None
        return self._stored(where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def _stored(self, t: Any) -> bool:
        """Whether the checkpoint stores ``t`` whole, under its key or another spelling (``t.key`` set to it)."""
        if t.key not in self.ckpt.tensors:
            t.key = next((key for key in other_spellings(t.key) if key in self.ckpt.tensors), t.key)
        return t.key in self.ckpt.tensors and t.flattened_range is None

    def _sharded(self, t: Any) -> torch.Tensor:
        if not self._stored(t):
            raise DistconvError(f"{self.ckpt.path}: the checkpoint gives no value for {t.key}")
        sizes = (1,) * t.prepend_axis_num + tuple(t.local_shape)
        return self._box(t.key, tuple(t.global_shape), tuple(t.global_offset), sizes).reshape(t.local_shape)

    def _box(self, key: str, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        read = Read(0, 0, key, shape, offsets, sizes, tuple(slice(None) for _ in sizes), 0)
        return self._reader.read([read], torch.float32)[0]


_STREAMED = ("decoder.layers.", "mtp.")  # materialized module by module; the rest stays in memory
# held while megatron-core's side builds a stage under accelerate's init_empty_weights (which makes
# every module's new parameters meta, in any thread) and while transformers' side loads tensors
_REGISTERING = threading.Lock()


def _megatron_args(ckpt: Checkpoint) -> argparse.Namespace:
    """The checkpoint's args for one process (TP, PP, EP and expert TP 1), checked against its
    tensors (``_check_args``)."""
    args = argparse.Namespace(**vars(ckpt.args))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "expert_tensor_parallel_size"):
        setattr(args, name, 1)
    _check_args(ckpt, args)
    return args


def megatron_layers(ckpt: Checkpoint, args: argparse.Namespace, tokens: torch.Tensor,
                    hand: Callable[[tuple[torch.Tensor, torch.Tensor]], None],
                    beside: Callable[[Callable[[], torch.Tensor]], T]) -> T:
    """megatron-core's model of the checkpoint (of ``args``: ``_megatron_args``), built and run a
    pipeline stage of one decoder layer at a time (``_Stage``), its first stage set up in the caller's
    thread; returns ``beside(forward)``, run while it is: ``forward()`` gives megatron-core's logits
    (padded vocab) for ``tokens``, and ``hand`` each decoder layer's input and output hidden states
    ([seq, batch, hidden]) as the layer finishes. It runs on ``tokens``' device: each module's
    weights are put there as it runs."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from distconv.megatron.model import cpu_compat

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with cpu_compat():
            parallel_state.initialize_model_parallel(1, 1)
            stages = _Stages(ckpt, args, tokens.device, hand)
            first = _Stage(stages, 0)  # a checkpoint its args contradict is refused before the run

            def forward() -> torch.Tensor:
                out = first.run(tokens, None)
                for stage in range(1, stages.count):
                    out = _Stage(stages, stage).run(tokens, out)
                return out.float()

            return beside(forward)
    finally:
        parallel_state.destroy_model_parallel()
        if owns:
            dist.destroy_process_group()


class _Stages:
    """What every stage of megatron-core's model of the checkpoint shares: one stage per decoder
    layer (``count``), the checkpoint's reader, the device they run on, where each layer's input and
    output are handed, and the hook class and heap trimmer made once."""

    def __init__(self, ckpt: Checkpoint, args: argparse.Namespace, device: torch.device,
                 hand: Callable[[tuple[torch.Tensor, torch.Tensor]], None]) -> None:
        self.ckpt, self.args, self.device, self.hand = ckpt, args, device, hand
        self.count = int(args.num_layers)
        self.reader = _CheckpointWeights.reader(ckpt)
        self.hook = _module_hook()
        self.trim = heap_trimmer()  # a layer's freed weights handed back to the system (see heap_trimmer)


class _Stage:
    """Pipeline stage ``stage`` of megatron-core's model of the checkpoint (``pipeline_stage``: this
    process builds each stage and runs it in turn, so that one stage's modules exist at a time,
    however deep the model), built on the meta device after its shapes are checked against the
    checkpoint's, with everything outside its decoder (and MTP) layers read onto the device. Its
    decoder layers' modules are read as they run (a ``ModuleHook`` on each module holding
    parameters), and dropped with the stage."""

    def __init__(self, stages: _Stages, stage: int) -> None:
        from accelerate import init_empty_weights
        from accelerate.utils import set_module_tensor_to_device

        from distconv.megatron.model import build_gpt, pipeline_stage

        self.stages, self.stage = stages, stage
        ckpt, args, device = stages.ckpt, stages.args, stages.device
        with pipeline_stage(stage, stages.count):
            try:
                with torch.device("meta"):  # nothing allocated, buffers included: checked before the stage is built
                    _check_shapes(ckpt, build_gpt(args, 1, stages.count, init=False))
            except (AttributeError, TypeError, ValueError, AssertionError) as e:  # megatron-core checks args by assert too
                raise DistconvError(f"cannot build the megatron-core model from the checkpoint's args: {e}") from None
            # parameters on meta, buffers (RoPE's) computed; init_empty_weights patches nn.Module for every thread
            with _REGISTERING, init_empty_weights(include_buffers=False):
                self.model = model = build_gpt(args, 1, stages.count, init=False)
            self.weights = weights = _CheckpointWeights(ckpt, model, stages.reader)
        missing = [name for name, _ in model.named_parameters() if name not in weights]
        if missing:
            raise DistconvError(f"{ckpt.path}: the checkpoint gives no value for {', '.join(missing[:8])}")
        for name, _ in model.named_parameters():
            if not name.startswith(_STREAMED):
                set_module_tensor_to_device(model, name, device, value=weights[name])
        # persistent buffers (a router's expert bias): small, read once; computed ones moved
        for name in {name for name, _ in model.named_buffers()} & set(weights):
            set_module_tensor_to_device(model, name, device, value=weights[name])
        _buffers_to(model, device)

    def run(self, tokens: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """The stage's forward on ``tokens`` (the first stage) or on the previous stage's output
        (``hidden``): its output hidden states, or the logits on the last stage. The stage is dropped
        after."""
        from accelerate.hooks import remove_hook_from_submodules

        from distconv.megatron.model import forward_logits, pipeline_stage

        model, weights, stages = self.model, self.weights, self.stages
        del self.model, self.weights  # held by this call alone

        def module_hook(name: str) -> Any:
            return stages.hook(weights, stages.device, name)

        current: list[torch.Tensor] = []  # the running layer's input
        hooks = []
        if hasattr(model, "mtp"):
            _attach(module_hook, model.mtp, "mtp")
        for i, layer in enumerate(model.decoder.layers):
            _attach(module_hook, layer, f"decoder.layers.{i}")
            hooks.append(layer.register_forward_pre_hook(
                lambda m, a, k: current.append((a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True))
            hooks.append(layer.register_forward_hook(
                lambda m, a, out: stages.hand((current.pop(), (out[0] if isinstance(out, tuple) else out).detach().clone()))))
            hooks.append(layer.register_forward_hook(lambda m, a, out: stages.trim()))
        hooks += _mamba_cp_rebinds(model, weights, stages.device)
        try:
            with pipeline_stage(self.stage, stages.count):
                if hidden is not None:
                    model.set_input_tensor(hidden)
                return forward_logits(model, tokens)
        finally:
            for hook in hooks:
                hook.remove()
            remove_hook_from_submodules(model)


@functools.cache
def _module_hook() -> type:
    """The class (made once) of the accelerate hooks that read one megatron-core module's own
    parameters (the module named by the hook) from ``weights`` onto ``device`` as it runs, and put
    back the meta ones it was built with once it has (its weights dropped as soon as it has run)."""
    from accelerate.hooks import ModelHook
    from accelerate.utils import set_module_tensor_to_device

    class ModuleHook(ModelHook):
        # as accelerate's own hooks: a module called inside a torch.compile'd function (gated delta net's
        # gated norm) runs its hook eagerly, not traced
        def __init__(self, weights: Mapping[str, torch.Tensor], device: torch.device, name: str) -> None:
            self.weights, self.device, self.name, self.built = weights, device, name, {}

        @torch.compiler.disable
        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            self.built = {p: t for p, t in module._parameters.items() if t is not None}
            for p in self.built:
                set_module_tensor_to_device(module, p, self.device, value=self.weights[f"{self.name}.{p}"])
            return args, kwargs

        @torch.compiler.disable
        def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
            module._parameters.update(self.built)
            self.built = {}
            return output

    return ModuleHook


def _attach(module_hook: Callable[[str], Any], module: torch.nn.Module, name: str) -> None:
    """A ``module_hook`` on each module under ``module`` (named ``name``) that holds parameters of its own."""
    from accelerate.hooks import add_hook_to_module

    for sub, part in module.named_modules(prefix=name):
        if any(t is not None for t in part._parameters.values()):
            add_hook_to_module(part, module_hook(sub))


def _buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    """The model's real buffers (computed ones: RoPE's) put on ``device``, where its layers run."""
    from accelerate.utils import set_module_tensor_to_device

    for name, buffer in model.named_buffers():
        if buffer.device != device and not buffer.is_meta:
            set_module_tensor_to_device(model, name, device)


def _mamba_cp_rebinds(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], device: torch.device) -> list[Any]:
    """A Mamba mixer reads its conv1d's weight and bias without calling the module (so no hook reads
    them), through a context-parallel helper that keeps the ``A_log``, ``D`` and ``dt_bias`` parameters
    the mixer was built with, not those its hook puts in their place: once the mixer's hook has run
    (its ``in_proj`` runs next), the conv1d's tensors are read and the helper pointed at the mixer's
    own; after its ``out_proj`` the conv1d's go back to the meta device."""
    from accelerate.utils import set_module_tensor_to_device

    def rebind(name: str, mixer: torch.nn.Module) -> list[Any]:
        conv = [p for p, _ in mixer.conv1d.named_parameters()]

        def before(module: torch.nn.Module, args: Any) -> None:
            for p in conv:
                set_module_tensor_to_device(mixer.conv1d, p, device, value=weights[f"{name}.conv1d.{p}"])
            mixer.cp.A_log_cp1, mixer.cp.D_cp1, mixer.cp.dt_bias_cp1 = mixer.A_log, mixer.D, mixer.dt_bias

        def after(module: torch.nn.Module, args: Any, out: Any) -> None:
            for p in conv:
                set_module_tensor_to_device(mixer.conv1d, p, "meta")

        return [mixer.in_proj.register_forward_pre_hook(before), mixer.out_proj.register_forward_hook(after)]

    return [h for name, m in model.named_modules() if hasattr(getattr(m, "cp", None), "dt_bias_cp1")
            for h in rebind(name, m)]


def _export_tensors(hf: Path, config: Any) -> Any:
    """The export's safetensors tensors by their saved names (block-wise FP8 dequantized as read)."""
    from distconv.hf.source import DequantizedFP8, SafetensorsFiles, _check_index

    if not any(hf.glob("*.safetensors")):
        raise DistconvError(f"--hf {hf} holds no .safetensors files (verify reads safetensors only: a "
                            "pytorch_model.bin is never unpickled)")
    _check_index(hf)
    files = SafetensorsFiles(hf)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return files
    return DequantizedFP8(files, quantization if isinstance(quantization, dict) else quantization.to_dict())


class _ExportLayers:
    """The HF model's tensors loaded a decoder layer at a time (everything outside the layers at once)
    by transformers' own loader, with the weight conversions ``from_pretrained`` applies (renames,
    MoE experts fused into one tensor per layer): each layer holds its tensors only while it runs.
    A layer's routed experts (``_ExpertWindows``) are left out of it: they are loaded a window of
    experts at a time while they run, at most ``window`` bytes of them (fp32)."""

    def __init__(self, hf: Path, model: Any, layers: str, tensors: Any, window: int, device: torch.device) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.hf, self.model, self.layers, self.tensors, self.device = hf, model, layers, tensors, device
        self.mapping = get_model_conversion_mapping(model)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        lazy = model.get_submodule(layers)
        # the meta model's state_dict and buffers outside the decoder layers (``_only``), and every name
        # its tensors have, the layers' included (as transformers' loader is given it: a name is known)
        self.rest = model.state_dict()
        self.rest_buffers = list(model.named_buffers())
        names = dict.fromkeys(self.rest, True)
        names.update((f"{layers}.{i}.{name}", True) for i, layer in enumerate(lazy) for name in layer.names)
        experts = {f"{layers}.{i}.{name}": shape for i, layer in enumerate(lazy) for name, shape in layer.experts.items()}
        number = re.compile(rf"{re.escape(layers)}\.(\d+)\.")
        self.groups: dict[str, list[str]] = {}
        found: dict[str, list[tuple[str, str, str | None]]] = {name: [] for name in experts}
        for key in tensors.names():
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
            if target in names:  # not a tensor of the model transformers builds (MTP layers)
                owner = next((name for name in experts if target.startswith(f"{name}.")), None)
                if owner is not None:
                    found[owner].append((key, target, pattern))
                    continue
                layer = number.match(target)
                self.groups.setdefault(f"{layers}.{layer.group(1)}" if layer else "", []).append(key)
        self.windows: dict[str, dict[str, _ExpertWindows]] = {}  # layer -> its windowed modules, by name in it
        for name, shape in experts.items():
            windows = _ExpertWindows.plan(self, name, shape, found[name], window)
            group = f"{layers}.{number.match(f'{name}.').group(1)}"
            if windows is None:  # read with its layer
                self.groups.setdefault(group, []).extend(key for key, _, _ in found[name])
            else:
                self.windows.setdefault(group, {})[name.removeprefix(group)[1:]] = windows
        self.trim = heap_trimmer()
        for i, layer in enumerate(lazy):
            layer.run = functools.partial(self.run, i)

    def run(self, i: int, *args: Any, **kwargs: Any) -> Any:
        """Decoder layer ``i``'s forward: the layer built on the meta device by its own class and put in
        the model's list in place of its ``_LazyLayer`` (so that transformers' loader finds its
        tensors by name), materialized from the export (its routed experts a window at a time, as
        they run), run, and dropped."""
        from accelerate import init_empty_weights

        lazy = self.model.get_submodule(self.layers)
        stand_in = lazy[i]
        with _REGISTERING, init_empty_weights(include_buffers=False):  # buffers (RoPE's) computed
            layer = stand_in.build().train(stand_in.training)  # in eval mode, as the model is
        _buffers_to(layer, self.device)
        group = f"{self.layers}.{i}"
        windows = self.windows.get(group, {})
        lazy[i] = layer
        try:
            for name, w in windows.items():
                w.bind(layer.get_submodule(name))
            self.load(group, layer)
            self.check(group, layer, tuple(f"{name}." for name in windows))
            return layer(*args, **kwargs)
        finally:
            for w in windows.values():
                w.unbind()
            lazy[i] = stand_in
            del layer
            self.trim()

    def load(self, group: str, module: torch.nn.Module) -> None:
        """Materialize ``module`` (named ``group``; ``""``: the whole model, layers excepted) from its
        files, its windowed experts excepted."""
        with self.kept_open():
            state = {key: self.read(key) for key in self.groups.get(group, [])}
        self.convert(state, group)

    def kept_open(self) -> contextlib.AbstractContextManager:
        """Reads inside open each export file once (a safetensors header is parsed at each opening)."""
        return kept_open(self.tensors)

    def read(self, key: str, first: slice = slice(None)) -> torch.Tensor:
        """The export's tensor ``key`` (``first``: its rows along the first dimension) in fp32."""
        rest = tuple(slice(None) for _ in self.tensors.shape(key)[1:])
        return self.tensors.read(key, (first, *rest)).to(torch.float32)

    def convert(self, state: dict[str, torch.Tensor], module: str) -> None:
        """``state`` (the export's tensors by their saved names, all of the model's ``module``: a decoder
        layer, an experts module, or ``""`` for the rest) through transformers' loader into the model."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        config = LoadStateDictConfig(dtype=torch.float32, weight_mapping=self.mapping, device_map={"": self.device})
        with _REGISTERING, self._only(module):
            convert_and_load_state_dict_in_model(self.model, state, config)
        del state

    @contextlib.contextmanager
    def _only(self, module: str) -> Iterator[None]:
        """transformers' loader asks the model for its whole state_dict and buffers on each call (every
        layer's names: a time quadratic in the depth); it is given those of ``module`` alone (as they
        are now: an experts module's window-shaped ones), which names its tensors the same way. The
        instance's attributes are removed after."""
        model = self.model
        if module:
            part = model.get_submodule(module)
            state, buffers = part.state_dict(prefix=f"{module}."), list(part.named_buffers(prefix=module))
        else:
            state, buffers = dict(self.rest), list(self.rest_buffers)
        model.state_dict = lambda *args, **kwargs: dict(state)
        model.named_buffers = lambda *args, **kwargs: iter(buffers)
        try:
            yield
        finally:
            del model.state_dict, model.named_buffers

    def check(self, group: str, module: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
        empty = [name for name, t in module.state_dict().items()
                 if t.device.type == "meta" and not (skip and name.startswith(skip))]
        if empty:
            where = f"{group}." if group else ""
            raise DistconvError(f"--hf {self.hf}: the export gives no value for {where}{empty[0]}"
                                f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''}")


def _routed_experts(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a routed-experts module of transformers' experts interface
    (``use_experts_implementation``): ``forward(hidden_states, top_k_index, top_k_weights)`` over
    tensors stacked by expert, ``num_experts`` of them, with its expert-parallel flag."""
    return hasattr(module, "_is_expert_parallel") and isinstance(getattr(module, "num_experts", None), int)


# transformers' experts functions that skip expert ids >= num_experts when _is_expert_parallel is set
# (its expert-parallel contract: a rank holding some of the experts); "eager" is each class's own
# forward, which some classes (gpt-oss) do not give that contract
_WINDOWED_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")


@dataclasses.dataclass(frozen=True)
class _Experts:
    """What planning a routed-experts module's windows needs of it, taken while its layer was built
    (``_LazyLayer``): its class's name, its expert count, its state_dict's shapes, its own
    parameters' shapes (one expert's) and dtypes, and its experts implementation."""

    kind: str
    count: int
    shapes: dict[str, tuple[int, ...]]
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]
    implementation: str | None

    @classmethod
    def of(cls, module: torch.nn.Module) -> _Experts:
        return cls(type(module).__name__, module.num_experts, {p: tuple(t.shape) for p, t in module.state_dict().items()},
                   {p: (tuple(t.shape[1:]), t.dtype) for p, t in module.named_parameters(recurse=False)},
                   getattr(getattr(module, "config", None), "_experts_implementation", None))


class _ExpertWindows:
    """One routed-experts module run a window of experts [a, b) at a time: each window's tensors are
    read and converted by transformers' loader into parameters of the window's shape (the module's
    ``num_experts`` set to b - a), the module's own forward runs on the routing restricted to the
    window the way transformers' expert parallelism restricts it to a rank's experts (other experts'
    ids past the window's last, their weights 0), and the windows' outputs are summed."""

    def __init__(self, export: _ExportLayers, name: str, shape: _Experts, experts: list[list[str]],
                 fused: list[str], size: int) -> None:
        self.export, self.name, self.params = export, name, shape.params
        self.experts, self.fused, self.size = experts, fused, size
        self.module: Any = None  # the module of the running layer (``bind``)

    @classmethod
    def plan(cls, export: _ExportLayers, name: str, shape: _Experts,
             keys: list[tuple[str, str, str | None]], window: int) -> _ExpertWindows | None:
        """The windows of the module ``name`` (of ``shape``) given its export ``keys`` (saved name,
        target, converter pattern), or ``None`` where it is read whole with its layer (its experts fit
        in ``window``)."""
        from transformers.core_model_loading import dot_natural_key

        count, shapes, implementation = shape.count, shape.shapes, shape.implementation
        total = 4 * sum(torch.Size(s).numel() for s in shapes.values())
        lists: dict[tuple[str, str | None], list[str]] = {}
        for key, target, pattern in keys:
            lists.setdefault((target, pattern), []).append(key)
        experts: list[list[str]] = [[] for _ in range(count)]
        fused: list[str] = []
        reason = None
        if implementation not in _WINDOWED_IMPLEMENTATIONS:
            reason = f"its experts implementation {implementation!r} is not one of {', '.join(_WINDOWED_IMPLEMENTATIONS)}"
        elif set(shapes) != set(shape.params) or any(
                s[:1] != (count,) for s in shapes.values()):
            reason = f"not all of its tensors are parameters of its own stacked by expert ({count} experts)"
        for (target, pattern), names in lists.items():
            if pattern is not None and len(names) == count:  # one tensor per expert, stacked in this order by the loader
                for e, key in enumerate(sorted(names, key=dot_natural_key)):
                    experts[e].append(key)
            elif len(names) == 1 and export.tensors.shape(names[0])[:1] == (count,):
                fused += names
            elif reason is None:
                reason = (f"the export holds {len(names)} tensors like {names[0]} for {target}, neither one per expert "
                          f"({count}) nor one with every expert's rows")
        per_expert = total // max(count, 1)
        if reason is None:
            return cls(export, name, shape, experts, fused, max(1, window // per_expert))
        if total > window:
            raise DistconvError(f"--hf {export.hf}: {name} ({shape.kind}) cannot be read a window of experts "
                                f"at a time ({reason}), and its {count} experts hold {total} bytes in fp32, more than "
                                f"--window {window}: give --window {total} or more to read them whole")
        return None

    def bind(self, module: torch.nn.Module) -> None:
        """Run the freshly built ``module`` window by window."""
        self.module, module.forward = module, self.forward

    def unbind(self) -> None:
        del self.module.forward
        self.module = None

    def windows(self) -> Iterator[tuple[int, int]]:
        count = len(self.experts)
        for a in range(0, count, self.size):
            yield a, min(a + self.size, count)

    def _empty(self, count: int) -> None:
        """The module's parameters on the meta device, for ``count`` experts."""
        for p, (shape, dtype) in self.params.items():
            setattr(self.module, p, torch.nn.Parameter(torch.empty((count, *shape), dtype=dtype, device="meta"),
                                                       requires_grad=False))
        self.module.num_experts = count

    def _materialize(self, a: int, b: int) -> None:
        """The parameters of experts [a, b) from the export, in parameters of that shape."""
        self._empty(b - a)
        with self.export.kept_open():
            state = {key: self.export.read(key) for e in range(a, b) for key in self.experts[e]}
            state.update({key: self.export.read(key, slice(a, b)) for key in self.fused})
        self.export.convert(state, self.name)
        del state
        self.export.check(self.name, self.module)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        """The module's forward, window by window (installed as the module's ``forward`` while it runs: ``bind``)."""
        run = type(self.module).forward  # transformers' dispatch to the configured experts function
        parallel = self.module._is_expert_parallel
        out = None
        try:
            self.module._is_expert_parallel = True
            for a, b in self.windows():
                self._materialize(a, b)
                inside = (top_k_index >= a) & (top_k_index < b)
                part = run(self.module, hidden_states, torch.where(inside, top_k_index - a, b - a),
                           torch.where(inside, top_k_weights, torch.zeros_like(top_k_weights)))
                out = part if out is None else out + part
        finally:
            self._empty(len(self.experts))  # the last window dropped, the module as it was built
            self.module._is_expert_parallel = parallel
        return out


class _LazyLayer(torch.nn.Module):
    """A decoder layer of the HF model as transformers built its list (``_layers_built_lazily``): its
    class and the arguments it was built with, the names of its tensors and its routed-experts
    modules' shapes (``_Experts``), and its plain attributes (a block or attention type the model's
    forward reads); the layer itself was dropped once these were taken. Its forward (``run``, set by
    ``_ExportLayers``) builds it again, materialized, only while it runs."""

    def __init__(self, cls: type, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.cls, self.args, self.kwargs = cls, args, kwargs
        layer = self.build()
        self.names = tuple(layer.state_dict())
        self.experts = {name: _Experts.of(m) for name, m in layer.named_modules() if _routed_experts(m)}
        for name, value in vars(layer).items():
            if not name.startswith("_") and name not in vars(self) and isinstance(value, (bool, int, float, str, type(None))):
                setattr(self, name, value)

    def build(self) -> torch.nn.Module:
        return self.cls(*self.args, **self.kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)


def _layers_built_lazily(config: Any) -> contextlib.AbstractContextManager:
    """While transformers builds the causal LM of ``config``, the classes its ``_no_split_modules``
    names (its decoder layer), as its modeling module looks them up, make ``_LazyLayer``s: one layer
    exists at a time, however deep the model."""
    import sys

    from transformers import AutoModelForCausalLM

    from distconv.megatron.model import stand_ins

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    module = sys.modules[model_class.__module__]
    classes = [(name, getattr(module, name, None)) for name in model_class._no_split_modules or ()]
    return stand_ins([(module, name, functools.partial(_lazy, cls)) for name, cls in classes if isinstance(cls, type)])


def _lazy(cls: type, *args: Any, **kwargs: Any) -> _LazyLayer:
    return _LazyLayer(cls, args, kwargs)


def _decoder_layers(model: torch.nn.Module, count: int) -> str:
    """The name of the HF model's list of decoder layers (``model.layers``, ``transformer.h``)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name.endswith((".layers", ".h")):
            if not all(isinstance(layer, _LazyLayer) for layer in module):
                raise DistconvError(f"transformers' {type(model).__name__} does not build its decoder layers from the "
                                    "class it names in _no_split_modules: verify cannot build them one at a time")
            return name
    raise DistconvError(f"the HF model has no list of {count} decoder layers (the checkpoint's count)")


def export_model(hf: Path) -> tuple[Any, Any]:
    """transformers' model of the export's ``config.json`` on the meta device, and the export's tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    remote = auto_map_file(hf)
    config, warnings = read_config(hf, "--hf", HUB_TYPES)
    try:
        with init_empty_weights(include_buffers=False), _layers_built_lazily(config):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False).eval()
    except Exception as e:  # transformers raises many types for a bad folder
        if remote:
            raise DistconvError(remote_code(remote, "--hf", False)) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistconvError(f"--hf {hf}: transformers cannot build its model: {first}") from None
    for warning in warnings:
        warn(warning)
    return model, _export_tensors(hf, config)


def export_rest(hf: Path, model: Any, tensors: Any, count: int, device: torch.device, window: int = WINDOW
                ) -> _ExportLayers:
    """The export's model (``export_model``) with everything outside its ``count`` decoder layers read
    onto ``device``, ready to run a layer at a time; routed experts will be read at most ``window``
    bytes (fp32) of them at a time. Done before megatron-core's side starts, so that this reading's
    transient memory never meets megatron-core's running layers."""
    layers = _decoder_layers(model, count)
    export = _ExportLayers(hf, model, layers, tensors, window, device)
    export.load("", model)
    _buffers_to(model, device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    export.check("", model, skip=(f"{layers}.",))
    heap_trimmer()()  # the reads' bf16 copies handed back before megatron-core's side allocates
    return export


def hf_layers(export: _ExportLayers, tokens: torch.Tensor, take: Callable[[], tuple[torch.Tensor, torch.Tensor]]
              ) -> dict[str, Any]:
    """transformers' logits for ``tokens`` from the export (``export_rest``), and, with each of its
    decoder layers fed megatron-core's input to it (``take``: the next layer's input and output), the
    max |diff| of its output against megatron-core's. It runs on ``tokens``' device."""
    model, layers = export.model, export.layers
    b = tokens.shape[0]
    diffs: list[float] = []
    embedding: list[float] = []

    expected: list[torch.Tensor] = []  # megatron-core's output of the running layer

    def feed(i: int):
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            given, output = take()
            if i == 0:
                embedding.append((hidden[:b] - given.transpose(0, 1)).abs().max().item())
            hidden[b:] = given.transpose(0, 1)
            expected.append(output)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        def post(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            out = out[0] if isinstance(out, tuple) else out
            diffs.append((out[b:] - expected.pop().transpose(0, 1)).abs().max().item())
        return pre, post

    hooks = []
    for i, layer in enumerate(model.get_submodule(layers)):
        pre, post = feed(i)
        hooks += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                  layer.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            # no KV cache: it would keep every layer's keys and values to the end
            logits = model(torch.cat([tokens, tokens]), use_cache=False).logits[:b].float()
    finally:
        for hook in hooks:
            hook.remove()
    return {"logits": logits, "layers": layers, "diffs": diffs, "embedding": embedding[0]}


class _Cancelled(Exception):
    """transformers' side stopped: megatron-core's forward stops too."""


class _Ended(Exception):
    """megatron-core's side stopped before handing over a layer transformers' side waits for."""


class _Handoff:
    """Each megatron-core decoder layer's input and output, handed from its forward (in a thread of
    its own) to transformers' forward, at most one layer ahead; either side stopping stops the other."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._cancelled = threading.Event()

    def put(self, item: Any) -> None:
        """megatron-core's side: wait until transformers' side took the previous layer."""
        while True:
            if self._cancelled.is_set():
                raise _Cancelled
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def end(self) -> None:
        """megatron-core's side is done (or failed): nothing more comes."""
        try:
            self.put(None)
        except _Cancelled:
            pass

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' side: the next layer's input and output."""
        item = self._queue.get()
        if item is None:
            raise _Ended
        return item

    def cancel(self) -> None:
        self._cancelled.set()


def compare(ckpt: Checkpoint, hf: str | Path, tokens: torch.Tensor, tol: float = 1e-3, window: int = WINDOW
            ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """``verify``'s result for ``tokens``, with megatron-core's logits (padded vocab) and the export's
    (``window``: the most bytes of routed experts transformers' side holds at once, in fp32). Both
    models run on ``tokens``' device; the logits returned are on the CPU."""
    model, tensors = export_model(Path(hf))  # a bad export is refused before megatron-core runs
    args = _megatron_args(ckpt)  # checked before the export's layers are listed by its layer count
    export = export_rest(Path(hf), model, tensors, int(args.num_layers), tokens.device, window)
    handoff = _Handoff()

    def in_step(forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """megatron-core's ``forward`` in a thread of its own, transformers' in this one, in step."""
        megatron: dict[str, Any] = {}

        def run() -> None:
            try:
                megatron["logits"] = forward()
            except _Cancelled:
                pass
            except BaseException as e:  # raised in the caller's thread below
                megatron["error"] = e
            finally:
                handoff.end()

        thread = threading.Thread(target=run, name="distconv-verify-megatron", daemon=True)
        thread.start()
        theirs = None
        try:
            theirs = hf_layers(export, tokens, handoff.get)
        except _Ended:
            pass
        finally:
            handoff.cancel()
            thread.join()
        if "error" in megatron:
            raise megatron["error"]
        if theirs is None or "logits" not in megatron:  # one side ran out of layers before the other
            raise DistconvError("megatron-core's model and the export's ran different numbers of decoder layers")
        return megatron["logits"], theirs

    ours, theirs = megatron_layers(ckpt, args, tokens, handoff.put, in_step)
    vocab = theirs["logits"].shape[-1]
    if ours.shape[-1] < vocab:
        raise DistconvError(f"the HF vocab ({vocab}) is larger than the checkpoint's ({ours.shape[-1]})")
    diff = (theirs["logits"] - ours[..., :vocab]).abs()  # megatron's padding rows are not part of the model
    layers = [{"megatron": f"decoder.layers.{i}", "hf": f"{theirs['layers']}.{i}", "max_abs_diff": d}
              for i, d in enumerate(theirs["diffs"])]
    first = next((layer for layer in layers if not layer["max_abs_diff"] <= tol), None)
    result = {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (theirs["logits"].argmax(-1) == ours[..., :vocab].argmax(-1)).float().mean().item(),
        "tokens": list(tokens.shape),
        "tolerance": tol,
        "format": ckpt.format,
        "embedding_max_abs_diff": theirs["embedding"],
        "layers": layers,
        "first_mismatch": first and {"megatron": first["megatron"], "hf": first["hf"]},
    }
    result["ok"] = result["max_abs_diff"] <= tol and first is None and theirs["embedding"] <= tol
    return result, ours.cpu(), theirs["logits"].cpu()


def verify(
    load: str | Path,
    hf: str | Path,
    *,
    iteration: int | str | None = None,
    sequences: int = 4,
    length: int = 32,
    seed: int = 0,
    tol: float = 1e-3,
    window: str | int = WINDOW,
    device: str = "cpu",
) -> dict[str, Any]:
    """Compare ``sequences`` random token sequences layer by layer and by logits; ``ok`` when the
    logits' max |diff|, the embeddings' and every decoder layer's are all <= ``tol``. MoE layers'
    routed experts are read a window of them at a time, at most ``window`` bytes in fp32 (at least
    one expert). ``device`` ``cuda``: both models run on this process's GPU (its local rank's under
    torchrun or srun), each module's weights put there as it runs."""
    import json

    window = parse_size(window, "--window")
    where = _device(device)

    try:
        config = json.loads((Path(hf) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DistconvError(f"--hf {hf}: no readable config.json ({e})") from None
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
        raise DistconvError(f"--hf {hf}: config.json gives no vocab_size as a positive whole number "
                            f"({'vocab_size ' + repr(vocab) if isinstance(config, dict) else 'not a JSON object'})")
    ckpt = describe(load, iteration)
    if ckpt.format not in ("torch_dist", "legacy"):
        raise DistconvError(f"--load {load}: verify loads torch_dist and legacy checkpoints into megatron-core, not "
                            f"{ckpt.format}; `distconv reshard` writes it as torch_dist, which verify loads")
    length = min(length, int(arg(ckpt.args, "max_position_embeddings", "seq_length", default=length)))
    tokens = torch.randint(0, vocab, (sequences, length), generator=torch.Generator().manual_seed(seed))
    return compare(ckpt, hf, tokens.to(where), tol=tol, window=window)[0]


def _device(name: str) -> torch.device:
    """``--device``: ``cpu``, or ``cuda`` (this process's GPU as export takes it: ``engine.comm.local_gpu``)."""
    from distconv.engine.comm import local_gpu

    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise DistconvError(f"--device {name}: choose cpu or cuda")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise DistconvError("--device cuda: torch sees no CUDA device here")
    index = local_gpu(dict(os.environ), torch.cuda.device_count())
    torch.cuda.set_device(index)  # megatron-core places what it computes on the current device
    return torch.device("cuda", index)
