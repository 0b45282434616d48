"""``distconv.weights``: a model's HF-named tensors handed to a consumer (a running inference
engine) instead of written into a folder.

The model is a live megatron-core model (``model=``: one model or its virtual-pipeline chunks,
inside the job's process groups; its ``sharded_state_dict()`` describes it like a torch_dist
checkpoint) or a checkpoint (``load=``). Either way it is export's plan, families, catalogue and
gather (``export.map_model``, ``engine.stream``): no second mapping. The plan is made once, from
metadata only, and gives ``metadata()``; each pass reads the model as it is then (a live model's
``sharded_state_dict()`` taken afresh and checked against the plan), a layer group at a time, with
at most ``window`` bytes read ahead. With ``senders="rank0"`` every group is gathered on rank 0;
with ``"holders"`` each of the plan's units (cut where the rank holding its tensors changes) is
gathered on the rank holding most of it, so a PP stage hands out its own layers and an EP rank its
own experts, and a layer group may come from several ranks.

It is vLLM's ``WeightSource`` (``vllm.distributed.weight_transfer.base``) where vLLM is importable,
and the same methods otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distconv.directions.export import (_load_hf_config, _load_tokenizer, _true_vocab, hf_outputs, map_model,
                                       nonfinite_count, nonfinite_entry, nonfinite_error)
from distconv.engine.comm import Comm
from distconv.engine.plan import Plan, most_held
from distconv.engine.run import agreed, parse_size
from distconv.engine.stream import Reader, Stream
from distconv.errors import DistconvError, warn
from distconv.megatron.args import spec_from_args
from distconv.megatron.live import describe_model, live_source, local_boxes, same_layout
from distconv.megatron.source import describe, open_reader


@dataclasses.dataclass(frozen=True)
class WeightsOptions:
    """What ``distconv.weights`` takes besides the model."""

    dtype: str = "bf16"  # bf16, fp16, fp32, auto (the model's) or fp8 (block-wise, with hub-named scales)
    window: str | int = "256MiB"  # bytes read ahead and not yet handed out
    hf_config: str | Path | None = None  # the served model's config.json or folder (else from args)
    vocab_size: int | None = None  # the true vocab size (else as export finds it)
    iteration: int | str | None = None  # load=: which iteration
    device: str = "auto"  # gather over NCCL on GPUs, else gloo
    timeout_s: float = 1800.0
    senders: str = "rank0"  # rank0: every group gathered on rank 0; holders: each unit on the rank holding most of it


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """One tensor a pass yields (the fields of vLLM's ``ParamMeta``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def _group_key(plan: Plan, index: int) -> tuple[int, int]:
    """A unit's layer group, as vLLM's ``layerwise_groups`` groups the HF names: the embedding
    before the layers, each layer, then the rest."""
    part = plan.units[index].parts[0]
    if part.layer is not None:
        return (1, part.layer)
    return (0, 0) if part.key.startswith("embedding.") else (2, 0)


class Weights:
    """A model's HF tensors, streamed group by group on every rank together (a collective)."""

    def __init__(self, model: Any = None, load: str | Path | None = None, args: argparse.Namespace | None = None,
                 opts: WeightsOptions = WeightsOptions()) -> None:
        if (model is None) == (load is None):
            raise DistconvError("distconv.weights: give model= (a megatron-core model or its virtual-pipeline chunks) "
                                "or load= (a checkpoint), one of them")
        if model is not None and args is None:
            raise DistconvError("distconv.weights(model=...): give args=, the Megatron-LM args (or a Namespace of "
                                "them) the model was built from")
        if opts.senders not in ("rank0", "holders"):
            raise DistconvError(f"distconv.weights: senders={opts.senders!r} is not rank0 or holders")
        self._failed = False
        self._models = None if model is None else list(model) if isinstance(model, (list, tuple)) else [model]
        self._args, self._opts = args, opts
        self._comm = Comm.setup(opts.device, opts.timeout_s)
        try:
            self._window = parse_size(opts.window, "window")
            if self._models is not None:
                held = agreed(self._comm, lambda: local_boxes(self._models))
                boxes = self._comm.collect(sorted(box for box, _ in held.values()))
                del held
                self._ckpt, self._reader = agreed(self._comm, lambda: (describe_model(boxes, args), None))
            else:
                self._ckpt = agreed(self._comm, lambda: describe(load, opts.iteration))
                self._reader = open_reader(self._ckpt, collective=True)
            self._mapped = agreed(self._comm, self._map)
        except BaseException:
            self._comm.close()
            raise
        plan, rank = self._mapped.plan, self._comm.rank
        self._groups: list[tuple[list[int], list[str]]] = []
        for index, unit in enumerate(plan.units):
            if index and _group_key(plan, index) == _group_key(plan, index - 1):
                self._groups[-1][0].append(index)
                self._groups[-1][1].extend(o.name for o in unit.outputs)
            else:
                self._groups.append(([index], [o.name for o in unit.outputs]))
        if opts.senders == "holders":  # each unit on the rank holding most of it: a PP stage's layers, EP experts
            for unit in plan.units:
                unit.writer = most_held(unit.reads, self._comm.world)
        self._holders = [[plan.units[i].writer for i in indices for _ in plan.units[i].outputs]
                         for indices, _ in self._groups]  # of each tensor of each group
        self._held = frozenset(o.name for u in plan.units if u.writer == rank for o in u.outputs)
        self._mine = [rank in holders for holders in self._holders]
        self._meta = [TensorMeta(o.name, o.dtype, o.shape) for o in plan.outputs]

    def _map(self):
        ckpt, opts = self._ckpt, self._opts
        spec = spec_from_args(ckpt.args)
        user_config, _, warnings = _load_hf_config(opts.hf_config)
        tokenizer = None
        if ckpt.path is not None and opts.vocab_size is None and user_config is None:
            tokenizer, _, more = _load_tokenizer(None, ckpt)
            warnings += more
        vocab, _, warning, _ = _true_vocab(spec, user_config, tokenizer, ckpt, opts.vocab_size)
        if self._comm.rank == 0:
            for w in warnings + ([warning] if warning else []):
                warn(w)
        mapped = map_model(ckpt, spec.with_vocab(vocab), user_config, opts.dtype, self._comm.world,
                           window=self._window, max_shard_size=1 << 62, writers=1,
                           cut_at_holders=opts.senders == "holders")
        if self._comm.rank == 0:
            for note in mapped.notes:
                warn(note)
        return mapped

    @property
    def config(self) -> Any:
        """The HF config of the tensors (what the serving engine's model must have)."""
        return self._mapped.config

    def metadata(self) -> list[TensorMeta]:
        """Every tensor a pass yields, in order: name, dtype and full HF shape (no transfer)."""
        return list(self._meta)

    def held_names(self) -> frozenset[str]:
        """The tensors this rank yields: with ``senders="rank0"`` all on rank 0 and none elsewhere;
        with ``"holders"`` those of the plan's units it holds most of (a PP stage's own layers, an
        EP rank's own experts)."""
        return self._held

    def holders(self) -> list[list[int]]:
        """For every layer group of a pass (every rank's, in metadata order: those ``deliver``
        hands out), the rank yielding each of its tensors, in order (the same on every rank)."""
        return [list(holders) for holders in self._holders]

    def groups(self) -> list[list[str]]:
        """This rank's layer groups, in metadata order: vLLM's ``layerwise_groups`` of every name,
        those holding a name of ``held_names()``; each whole (names other ranks yield included)."""
        return [list(names) for (_, names), mine in zip(self._groups, self._mine) if mine]

    def iter_groups(self) -> Iterator[tuple[list[str], list[torch.Tensor | None]]]:
        """Collective, a fresh pass each call: ``(names, tensors)`` per group of ``groups()``, with
        ``None`` for each name another rank yields (vLLM's ``WeightSource`` contract); every rank
        must exhaust it (a rank holding nothing yields nothing but takes part in the gathers). A
        failure on any rank (a read, a NaN or Inf) raises one ``DistconvError`` on every rank
        before the group it is in is handed out."""
        for (names, tensors), mine in zip(self._pass(), self._mine):
            if mine:
                yield names, tensors

    def deliver(self, send: Callable[[list[str], list[torch.Tensor | None]], None]) -> int:
        """Collective: one pass, ``send(names, tensors)`` called with every layer group on every rank
        (``None`` for each tensor another rank yields: ``holders()``). A failure on any rank, in the
        pass or in ``send``, raises one ``DistconvError`` on every rank before the next group.
        Returns the number of groups."""
        count = 0
        with self._failing():
            for names, tensors in self._pass():
                error = None
                try:
                    send(names, tensors)
                except Exception as e:
                    error = e
                self._comm.agree(error)
                count += 1
        return count

    def _pass(self) -> Iterator[tuple[list[str], list[torch.Tensor | None]]]:
        """Collective: every group and its tensors (``None`` for those another rank yields), once
        every rank agreed that the group was read and mapped without error."""
        with self._failing():
            comm, mapped = self._comm, self._mapped
            plan = mapped.plan
            stream = Stream(plan, self._current_reader(), comm, self._window, threaded=comm.overlap_reads)
            try:
                walk = stream.walk()
                for indices, names in self._groups:
                    tensors: list[torch.Tensor | None] = []
                    error: BaseException | None = None
                    for _ in indices:
                        index, full = next(walk)
                        if full is None or error is not None:
                            tensors += [None] * len(plan.units[index].outputs)
                            continue
                        try:
                            for source, name, out in hf_outputs(mapped, plan.units[index], full):
                                if count := nonfinite_count(out):
                                    raise nonfinite_error([nonfinite_entry(source, name, count, out)],
                                                          "nothing of its layer group was handed out")
                                tensors.append(out)
                        except Exception as e:
                            error = e
                    comm.agree(error)
                    yield list(names), tensors
            finally:
                stream.close()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for names, tensors in self.iter_groups():
            yield from zip(names, tensors)

    def agree(self, error: BaseException | None) -> None:
        """Collective: if any rank failed (e.g. its consumer refused a group), every rank raises."""
        with self._failing():
            self._comm.agree(error)

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """A failure here fails the source: its groups are then aborted by ``close``, not met at a
        barrier (a peer may have died)."""
        try:
            yield
        except Exception:
            self._failed = True
            raise

    def close(self) -> None:
        """Destroy the process groups this source made (the job's own are left as they were); after
        a failed pass (the source is of no more use), abort them without waiting for the peers."""
        self._comm.close(clean=not self._failed)

    def __enter__(self) -> "Weights":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._comm.close(clean=exc[0] is None and not self._failed)

    def _current_reader(self) -> Reader:
        """The reader of this pass: a live model's parts as they are now, in the layout planned."""
        if self._models is None:
            return self._reader
        ckpt, reader = live_source(self._models, self._args, self._comm.collect)
        if not same_layout(ckpt, self._ckpt):
            raise DistconvError("the model's tensors changed shape, dtype or place since distconv.weights() described "
                                "it: make a new source")
        return reader


def _vllm_source() -> type | None:
    """``Weights`` as a subclass of vLLM's ``WeightSource``, where vLLM is importable."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm.distributed.weight_transfer.base import WeightSource

    from vllm.distributed.weight_transfer.base import ParamMeta, layerwise_groups

    class VLLMWeights(Weights, WeightSource):
        __doc__ = Weights.__doc__

        def __init__(self, *args: Any) -> None:
            Weights.__init__(self, *args)
            if layerwise_groups([m.name for m in self._meta]) != [names for _, names in self._groups]:
                self.close()
                raise DistconvError("internal: the plan's layer groups are not vLLM's layerwise_groups")

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(m.name, m.dtype, m.shape) for m in self._meta]

    return VLLMWeights


def weights(model: Any = None, load: str | Path | None = None, args: argparse.Namespace | None = None,
            **options: Any) -> Weights:
    """Collective: a source of a model's HF-named tensors for a serving engine's weight update.

    ``model``: a live megatron-core model or the list of its virtual-pipeline chunks, with
    ``args`` (Megatron-LM's); or ``load``: a Megatron checkpoint. ``options`` are
    ``WeightsOptions``' fields. Returns vLLM's ``WeightSource`` where vLLM is importable (else the
    same methods): ``metadata()``, ``iter_groups()``, iteration, ``held_names()``. Every rank of the
    job must iterate each pass to its end; ``close()`` (or ``with``) frees its process groups.
    """
    cls = _vllm_source() or Weights
    return cls(model, load, args, WeightsOptions(**options))
