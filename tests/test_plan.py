"""The plan, computed from a real checkpoint's metadata: what each rank reads, and how much."""

from __future__ import annotations

import torch

from distconv.directions.export import make_plan
from distconv.engine.plan import numel
from distconv.families import FAMILIES, pick_family
from distconv.megatron.args import spec_from_args
from distconv.megatron.source import describe

from fixtures.build import layout_dir


def _plan(built, name, tp, pp, world, window=1 << 30, **options):
    ckpt = describe(layout_dir(built, name, tp, pp))
    spec = spec_from_args(ckpt.args).with_vocab(250)
    family = pick_family(FAMILIES, spec, None)
    return ckpt, make_plan(ckpt, spec, family, torch.float32, world, max_shard_size=5 * 10**9, window=window, **options)


def test_optimizer_state_is_present_but_never_read(built):
    ckpt, plan = _plan(built, "llama", 2, 2, 4)
    assert ckpt.other_bytes > ckpt.weight_bytes  # Adam moments as training leaves them
    keys = {r.key for g in plan.units for r in g.reads}
    assert keys == set(ckpt.tensors) and not any(k.startswith("optimizer.") for k in keys)
    read = sum(plan.bytes_read_by(r) for r in range(4))
    assert read == ckpt.weight_bytes  # every weight byte exactly once, nothing else


def test_training_world_reads_what_each_rank_saved(built):
    ckpt, plan = _plan(built, "qwen3", 2, 2, ckpt_world := 4)
    assert ckpt.writers == ckpt_world
    by_file = {(c.file, c.offsets): c.writer for t in ckpt.tensors.values() for c in t.chunks}
    for unit in plan.units:
        for read in unit.reads:
            chunk = next(c for c in ckpt.tensors[read.key].chunks if all(
                o <= ro and ro + rs <= o + s for o, s, ro, rs in zip(c.offsets, c.sizes, read.offsets, read.sizes)))
            assert read.rank == by_file[(chunk.file, chunk.offsets)]
    assert all(plan.bytes_read_by(r) > 0 for r in range(4))


def test_every_world_size_is_served(built):
    for world in (1, 3, 7):
        ckpt, plan = _plan(built, "llama", 2, 2, world)
        assert sum(plan.bytes_read_by(r) for r in range(world)) == ckpt.weight_bytes
        assert {r.rank for g in plan.units for r in g.reads} <= set(range(world))


def test_a_tensor_one_rank_reads_all_of_is_one_read(built):
    """At one rank every tensor is one read of its whole box, whatever chunks TP split it into (the
    reader puts each chunk in its place in the tensor); at 4 ranks the split ones are a read per
    chunk, each by the rank that saved it."""
    _, split = _plan(built, "llama", 2, 2, 4)
    assert sum(len(u.reads) > len(u.parts) for u in split.units) >= 4  # TP-split tensors in every layer
    ckpt, plan = _plan(built, "llama", 2, 2, 1)
    for unit in plan.units:
        assert len(unit.reads) == len(unit.parts)
        for read in unit.reads:
            assert numel(read.sizes) == numel(unit.parts[read.part].shape)
    assert plan.bytes_read_by(0) == ckpt.weight_bytes


def test_read_at_writer_reads_each_unit_whole_on_its_writer(built):
    """``read_at="writer"``: every read lies on its unit's writer, one read per tensor, and the
    bytes read are the same as by the savers' positions."""
    _, by_saver = _plan(built, "llama", 2, 2, 4, writers=2)
    ckpt, plan = _plan(built, "llama", 2, 2, 4, writers=2, read_at="writer")
    assert by_saver.gathered_bytes > 0 and plan.gathered_bytes == 0
    for unit in plan.units:
        assert [r.part for r in unit.reads] == list(range(len(unit.parts)))
        assert all(r.rank == unit.writer and numel(r.sizes) == numel(unit.parts[r.part].shape) for r in unit.reads)
    assert plan.bytes_read_by(1) == plan.bytes_read_by(3) == 0  # not writers
    assert sum(plan.bytes_read_by(r) for r in (0, 2)) == ckpt.weight_bytes


def test_units_are_bounded_by_the_window_not_the_model(built):
    window = 40_000
    ckpt, plan = _plan(built, "llama", 1, 1, 1, window=window)
    for unit in plan.units:
        sizes = [torch.Size(i.shape).numel() * 4 for i in unit.parts]
        assert sum(sizes) <= window or len(sizes) == 1
    assert len({i.layer for g in plan.units for i in g.parts if i.layer is not None}) == 4


def test_writers_own_disjoint_files_and_interleave(built):
    ckpt = describe(layout_dir(built, "llama", 2, 2))
    spec = spec_from_args(ckpt.args).with_vocab(250)
    plan = make_plan(ckpt, spec, pick_family(FAMILIES, spec, None), torch.float32, 4, max_shard_size=10**6, window=1 << 30, writers=2)
    assert plan.writers == [0, 2]
    files = {w: {o.file for g in plan.units if g.writer == w for o in g.outputs} for w in plan.writers}
    assert files[0] and files[2] and not files[0] & files[2]
    assert [g.writer for g in plan.units[:2]] == [0, 2]  # the two writers' ranges alternate
    assert [o.name for o in plan.outputs][0] == "model.embed_tokens.weight"
