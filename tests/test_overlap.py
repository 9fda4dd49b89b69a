"""``Engine(overlap=True)``: one group's forward runs on a worker while the other's is decoded.

Each request's tokens do not depend on which requests share its pass (the batched step is
exact against each request alone), so an overlapped engine must give every seeded request the
tokens the engine gives it without overlap; these tests check that, and the page lifetimes
and failures that overlap changes (issue #24).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading

import pytest

from foretell import DecodeParams
from foretell.engine.engine import Engine
from foretell.models.registry import LoadedModel
from tests.benchmark_scripts import script_module

MIXES = ("every-kind-llada", "every-kind-dream", "every-kind-block")


@pytest.fixture(scope="module")
def bench():
    with script_module("host_overhead") as module:
        yield module


def seeded_requests(bench, loaded: LoadedModel, mix: str, count: int) -> list[tuple]:
    """``count`` requests of one of host_overhead.py's every-kind mixes, each with a seed of
    its own (so that its draws are its own, whichever pass it shares)."""
    stream = bench.mix_stream(loaded, seed=1, mix=mix)
    return [
        (prompt, dataclasses.replace(params, seed=index))
        for index, (prompt, params) in enumerate(itertools.islice(stream, count))
    ]


def engine_for(loaded: LoadedModel, overlap: bool | str, max_num_seqs: int = 8, **kw) -> Engine:
    kw = {"max_num_batched_tokens": 1 << 20, "kv_cache_memory": None, **kw}
    kw.setdefault("forward_chunk_tokens", None)
    return Engine(
        LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, path=loaded.path),
        max_num_seqs=max_num_seqs,
        overlap=overlap,
        **kw,
    )


def record_passes(engine: Engine, passes: list[int]) -> None:
    """Append each batch ``engine``'s scheduler hands out to ``passes`` (its size)."""
    schedule = engine.scheduler.schedule

    def recorded(*args, **kwargs):
        batch = schedule(*args, **kwargs)
        passes.append(len(batch))
        return batch

    engine.scheduler.schedule = recorded


def step_outputs(engine: Engine, done: dict, steps: int = 5000) -> None:
    """Step ``engine`` until it has nothing left, or ``steps`` steps, putting each finished
    request's finish and tokens in ``done``."""
    for _ in range(steps):  # bounded: a scheduler that goes round in circles fails, not hangs
        if not engine.has_unfinished_requests():
            return
        for out in engine.step():
            done[out.request_id] = (out.finish_reason, tuple(out.token_ids))


def run_all(engine: Engine, requests: list[tuple], passes: list | None = None) -> list[tuple]:
    """Step ``engine`` through ``requests``; each one's finish and tokens, in order. With
    ``passes``, each scheduled batch's size is appended to it."""
    if passes is not None:
        record_passes(engine, passes)
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    done: dict = {}
    step_outputs(engine, done)
    assert not engine.has_unfinished_requests(), f"{len(done)} of {len(ids)} finished"
    return [done[i] for i in ids]


def tokens_of(outputs) -> list[tuple]:
    return [(out.finish_reason, tuple(out.token_ids)) for out in outputs]


@pytest.mark.parametrize("mix", MIXES)
def test_overlap_gives_every_seeded_request_the_same_tokens(bench, mix) -> None:
    loaded = bench.micro_model(0, bench.mix_family(mix))
    requests = seeded_requests(bench, loaded, mix, 20)
    prompts, params = [p for p, _ in requests], [q for _, q in requests]
    alone = engine_for(loaded, overlap=False).generate(prompts, params, use_tqdm=False)
    overlapped = engine_for(loaded, overlap=True)
    outputs = overlapped.generate(prompts, params, use_tqdm=False)
    assert tokens_of(outputs) == tokens_of(alone)
    assert all(out.finish_reason != "error" for out in outputs)
    assert overlapped.kv_pool.used_bytes == 0 and not overlapped.has_unfinished_requests()


def test_overlap_with_the_forward_in_chunks_gives_the_same_tokens(bench) -> None:
    """The worker runs a pass in chunks of whole sequences as the engine's own thread does."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 12)
    chunked = {"forward_chunk_tokens": 96}
    alone = engine_for(loaded, overlap=False, **chunked)
    overlapped = engine_for(loaded, overlap=True, **chunked)
    assert run_all(overlapped, requests) == run_all(alone, requests)


def test_the_groups_take_turns_and_the_forward_runs_on_a_worker(bench) -> None:
    """Each pass holds at most half of ``max_num_seqs``; a pass is scheduled while the one
    before it is in flight and shares none of its requests (their canvases are a step
    behind until it is decoded); the forward runs on another thread than the engine's."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 16)
    engine = engine_for(loaded, overlap=True, max_num_seqs=8)
    passes, threads = [], set()
    model = loaded.model
    original = type(model).forward_packed

    def spied(self, input_ids, positions, seq_lens, *args, **kwargs):
        threads.add(threading.get_ident())
        return original(self, input_ids, positions, seq_lens, *args, **kwargs)

    schedule = engine.scheduler.schedule

    def recorded(in_flight=(), group_size=None):
        batch = schedule(in_flight, group_size)
        flying = {req.request_id for req in in_flight}
        passes.append(({req.request_id for req in batch}, flying))
        return batch

    engine.scheduler.schedule = recorded
    type(model).forward_packed = spied
    try:
        for prompt, params in requests:
            engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        type(model).forward_packed = original
    batches = [batch for batch, _ in passes if batch]
    assert len(batches) > 10 and all(len(batch) <= 4 for batch in batches)
    # Scheduled beside the pass in flight, never with its requests; and mostly beside one.
    assert all(not (batch & flying) for batch, flying in passes)
    assert sum(bool(batch and flying) for batch, flying in passes) > len(batches) // 2
    # The pass before it (the one in flight then) was the other group's.
    for (before, _), (_, flying) in itertools.pairwise(passes):
        assert not before or flying == before
    assert threads and threading.get_ident() not in threads
    assert engine.kv_pool.used_bytes == 0


def test_an_abort_in_flight_waits_for_its_pass(bench) -> None:
    """An abort of a request whose forward is running takes effect once that pass is
    decoded: its KV pages stay its own until then (the forward writes them), then every
    page comes back; the other requests get the tokens they get without the abort."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 12)
    cached = [i for i, (_, p) in enumerate(requests) if p.kv_cache is not None]
    assert cached  # the mix has cached requests
    engine = engine_for(loaded, overlap=True, max_num_seqs=8)
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    engine.step()  # the first group's forward starts
    flight = engine._in_flight
    held = [r for r in flight.batch if r.kv_pages]
    assert held  # a cached request is in flight
    req = held[0]
    victim = req.request_id
    used = engine.kv_pool.used_bytes
    engine.abort(victim)
    assert not req.is_finished and req.canvas_row is not None  # still its own
    assert req.kv_pages and engine.kv_pool.used_bytes == used  # its pages too
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert outputs[victim].finish_reason == "aborted"
    assert engine.kv_pool.used_bytes == 0 and not engine._aborts_after_pass
    reference = engine_for(loaded, overlap=False)
    others = [i for i in ids if i != victim]
    kept = [requests[ids.index(i)] for i in others]
    expect = reference.generate([p for p, _ in kept], [q for _, q in kept], use_tqdm=False)
    assert tokens_of(outputs[i] for i in others) == tokens_of(expect)


def test_a_forward_that_fails_on_the_worker_fails_only_its_request(bench) -> None:
    """A pass whose forward fails on the worker is run again in halves, as without overlap:
    only the request that fails alone ends with an error."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 10)
    # Request 3's canvas alone reaches position FAR: a pass that holds it fails.
    far = max(len(p) + q.gen_length for p, q in requests) + 16
    prompts = [p for p, _ in requests]
    prompts[3] = (prompts[3] * far)[:far]
    params = [q for _, q in requests]
    model = loaded.model
    original = type(model).forward_packed

    def failing(self, input_ids, positions, *args, **kwargs):
        if bool((positions >= far).any()):
            raise RuntimeError("injected")
        return original(self, input_ids, positions, *args, **kwargs)

    type(model).forward_packed = failing
    try:
        alone = engine_for(loaded, overlap=False).generate(prompts, params, use_tqdm=False)
        overlapped = engine_for(loaded, overlap=True)
        outputs = overlapped.generate(prompts, params, use_tqdm=False)
    finally:
        type(model).forward_packed = original
    assert outputs[3].finish_reason == "error" and "forward pass failed" in outputs[3].error
    assert tokens_of(outputs) == tokens_of(alone)
    assert overlapped.kv_pool.used_bytes == 0


def test_overlap_takes_only_its_modes_and_two_groups(bench) -> None:
    loaded = bench.micro_model(0, "llada")
    with pytest.raises(ValueError, match="overlap: must be False, True, 'thread' or 'process'"):
        engine_for(loaded, overlap="yes")
    assert engine_for(loaded, overlap=True).overlap == "thread"
    assert engine_for(loaded, overlap=False).overlap is None
    with pytest.raises(ValueError, match="overlap: needs max_num_seqs >= 2"):
        engine_for(loaded, overlap=True, max_num_seqs=1)


def test_an_abort_of_a_request_in_its_last_pass_leaves_it_finished(bench) -> None:
    """A request aborted while its last pass is in flight ends on its own when that pass is
    decoded: its output and its tokens are counted as any finished request's."""
    loaded = bench.micro_model(0, "llada")
    engine = engine_for(loaded, overlap=True, max_num_seqs=4)
    params = DecodeParams(gen_length=8, steps=1, block_length=8, seed=3)
    victim = engine.add_request([5, 6, 7], params)
    engine.step()  # its one pass is in flight
    assert victim in engine._in_flight.request_ids
    engine.abort(victim)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [(victim, "steps")]
    assert engine.metrics.generated_tokens == 8 and not engine._aborts_after_pass


def test_block_requests_short_of_pages_all_finish_with_overlap(bench) -> None:
    """Block-causal requests whose pages grow a block at a time, in a pool too small for all:
    a request that needs pages held by younger requests in flight waits a step for them
    rather than preempt itself (which could go on forever), and every request gets the
    tokens it gets without overlap, in about as many passes."""
    loaded = bench.micro_model(0, bench.mix_family("every-kind-block"))
    requests = seeded_requests(bench, loaded, "every-kind-block", 24)
    tight = {"kv_cache_memory": 19 * 2048, "max_num_seqs": 8}
    alone = engine_for(loaded, overlap=False, **tight)
    expect = run_all(alone, requests)
    overlapped = engine_for(loaded, overlap=True, **tight)
    passes: list[int] = []
    assert run_all(overlapped, requests, passes) == expect
    assert overlapped.scheduler.num_preemptions > 0  # the pool was short
    assert overlapped.metrics.steps <= 3 * alone.metrics.steps
    assert max(passes) <= 4 and overlapped.kv_pool.used_bytes == 0


def test_a_group_stays_within_its_size_under_a_token_budget_and_after_close(bench) -> None:
    """Every pass holds at most half of ``max_num_seqs``, when the token budget leaves
    requests out and after ``close()`` (which merges the groups for a step); the tokens are
    those without overlap."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 16)
    expect = run_all(engine_for(loaded, overlap=False), requests)
    budget = engine_for(loaded, overlap=True, max_num_batched_tokens=820)
    passes: list[int] = []
    assert run_all(budget, requests, passes) == expect
    assert max(passes) <= 4
    engine = engine_for(loaded, overlap=True)
    passes = []
    record_passes(engine, passes)
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    done: dict = {}
    step_outputs(engine, done, steps=5)
    engine.close()  # the pass in flight is dropped: its requests run it again
    assert engine._in_flight is None
    step_outputs(engine, done)
    assert not engine.has_unfinished_requests()
    assert [done[i] for i in ids] == expect
    assert max(passes) <= 4 and sum(1 for n in passes[5:] if n) > 10
