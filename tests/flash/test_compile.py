"""The compiled engine (`compile=` a torch.compile backend): what a GPU's graph capture needs, proved
on the CPU with `aot_eager` (exact, and compiles in seconds). Float64 tokens equal Hugging Face
`generate()` with rows admitted mid-flight, rows leaving and ragged acceptance; each pass shape
(bucket, block width, span, cache capacity) is compiled once, with no graph break, and never again; a pass that
cannot be compiled falls back to eager, says why, and loses nothing."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import flash
from bench.oracle import OracleDrafter
from tests.flash.test_engine import MAX_NEW, _requests, _run
from tests.helpers import hf_greedy

ADMIT_AT = {0: 2, 2: 1, 3: 2, 7: 1}  # joins while others decode, sometimes several at once


@pytest.fixture
def fresh_dynamo(targets64):
    """No graph compiled by an earlier test: counters and caches start empty."""
    torch._dynamo.reset()
    counters.clear()
    for target in targets64.values():
        target._passes.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "family",
    [
        "qwen2_5_vl",
        pytest.param("llava_onevision", marks=pytest.mark.slow),
        pytest.param("qwen3_vl", marks=pytest.mark.slow),
    ],
)
def test_compiled_engine_is_lossless_and_compiles_each_shape_once(targets64, family, fresh_dynamo):
    target = targets64[family]
    requests = _requests(target, family, 7, seed=5)
    alone = [hf_greedy(target, r, MAX_NEW) for r in requests]
    assert len({len(a) for a in alone}) >= 2  # rows leave in different cycles
    drafters = {
        "plain": None,
        "oracle_partly_right": OracleDrafter(alone, target.vocab_size, 4, right_for=2),  # ragged acceptance
    }
    if family != "qwen2_5_vl":  # the default run keeps to two engines (suite time); make test-slow adds this
        drafters["flash_untrained"] = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=4))
    shapes: set = set()
    for name, drafter in drafters.items():
        engine = flash.Engine(target, drafter, max_new_tokens=MAX_NEW, compile="aot_eager", max_rows=8)
        got = _run(engine, requests, ADMIT_AT)
        assert [got[i] for i in range(len(requests))] == alone, name
        assert engine.compile_status == {"active": True, "fallback": None}, name
        shapes |= engine._slots.session.shapes
    draft_shapes = getattr(drafters.get("flash_untrained"), "shapes", set())  # its steps are captured too
    assert counters["graph_break"] == {}, dict(counters["graph_break"])
    # one graph per pass shape, each compiled once over three runs (new lengths, rows, blocks)
    graphs = len(shapes) + len(draft_shapes)
    assert counters["stats"]["unique_graphs"] == graphs, (dict(counters["stats"]), sorted(shapes), draft_shapes)
    assert {shape[1] for shape in shapes} == {1, 5}  # plain cycles and blocks of 4


def test_compiled_draft_steps_are_lossless_and_compile_each_shape_once(targets64, fresh_dynamo):
    """A FLASH drafter's steps are captured too: with rows joining and leaving, each draft-step shape
    (bucket, width, span, capacity) is compiled once, a second engine compiles nothing, and the
    tokens are the target's own."""
    target = targets64["qwen2_5_vl"]
    requests = _requests(target, "qwen2_5_vl", 7, seed=5)
    alone = [hf_greedy(target, r, MAX_NEW) for r in requests]
    drafter = flash.FlashDrafter.for_target(target, flash.DrafterConfig(block_size=4))
    for run in range(2):
        engine = flash.Engine(target, drafter, max_new_tokens=MAX_NEW, compile="aot_eager", max_rows=8)
        got = _run(engine, requests, ADMIT_AT)
        assert [got[i] for i in range(len(requests))] == alone
        assert engine.compile_status == {"active": True, "fallback": None}
        if run == 0:
            graphs = counters["stats"]["unique_graphs"]
            target_shapes = engine._slots.session.shapes
    assert counters["graph_break"] == {}, dict(counters["graph_break"])
    assert drafter.shapes and all(span % 64 == 0 or span in (96, 192) for _, _, span, _ in drafter.shapes)
    assert counters["stats"]["unique_graphs"] == graphs == len(target_shapes) + len(drafter.shapes)


def test_compiled_engine_reuses_graphs_across_engines(targets64, fresh_dynamo):
    """A second engine on the same target (the next Ray batch) compiles nothing new."""
    target = targets64["qwen2_5_vl"]
    requests = _requests(target, "qwen2_5_vl", 4, seed=6)
    for _ in range(2):
        engine = flash.Engine(target, None, max_new_tokens=MAX_NEW, compile="aot_eager", max_rows=4)
        _run(engine, requests, {0: 3})
        if _ == 0:
            first = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == first > 0


def test_a_pass_that_cannot_compile_falls_back_to_eager(targets64, fresh_dynamo):
    target = targets64["qwen2_5_vl"]
    requests = _requests(target, "qwen2_5_vl", 3, seed=7)
    alone = [hf_greedy(target, r, MAX_NEW) for r in requests]

    @torch._dynamo.register_backend(name="flashcap_test_broken")
    def broken(gm, example_inputs):
        raise RuntimeError("this backend cannot capture anything")

    engine = flash.Engine(target, None, max_new_tokens=MAX_NEW, compile="flashcap_test_broken", max_rows=4)
    got = _run(engine, requests, {0: 2})
    assert [got[i] for i in range(3)] == alone
    status = engine.compile_status
    assert status["active"] is False and "cannot capture anything" in status["fallback"]


def test_hybrid_targets_decode_eager_and_say_why(targets64, fresh_dynamo):
    """Qwen3.5's linear-attention rollback is not capturable: the engine decodes eager, exactly."""
    target = targets64["qwen3_5"]
    requests = _requests(target, "qwen3_5", 3, seed=7)
    alone = [hf_greedy(target, r, MAX_NEW) for r in requests]
    engine = flash.Engine(target, None, max_new_tokens=MAX_NEW, compile="aot_eager", max_rows=4)
    got = _run(engine, requests, {0: 2})
    assert [got[i] for i in range(3)] == alone
    assert engine.compile_status["active"] is False and "linear-attention" in engine.compile_status["fallback"]
    assert counters["stats"]["unique_graphs"] == 0


def _moe_engine_run(target) -> flash.Engine:
    """A row admitted mid-flight on a compiled MoE engine (a partly right oracle): tokens equal generate()."""
    requests = _requests(target, "qwen3_vl_moe", 2, seed=5)
    alone = [hf_greedy(target, r, 8) for r in requests]
    oracle = OracleDrafter(alone, target.vocab_size, 4, right_for=2)
    engine = flash.Engine(target, oracle, max_new_tokens=8, compile="aot_eager", max_rows=2)
    got = _run(engine, requests, {0: 1, 1: 1})
    assert [got[i] for i in range(len(requests))] == alone
    return engine


def test_moe_targets_capture_with_the_grouped_experts_kernel(tiny_checkpoints, fresh_dynamo):
    """A MoE target in float32 (HF's grouped-matmul experts, what bfloat16 runs on a GPU) is captured
    whole, with no graph break."""
    engine = _moe_engine_run(flash.load_target(tiny_checkpoints["qwen3_vl_moe"], dtype=torch.float32))
    assert engine.compile_status == {"active": True, "fallback": None}
    assert counters["graph_break"] == {} and counters["stats"]["unique_graphs"] > 0


def test_moe_targets_with_eager_experts_decode_eager_and_say_why(targets64, fresh_dynamo):
    """In float64 HF's eager experts loop over the experts a batch hit (a data-dependent loop): the
    engine decodes eager, exactly, and says why."""
    engine = _moe_engine_run(targets64["qwen3_vl_moe"])
    assert engine.compile_status["active"] is False and "expert" in engine.compile_status["fallback"]
