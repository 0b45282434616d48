"""Checkpoints written by megatron-core 0.19.2 itself: export, reshard and import, proven by 0.19.2.

megatron-core 0.19.2 (with its ``megatron.training``) lives in ``.venv-m019``
(``tests/setup_megatron019.sh``); ``tests/megatron019_run.py`` runs there, under torchrun, gloo, CPU.
Three launches in all:

1. 0.19.2 builds its fixtures (``megatron019_run.FIXTURES``) and records its own fp32 logits: a
   Llama-like model at TP2, a Mixtral-like one at EP2, and the Llama-like one at TP2 x PP2 in bf16
   saved with ``--ckpt-drop-redundant-extra-state``. Each is saved by Megatron-LM 0.19.2's
   ``save_checkpoint`` from args its ``parse_args``/``validate_args`` made: no ``common.pt``, the
   args inside DCP as ``common_state``. (0.19.2's training code predates Megatron-LM #5552, so its
   step, turning the redundant ``_extra_state`` objects into local ones, is applied at the same point
   by the run script; the flag's arg is set as #5552's parser sets it.)
2. distconv (this venv, megatron-core 0.16.1) exports each, reshards each to another layout,
   imports each export back at another layout, and exports every output again.
3. 0.19.2 checks every output of distconv: the chunks its model saves at the args' layout are
   the stored ones, it loads them strictly as a job with and without the drop flag would, and
   its logits equal its own on the fixture; the fixtures themselves go through the same check.
"""

from __future__ import annotations

import argparse
import enum
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, hf_logits, hf_tensors, torchrun, venv_unavailable

VENV = ROOT / ".venv-m019"
TOL = 1e-4
VOCAB = 250  # the fixtures' NullTokenizer: megatron-core >= 0.18 adds no token
FIXTURES = ("dense_tp2", "moe_ep2", "dense_dropped")
# distconv's outputs: name -> (op, fixture, TP, PP, EP, ETP); each is exported again and checked in 0.19.2
OUTPUTS = {
    "dense_tp2_to_tp1pp2": ("reshard", "dense_tp2", 1, 2, 1, None),
    "moe_ep2_to_tp2ep2etp1": ("reshard", "moe_ep2", 2, 1, 2, 1),
    "dense_dropped_to_tp2pp1": ("reshard", "dense_dropped", 2, 1, 1, None),
    "dense_tp2_import_tp2pp2": ("import", "dense_tp2", 2, 2, 1, None),
    "moe_ep2_import_ep4": ("import", "moe_ep2", 1, 1, 4, None),
    "dense_dropped_import_tp1pp4": ("import", "dense_dropped", 1, 4, 1, None),
}


def _unavailable() -> str | None:
    return venv_unavailable(VENV, "megatron-core 0.19.2", "setup_megatron019.sh")


def _m019(*args: str, cwd: Path, timeout: float) -> None:
    """``torchrun --nproc-per-node 4 tests/megatron019_run.py ARGS`` with the 0.19.2 venv's python."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this project on its path
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(VENV / "bin" / "python"), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           str(ROOT / "tests" / "megatron019_run.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def m019(tmp_path_factory) -> dict:
    """Build with 0.19.2, convert with distconv, check with 0.19.2: paths and results."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("m019")
    fx = work / "fx"
    _m019("build", str(fx), cwd=work, timeout=1800)
    refs = {name: torch.load(fx / "refs" / f"{name}.pt") for name in FIXTURES}
    jobs: list[dict] = []
    index: dict[str, int] = {}

    def add(key: str, **job) -> None:
        index[key] = len(jobs)
        jobs.append(job)

    for name in FIXTURES:
        add(f"export {name}", op="export", load=str(fx / name), save=str(work / "hf" / name))
    for out, (op, name, tp, pp, ep, etp) in OUTPUTS.items():
        load = str(fx / name) if op == "reshard" else str(work / "hf" / name)
        extra = dict(divisible_by=128) if op == "import" else {}
        if ep > 1:
            extra.update(ep=ep, etp=etp)
        add(f"{op} {out}", op=op, load=load, save=str(work / "meg" / out), tp=tp, pp=pp, **extra)
        add(f"export {out}", op="export", load=str(work / "meg" / out), save=str(work / "hf" / out))
    (work / "jobs.json").write_text(json.dumps(jobs))
    torchrun(4, str(ROOT / "tests" / "import_jobs.py"), str(work / "jobs.json"), str(work / "results.json"), timeout=1800)
    results = json.loads((work / "results.json").read_text())
    checks = {**{name: (fx / name, name) for name in FIXTURES},
              **{out: (work / "meg" / out, spec[1]) for out, spec in OUTPUTS.items()}}
    check_jobs = [{"root": str(root), "fixture": name, "tokens": refs[name]["tokens"].tolist(),
                   "logits_out": str(work / f"{key}.logits.pt")}
                  for key, (root, name) in checks.items()]
    (work / "check_jobs.json").write_text(json.dumps(check_jobs))
    _m019("check", str(work / "check_jobs.json"), str(work / "check_results.json"), cwd=work, timeout=1800)
    checked = dict(zip(checks, json.loads((work / "check_results.json").read_text())))
    return {"work": work, "fx": fx, "refs": refs, "results": {k: results[i] for k, i in index.items()}, "checked": checked}


BUILT_BY_DISTCONV = ("llama", "deepseek_v3", "qwen3_next", "qwen3_5", "nemotron_h")  # GPT, MLA, gated delta net, Mamba


@pytest.fixture(scope="module")
def builder_019(built, tmp_path_factory) -> dict:
    """``tests/megatron019_builder.py`` in the 0.19.2 venv, this project on its path: distconv's
    ``build_gpt`` (``verify``'s model) of 0.16.1 fixtures, run by 0.19.2."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    result = tmp_path_factory.mktemp("m019_builder") / "result.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [str(VENV / "bin" / "python"), str(ROOT / "tests" / "megatron019_builder.py"), str(built), str(result),
           *BUILT_BY_DISTCONV]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=result.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(result.read_text())


@pytest.mark.parametrize("name", BUILT_BY_DISTCONV)
def test_distconv_builds_its_models_with_megatron_core_0192(builder_019, name):
    """With megatron-core 0.19.2 installed, distconv's model of a 0.16.1 checkpoint (its stand-ins
    for transformer-engine, fla and mamba_ssm included) builds, loads and computes 0.16.1's logits."""
    result = builder_019[name]
    assert "error" not in result, f"{result['error']}\n{result['traceback']}"
    assert result["diff"] <= TOL, result


def ok(m019: dict, key: str) -> dict:
    result = m019["results"][key]
    assert result["ok"], f"{key}: {result.get('error')}"
    return result["report"]


def checked(m019: dict, key: str) -> dict:
    result = m019["checked"][key]
    assert result["ok"], f"{key}: {result.get('error')}"
    return result["report"]



def test_fixtures_are_saved_as_megatron_lm_0192_saves(m019):
    """A training save root of 0.19.2: tracker, ``iter_0000100``, ``metadata.json``, no ``common.pt``;
    the args (0.19's, with ``InferenceCudaGraphScope`` and ``null_tokenizer_eod_id``) inside DCP.
    The dropped fixture stores no ``_extra_state`` at all, the others one per TE module."""
    from distconv.megatron.source import describe

    for name in FIXTURES:
        root = m019["fx"] / name
        assert (root / "latest_checkpointed_iteration.txt").read_text() == "100"
        folder = root / "iter_0000100"
        assert (folder / "metadata.json").is_file() and not (folder / "common.pt").exists()
        ckpt = describe(root)
        assert ckpt.iteration == 100 and ckpt.args.ckpt_format == "torch_dist" and hasattr(ckpt.args, "null_tokenizer_eod_id")
        assert type(ckpt.args.inference_cuda_graph_scope).__qualname__ == "InferenceCudaGraphScope"
        objects = {k.split("/")[0] for k in set(ckpt.metadata.state_dict_metadata) - set(ckpt.tensors)}
        assert "common_state" in objects
        extra = {k for k in objects if k.endswith("._extra_state")}
        assert bool(extra) == (name != "dense_dropped"), sorted(objects)
        assert getattr(ckpt.args, "ckpt_drop_redundant_extra_state", False) == (name == "dense_dropped")


@pytest.mark.parametrize("name", FIXTURES)
def test_export_matches_megatron_core_0192_logits(m019, name):
    """transformers on distconv's export computes 0.19.2's own logits (fp32); the NullTokenizer
    vocab of megatron-core >= 0.18 (250 rows, no added token)."""
    report = ok(m019, f"export {name}")
    ref = m019["refs"][name]
    folder = m019["work"] / "hf" / name
    assert report["vocab_size"] == VOCAB
    logits = hf_logits(folder, ref["tokens"])
    assert logits.shape[-1] == VOCAB
    assert (logits - ref["logits"][..., :VOCAB]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", FIXTURES)
def test_verify_reads_megatron_core_0192_saves(m019, name):
    """``distconv verify`` (megatron-core 0.16.1's model here) loads each 0.19.2 save, the one without
    ``_extra_state`` too, and agrees with the export."""
    from distconv.verify import verify

    ok(m019, f"export {name}")
    result = verify(m019["fx"] / name, m019["work"] / "hf" / name, sequences=1, length=8, tol=TOL)
    assert result["ok"], result


@pytest.mark.parametrize("name", FIXTURES)
def test_megatron_core_0192_loads_its_own_fixture(m019, name):
    """The check itself, on 0.19.2's own saves: the chunks match and the logits are its own. A job
    without the drop flag cannot load the dropped save (its ``_extra_state`` are requested and
    absent), one with it can; the others load either way."""
    report = checked(m019, name)
    assert report["layout_equal"], report
    assert report["strict_load_dropping"] == "ok", report
    if name == "dense_dropped":
        assert report["strict_load"] != "ok" and "_extra_state" in report["strict_load"], report
    else:
        assert report["strict_load"] == "ok", report
    logits = torch.load(m019["work"] / f"{name}.logits.pt")
    assert (logits - m019["refs"][name]["logits"]).abs().max().item() <= TOL


@pytest.mark.parametrize("out", OUTPUTS)
def test_distconv_output_loads_strictly_in_megatron_core_0192(m019, out):
    """Every reshard and import of a 0.19.2 save: 0.19.2 built at the target layout declares exactly the
    stored chunks, loads them with or without the drop flag (distconv writes every ``_extra_state``),
    reads the args distconv wrote (``common_state`` or ``common.pt``), and computes the fixture's
    logits; exported again, the output gives the fixture's export bit for bit."""
    op, name, tp, pp, ep, etp = OUTPUTS[out]
    ok(m019, f"{op} {out}")
    report = checked(m019, out)
    assert report["layout_equal"], report
    assert report["strict_load"] == "ok" and report["strict_load_dropping"] == "ok", report
    assert (report["args_tp"], report["args_pp"], report["args_ep"]) == (tp, pp, ep)
    assert report["args_etp"] == (etp if etp is not None else tp)
    assert report["args_impl"] == "transformer_engine"
    logits = torch.load(m019["work"] / f"{out}.logits.pt")
    ref = m019["refs"][name]["logits"]
    assert (logits[..., :VOCAB] - ref[..., :VOCAB]).abs().max().item() <= TOL
    if op == "import":  # the padding rows an import adds are zero
        assert torch.count_nonzero(logits[..., VOCAB:]) == 0
    ok(m019, f"export {out}")
    first, again = hf_tensors(m019["work"] / "hf" / name), hf_tensors(m019["work"] / "hf" / out)
    assert sorted(first) == sorted(again)
    assert all(first[k].dtype == again[k].dtype and torch.equal(first[k], again[k]) for k in first)


def test_args_of_a_newer_megatron_core_read_and_written_back():
    """megatron-core 0.19 saves an enum 0.16 lacks in args (``InferenceCudaGraphScope``). distconv
    reads it (a stand-in keeping its value), and pickles it back as the same global, so that the args
    a reshard writes unpickle in 0.19 as the enum member they were."""
    from megatron.core.transformer import enums

    from distconv.megatron.checkpoint import NewerEnumMember, safe_torch_load

    name = "InferenceCudaGraphScope"
    installed = vars(enums).get(name)
    if installed is not None and not issubclass(installed, NewerEnumMember):
        pytest.skip(f"the installed megatron-core has {name}: nothing newer to stand in for")

    class Scope(enum.Enum):  # 0.19's enum, as pickle names it
        none, layer, block = 1, 2, 3

    Scope.__module__, Scope.__qualname__, Scope.__name__ = enums.__name__, name, name

    def with_real_enum(action):
        current = vars(enums).get(name)
        setattr(enums, name, Scope)
        try:
            return action()
        finally:
            if current is None:
                delattr(enums, name)
            else:
                setattr(enums, name, current)

    written = io.BytesIO()
    with_real_enum(lambda: torch.save({"args": argparse.Namespace(inference_cuda_graph_scope=Scope.layer)}, written))
    state = safe_torch_load(io.BytesIO(written.getvalue()), "0.19 common state")
    member = state["args"].inference_cuda_graph_scope
    assert isinstance(member, NewerEnumMember) and member.value == 2
    again = io.BytesIO()
    torch.save(state, again)
    again.seek(0)
    with torch.serialization.safe_globals([argparse.Namespace, Scope]):
        back = with_real_enum(lambda: torch.load(again, weights_only=True))
    assert back["args"].inference_cuda_graph_scope is Scope.layer
