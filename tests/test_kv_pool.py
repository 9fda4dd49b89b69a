"""The KV pool and admission: pages, page tables, fair admission, the token budget.

A pool just big enough for one cached request makes every admission decision visible: who
passes a head that waits for pages, when the head's age bound holds the room for it, and that
every page comes back however a request ends.
"""

from __future__ import annotations

import pytest
import torch

import foretell.engine.engine as engine_module
from foretell import DecodeParams, Engine, Prophet
from foretell.engine.kv_cache import KVPool
from foretell.models import attention
from foretell.models.tiny import tiny_model

DUAL = DecodeParams(gen_length=16, block_length=8, steps=16, kv_cache="dual")


@pytest.fixture(scope="module")
def llada():
    return tiny_model("llada", seed=3, dtype="float64")


def _pages(engine: Engine, prompt: str, gen_length: int) -> int:
    return engine.kv_pool.pages_for(len(engine.tokenizer(prompt)["input_ids"]) + gen_length)


def _engine(llada, pages: int, **kwargs) -> Engine:
    """An engine whose pool holds exactly ``pages`` pages of 8 positions."""
    probe = Engine(llada, dtype="float64", kv_page_size=8)
    return Engine(
        llada,
        dtype="float64",
        kv_page_size=8,
        kv_cache_memory=pages * probe.kv_pool.page_bytes,
        **kwargs,
    )


def _run(engine: Engine) -> dict[str, int]:
    """Step until done; the step at which each request finished."""
    done, step = {}, 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            done[out.request_id] = step
        assert engine.kv_pool.used_pages <= engine.kv_pool.num_pages
    return done


def test_pool_pages_and_slots(llada) -> None:
    pool = KVPool(llada.model, torch.device("cpu"), 10**9, page_size=4, max_pages=5)
    assert pool.num_pages == 5  # capped by what the engine could ever hold
    assert pool.pages_for(1) == 1 and pool.pages_for(4) == 1 and pool.pages_for(5) == 2
    first = pool.allocate(2)
    second = pool.allocate(2)
    assert first == [0, 1] and second == [2, 3] and pool.free_pages == 1
    assert pool.slots(second, 6).tolist() == [8, 9, 10, 11, 12, 13]
    pool.free(first)
    assert pool.free_pages == 3 and pool.used_bytes == 2 * pool.page_bytes
    # The tensor holds the pages handed out so far: layers, K/V, slots, kv heads, head dim.
    assert pool.capacity == 4 and pool.storage.shape == (2, 2, 16, 2, 16)
    pool.storage[0, 0, 8] = 7.0  # page 2 stores something; growing keeps it
    assert pool.allocate(2) == [0, 1] and pool.allocate(1) == [4] and pool.capacity == 5
    assert pool.storage.shape[2] == 20 and bool((pool.storage[0, 0, 8] == 7.0).all())


def test_a_pool_calls_before_grow_only_when_it_replaces_a_stored_tensor(llada) -> None:
    """``before_grow`` (an overlapped engine waits there for its forward in flight) runs
    before a tensor that holds pages is copied into a larger one, not at the first page nor
    when the pages fit."""
    pool = KVPool(llada.model, torch.device("cpu"), 10**9, page_size=4, max_pages=8)
    calls = []
    pool.before_grow = lambda: calls.append(pool.capacity)
    pool.allocate(1)
    assert calls == [] and pool.capacity == 1
    pool.allocate(1)  # 1 page held -> 2
    pool.allocate(2)  # 2 -> 4
    pool.free([0])
    pool.allocate(1)  # page 0 again: it fits
    assert calls == [1, 2] and pool.capacity == 4


def test_a_pool_without_a_byte_limit_holds_only_what_is_used(llada) -> None:
    """None means no limit but what the engine could use: the tensor still grows only with
    the pages its requests hold (an unlimited token budget would otherwise ask for terabytes)."""
    engine = Engine(llada, dtype="float64", kv_cache_memory=None, max_num_batched_tokens=2**30)
    assert engine.kv_pool.num_pages >= 2**30 // 16 and engine.kv_pool.capacity == 0
    engine.generate(["12+34="], DUAL, use_tqdm=False)
    assert engine.kv_pool.capacity == _pages(engine, "12+34=", 16)
    with pytest.raises(ValueError, match=r"^kv_page_size: "):
        KVPool(llada.model, torch.device("cpu"), 10**9, page_size=0)


def test_smaller_and_cache_free_requests_pass_a_blocked_head(llada) -> None:
    probe = Engine(llada, dtype="float64", kv_page_size=8)
    big, small = "what is 7*8? and 9*9?", "1+1="
    need_big, need_small = _pages(probe, big, 16), _pages(probe, small, 16)
    assert need_big > need_small
    engine = _engine(llada, need_big + need_small)
    first = engine.add_request(big, DUAL)  # holds most of the pool
    head = engine.add_request(big, DUAL)  # must wait for the first's pages
    smaller = engine.add_request(small, DUAL)  # fits beside the first
    free = engine.add_request(big, DUAL.replace(kv_cache=None))  # needs no pages
    engine.step()
    running = {r.request_id for r in engine.scheduler.running}
    assert running == {first, smaller, free}
    assert [r.request_id for r in engine.scheduler.waiting] == [head]
    done = _run(engine)
    assert done[head] > done[first]
    assert engine.kv_pool.free_pages == engine.kv_pool.num_pages


def _starts(engine: Engine) -> tuple[dict[str, int], dict[str, int]]:
    """Step until done; the step at which each request joined the batch, and finished."""
    started: dict[str, int] = {}
    done: dict[str, int] = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            done[out.request_id] = step
        for req in engine.scheduler.running:
            started.setdefault(req.request_id, step)
        for rid in done:
            started.setdefault(rid, step)
    return started, done


@pytest.mark.parametrize("bound", [3, 1000])
def test_head_is_admitted_within_its_age_bound(llada, bound) -> None:
    """Small requests pass a head that waits for pages until it has waited ``max_head_wait``
    steps; from then on the pages freed go to the head. Without a binding bound (1000), the
    small requests keep passing it."""
    probe = Engine(llada, dtype="float64", kv_page_size=8)
    big, small = "what is 7*8? and 9*9?", "1+1="
    need_big, need_small = _pages(probe, big, 16), _pages(probe, small, 16)
    long = DUAL.replace(gen_length=32, steps=32)
    need_keeper = _pages(probe, small, 32)
    assert need_big > need_small
    engine = _engine(llada, need_keeper + need_small, max_head_wait=bound)
    # A long request keeps part of the pool, so the head never fits beside it.
    keeper = engine.add_request(small, long)
    head = engine.add_request(big, DUAL)
    smalls = [engine.add_request(small, DUAL) for _ in range(4)]
    started, done = _starts(engine)
    assert started[keeper] == 1 and started[smalls[0]] == 1  # passed the head at once
    assert engine.kv_pool.free_pages == engine.kv_pool.num_pages
    if bound == 3:
        # The head joins the step after the keeper's pages come back, before any small
        # request that was still waiting when its bound ran out.
        assert started[head] == done[keeper] + 1
        assert all(started[s] >= started[head] for s in smalls[1:])
    else:
        assert started[smalls[1]] == done[smalls[0]] + 1 < started[head]


def test_every_page_returns_on_finish_commit_abort_and_error(
    llada, monkeypatch, fail_greedy_step
) -> None:
    engine = Engine(llada, dtype="float64", kv_page_size=8)
    pool = engine.kv_pool
    total = pool.num_pages
    # Finish.
    engine.generate(["12+34="], DUAL, use_tqdm=False)
    assert pool.free_pages == total
    # Early commit.
    commit = DUAL.replace(gen_length=32, steps=32, early_commit=Prophet((0.0,) * 3))
    (out,) = engine.generate(["12+34="], commit, use_tqdm=False)
    assert out.finish_reason == "early_commit" and pool.free_pages == total
    # Abort, waiting and running.
    running = engine.add_request("12+34=", DUAL)
    engine.step()
    assert pool.free_pages < total
    waiting = engine.add_request("12+43=", DUAL)
    engine.abort(waiting)
    engine.abort(running)
    engine.step()
    assert pool.free_pages == total and not engine.has_unfinished_requests()
    # Error inside decoding.
    real = engine_module.advance

    def failing(req, *args):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine_module, "advance", failing)
    engine.runner.batched = False  # the per-request step
    engine.add_request("12+34=", DUAL.replace(temperature=0.5, early_commit=Prophet()))
    (out,) = engine.step()
    assert out.finish_reason == "error" and pool.free_pages == total
    monkeypatch.setattr(engine_module, "advance", real)
    engine.runner.batched = True
    fail_greedy_step(lambda req: True)
    engine.add_request("12+34=", DUAL)  # the batched step
    (out,) = engine.step()
    assert out.finish_reason == "error" and pool.free_pages == total


def test_request_that_could_never_fit_is_refused_at_admission(llada) -> None:
    engine = _engine(llada, 2)  # 16 positions
    need = _pages(engine, "what is 7*8?", 16)
    assert need > 2
    with pytest.raises(ValueError, match=rf"^kv_cache_memory: .*needs {need} pages"):
        engine.add_request("what is 7*8?", DUAL)
    assert not engine.has_unfinished_requests() and engine.kv_pool.free_pages == 2
    engine.add_request("what is 7*8?", DUAL.replace(kv_cache=None))  # needs no pages


def test_cached_steps_are_charged_the_tokens_they_run(llada) -> None:
    """Every pass's query tokens equal the sum of its requests' ``step_tokens``, and under a
    token budget of one canvas and a bit, a second cached request runs beside the first in its
    cached steps (charged a block), where charging canvases would keep it waiting."""
    prophet = Prophet((1e9,) * 3, answer_start=10, answer_length=4)
    mixed = [
        DUAL,
        DUAL.replace(kv_cache="prefix"),
        DUAL.replace(early_commit=prophet),
        DUAL.replace(early_commit=Prophet((1e9,) * 3)),
        DUAL.replace(kv_cache=None),
    ]
    engine = Engine(llada, dtype="float64", kv_page_size=8)
    for p in mixed:
        engine.add_request("12+34=", p)
    while engine.has_unfinished_requests():
        batch = engine.scheduler.schedule()
        expected = sum(r.step_tokens for r in batch)
        before = engine.metrics.tokens_in_passes
        engine._step_batch(batch)
        engine.scheduler.update()
        assert engine.metrics.tokens_in_passes - before == expected

    canvas = len(engine.tokenizer("12+34=")["input_ids"]) + 16
    tight = Engine(llada, dtype="float64", max_num_batched_tokens=canvas + 8)
    a = tight.add_request("12+34=", DUAL)
    b = tight.add_request("12+43=", DUAL)
    tight.step()  # a's refresh: its whole canvas, no room for b's
    assert [r.request_id for r in tight.scheduler.running] == [a]
    ran_together = False  # from a's cached steps (a block) on, b's refresh fits beside
    while tight.has_unfinished_requests():
        batch = tight.scheduler.schedule()
        ids = {r.request_id for r in batch}
        ran_together |= ids == {a, b}
        assert sum(r.step_tokens for r in batch) <= canvas + 8
        tight._step_batch(batch)
        tight.scheduler.update()
    assert ran_together


def test_auto_backend_picks_flash_only_for_half_precision(monkeypatch) -> None:
    monkeypatch.setattr(attention, "_installed", lambda module: True)
    assert attention.resolve_backend("auto", "cuda", torch.float32) == "sdpa"
    assert attention.resolve_backend("auto", "cuda", torch.float64) == "sdpa"
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16) == "flash"
    assert attention.resolve_backend("auto", "cuda", torch.float16) == "flash"
    assert attention.resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match=r"^attention_backend: 'flash' needs float16"):
        attention.resolve_backend("flash", "cuda", torch.float32)
    monkeypatch.setattr(attention, "_installed", lambda module: False)
    assert attention.resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa"


def test_varlen_layout_gives_each_sequence_its_keys(llada) -> None:
    """flash-attn / xformers read every sequence's keys through one index into the pass's keys
    and the gathered ones: a refresh and an uncached canvas see their own rows, a cached step
    its whole canvas in the pool (with its fresh span in place)."""
    from foretell.models.attention import CacheUse, plan_kv

    pool = KVPool(llada.model, torch.device("cpu"), 10**8, page_size=4)
    canvas = 10
    pages = pool.allocate(pool.pages_for(canvas))
    slots = pool.slots(pages, canvas)
    heads, dim = 2, 16
    seq_lens = [5, 3, 4]  # an uncached canvas, a cached step (2 fresh + 1 read-only), a canvas
    caches = [None, CacheUse(slots, 0, 6, 2, canvas), None]
    plan = plan_kv(pool.storage, seq_lens, caches, varlen=True)
    k = torch.randn(sum(seq_lens), heads, dim, dtype=torch.float64)
    pool.storage[0, 0, slots] = torch.randn(canvas, heads, dim, dtype=torch.float64)
    pool.storage[0, 0, plan.write_slots] = k[plan.write_rows]  # the pass's writes
    read = pool.storage[0].index_select(1, plan.read_slots)
    keys = torch.cat((k, read[0])).index_select(0, plan.key_index)
    expected = torch.cat((k[0:5], pool.storage[0, 0, slots], k[8:12]))
    assert torch.equal(keys, expected)
    assert plan.cu_q.tolist() == [0, 5, 8, 12] and plan.cu_k.tolist() == [0, 5, 15, 19]
    assert torch.equal(pool.storage[0, 0, slots[6:8]], k[5:7])  # the fresh span is in place


def test_without_a_byte_limit_max_num_seqs_canvases_fit(llada) -> None:
    """The pool holds max_num_seqs of the longest canvases in whole pages: two requests of 20
    positions (2 pages of 16 each) under max_num_seqs 2 run together."""
    engine = Engine(
        llada, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, kv_cache_memory=None
    )
    assert engine.kv_pool.num_pages == 2 * 2
    params = DecodeParams(gen_length=16, block_length=4, steps=16, kv_cache="dual")
    prompt = [5, 6, 7, 8]
    for _ in range(2):
        engine.add_request(prompt, params)
    engine.step()  # one refresh (20 tokens) fits the token budget
    engine.step()  # the first's cached step (4 tokens) leaves room for the second's refresh
    assert engine.scheduler.num_running == 2 and engine.scheduler.num_waiting == 0


def test_a_pool_that_cannot_grow_fails_the_request_alone(llada, monkeypatch) -> None:
    """Out of memory while the pool grows at admission: that request ends with an error and
    holds no page; the pool's accounting stays exact and the others run."""
    engine = Engine(llada, dtype="float64", kv_page_size=8)
    pool = engine.kv_pool
    real = KVPool._grow
    calls = []

    def failing(self, pages):
        calls.append(pages)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(self, pages)

    monkeypatch.setattr(KVPool, "_grow", failing)
    first = engine.add_request("12+34=", DUAL)
    second = engine.add_request("what is 7*8? and 9*9?", DUAL)  # needs pages past the first's
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    assert outs[second].finish_reason == "error" and "out of memory" in outs[second].error
    assert outs[first].finish_reason == "steps"
    assert pool.used_pages == 0 and pool.free_pages == pool.num_pages


def test_a_failing_commit_read_fails_only_its_request(llada, monkeypatch) -> None:
    """Two cached requests commit in the same cached step and need their masks outside the
    pass: when the shared read-only pass fails, each is retried alone, and only the one whose
    own read fails ends with an error; the other commits and every page comes back."""
    engine = Engine(llada, dtype="float64", kv_page_size=8)
    never = Prophet((1e9,) * 3, answer_start=20)
    p = DecodeParams(gen_length=32, block_length=8, steps=32, kv_cache="dual", early_commit=never)
    good = engine.add_request("12+34=", p)
    bad = engine.add_request("12+43=", p)
    engine.step()  # the refresh: nothing commits
    for rid in (good, bad):  # from now on any gap commits, in a cached step
        req = engine._live[rid]
        req.params = req.params.replace(early_commit=Prophet((0.0,) * 3, answer_start=20))
    real = engine.runner._read_only_many

    def failing(reqs, positions):
        if any(r.request_id == bad for r in reqs):
            raise RuntimeError("injected fault")
        return real(reqs, positions)

    monkeypatch.setattr(engine.runner, "_read_only_many", failing)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[good].finish_reason == "early_commit" and outs[good].commit_step == 2
    assert outs[bad].finish_reason == "error" and "injected fault" in outs[bad].error
    assert engine.kv_pool.used_pages == 0
