"""Live weight sync: a megatron-core model at TP2, then at PP2, then a Qwen3-MoE model at EP2, refits a running
vLLM through ``distconv.weights`` and the ``distconv_gloo`` engine, and vLLM then computes what transformers
computes on ``distconv.export``'s folder of the same weights. A sync that fails (a NaN, a rank that dies)
fails on every rank that is left and is never finished.

One torchrun launch (tests/live_jobs.py, 2 ranks) and one vLLM process (tests/vllm_live.py, in
the vLLM venv, in-process engine) run side by side; see those files for the steps.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from conftest import ROOT, subprocess_env, torchrun
from live_jobs import MAX_TOKENS, PROMPTS
from test_vllm import TOL, VENV, _max_diff, _transformers, _unavailable


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> dict:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    assert PROMPTS and MAX_TOKENS == 8  # the reference (test_vllm._transformers) uses test_vllm's, the same
    work = tmp_path_factory.mktemp("live")
    started = time.perf_counter()
    with open(work / "vllm.log", "w") as log:
        server = subprocess.Popen([str(VENV / "bin" / "python"), str(ROOT / "tests" / "vllm_live.py"), str(work)],
                                  env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, cwd=work)
        try:
            proc = torchrun(2, str(ROOT / "tests" / "live_jobs.py"), str(work), timeout=900, check=False)
            server.wait(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    seconds = time.perf_counter() - started
    ranks = [work / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 and all(r.exists() for r in ranks), (
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}\n"
        f"vLLM:\n{(work / 'vllm.log').read_text()[-6000:]}")
    print(f"live sync test: {seconds:.0f} s for the torchrun job and the vLLM process")
    return {"work": work, "ranks": [json.loads(r.read_text()) for r in ranks],
            "vllm": json.loads((work / "vllm_live.json").read_text())}


@pytest.mark.parametrize("round_", [1, 2, 3, 4, 5])  # TP2, TP2, PP2 (each stage sending), Qwen3-MoE at EP2 twice (each EP rank too)
def test_synced_vllm_matches_transformers_on_the_export(live, round_):
    result = live["ranks"][0]["rounds"][round_ - 1]
    vllm = result["vllm"]
    assert "error" not in vllm, vllm.get("error")
    tokens, prompt_logprobs = _transformers(live["work"] / f"hf{round_}")
    diff = _max_diff(vllm["prompt_logprobs"], prompt_logprobs)
    print(f"sync {round_}: {result['sync']['seconds']:.2f} s, {result['sync']['groups']} groups; "
          f"max |prompt logprob difference| vLLM - transformers = {diff:.2e}")
    assert diff <= TOL
    assert vllm["tokens"] == tokens


def test_a_sync_from_the_checkpoint_serves_its_weights(live):
    """distconv.weights(load=ckpt1) after round 3: vLLM serves round 1's weights again."""
    result = live["ranks"][0]["from_checkpoint"]
    tokens, prompt_logprobs = _transformers(live["work"] / "hf1")
    assert _max_diff(result["vllm"]["prompt_logprobs"], prompt_logprobs) <= TOL
    assert result["vllm"]["tokens"] == tokens
    assert _max_diff(result["vllm"]["prompt_logprobs"], live["ranks"][0]["rounds"][2]["vllm"]["prompt_logprobs"]) > 10 * TOL


def test_each_sync_served_different_weights(live):
    served = [r["vllm"]["prompt_logprobs"] for r in live["ranks"][0]["rounds"]]
    assert all(_max_diff(a, b) > 10 * TOL for a, b in zip(served, served[1:]))


def test_training_state_is_untouched_and_the_pass_is_the_export(live):
    for rank in live["ranks"]:
        for result in rank["rounds"]:
            assert result["identical"] and result["grads_untouched"]
    first = live["ranks"][0]["rounds"][0]
    assert first["fp32_pass_equals_export"] is True
    assert first["bf16_pass_equals_export"] is True
    assert first["fp8_pass_equals_export"] is True  # e4m3 weights and their float32 weight_scale_inv
    assert "model.layers.1.mlp.down_proj.weight" in first["fp8_tensors"]
    # TP2: rank 0 sends every group (the embedding, each layer, the final norm and output layer)
    tp2, pp2 = live["ranks"][0]["groups"]
    assert [len(g) for g in tp2] == [1, 9, 9, 2] and tp2[-1] == ["model.norm.weight", "lm_head.weight"]
    # PP2 with senders="holders": each stage sends its own groups, and nothing is gathered
    assert [len(g) for g in pp2] == [1, 9] and pp2[1][0].startswith("model.layers.0.")
    stage2 = live["ranks"][1]["groups"][1]
    assert [len(g) for g in stage2] == [9, 2] and stage2[0][0].startswith("model.layers.1.") and stage2[1] == tp2[-1]
    assert not any(live["ranks"][0]["pp2_gathered"])
    assert live["ranks"][1]["groups"][0] == []  # TP2: rank 1 only takes part in the gathers


def _expert(name: str) -> int | None:
    m = re.search(r"\.mlp\.experts\.(\d+)\.", name)
    return int(m[1]) if m else None


def test_each_ep_rank_sends_its_own_experts_into_one_update_per_layer(live):
    """EP2 with senders="holders": a layer's group (attention, router, all 8 experts) is one
    ``update_weights``, but each EP rank yields and sends its own 4 experts (nothing is gathered),
    and rank 0 the rest (it holds the replicated tensors); tied embeddings: no lm_head."""
    rank0, rank1 = live["ranks"]
    moe = rank0["moe_groups"]
    assert [len(g) for g in moe] == [1, 9 + 8 * 3, 9 + 8 * 3, 1] and moe[-1] == ["model.norm.weight"]
    assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(8)} <= set(moe[2])
    assert rank1["moe_groups"] == moe[1:3]  # whole layer groups: the ones it yields names of
    names = [n for g in moe for n in g]
    own = {0: range(0, 4), 1: range(4, 8)}  # EP rank r holds experts 4r .. 4r+3
    for r, rank in enumerate(live["ranks"]):
        experts = {n for n in rank["moe_held"] if _expert(n) is not None}
        assert experts == {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer in (0, 1)
                           for e in own[r] for proj in ("gate_proj", "up_proj", "down_proj")}
    assert sorted(rank0["moe_held"] + rank1["moe_held"]) == sorted(names)  # each name held by one rank
    for rank in live["ranks"]:  # iter_groups(): its groups whole, a tensor for its own names, None for the rest
        assert [g for g, _ in rank["moe_iter"]] == rank["moe_groups"]
        assert sorted(n for g, has in rank["moe_iter"] for n, h in zip(g, has) if h) == rank["moe_held"]
    assert not any(_expert(n) is not None for n in rank0["moe_gathered"])  # no expert gathered elsewhere
    assert rank0["moe_gathered"] == []  # nor anything else: the rest is rank 0's own replica
    want = [[int(_expert(n) is not None and _expert(n) >= 4) for n in g] for g in moe]
    assert rank0["moe_holders"] == rank1["moe_holders"] == want
    assert rank0["moe_senders"] == rank1["moe_senders"] == [0, 1]
    # what vLLM got in round 5: one update per layer group, naming each tensor's sender (the gloo
    # group's rank: the trainer's rank here), both ranks within one layer's update
    updates = rank0["moe_updates"]
    assert [u["names"] for u in updates] == moe and [u["srcs"] for u in updates] == want
    assert [sorted(set(u["srcs"])) for u in updates] == [[0], [0, 1], [0, 1], [0]]


def test_a_failed_sync_fails_every_rank_and_never_finishes(live):
    ranks = live["ranks"]
    messages = [r["failure"] for r in ranks]
    assert all(m is not None and "NaN or Inf" in m and "model.layers.1.mlp.down_proj.weight" in m for m in messages)
    calls = ranks[0]["calls"]
    last_start = len(calls) - 1 - calls[::-1].index("start")
    # the failed sync: started, the groups before layer 1 sent, never finished
    assert calls[last_start:] == ["start", "update", "update"]
    assert calls.count("finish") == 4 and "failed" not in " ".join(calls)
    served = ranks[0]["served_after_failure"]
    # layer 1 and the rest wait on the meta device: vLLM refuses to compute rather than serve mixed weights
    assert "error" in served and "meta" in served["error"], served


def test_a_rank_that_dies_mid_sync_fails_the_others_and_vllm_is_never_finished(live):
    """Rank 1 dies after the first group went to vLLM: rank 0 raises one readable error (the
    survivor at 2 ranks; it learns from the closed connections, not at a timeout), vLLM got
    ``start`` and one ``update`` and no ``finish``, and then refuses to compute."""
    rank0 = live["ranks"][0]
    killed = rank0["killed"]
    assert killed is not None and "lost contact with another rank" in killed["error"], killed
    assert killed["seconds"] < 30, killed  # the source's timeout is 1800 s, the link's 120 s
    calls = rank0["calls_killed"]
    last_start = len(calls) - 1 - calls[::-1].index("start")
    assert calls[last_start:] == ["start", "update"]
    assert calls.count("serve") == 1 and calls[calls.index("serve"):].count("finish") == 2  # rounds 4 and 5 only
    served = rank0["served_after_killed"]
    assert "error" in served and "meta" in served["error"], served


def test_vllm_refuses_an_update_naming_a_source_that_is_no_sender(live):
    """``srcs`` comes from outside (an HTTP body): a rank that is no trainer's sender is refused
    before anything is received."""
    refused = live["ranks"][0]["bad_src"]
    assert refused is not None and "src 2 is not a sender's rank (0 to 1)" in refused, refused
