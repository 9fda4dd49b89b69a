"""The block KV cache (``DecodeParams.kv_cache``): exactness against an independent reference of
Fast-dLLM's cached decoders, in one mixed batch, and the cache's memory lifecycle."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
from reference_cache import LLaDAReference, cached_generate, dream_cached_generate
from reference_decoders import early_exit_of

from foretell import DecodeParams, Engine, Prophet
from foretell.engine.kv_cache import bytes_per_token
from foretell.params import as_params

PROMPTS = ["12+34=", "what is 7*8?", "a", "count: 1 2 3 4 5 6 7 8 9 10", "x=3, y=x+4, y?"]
# (gen_length, block_length, steps): blocks of 4 to 32, steps dividing and not dividing a
# block's masks.
SHAPES = [(32, 4, 32), (32, 8, 16), (48, 8, 24), (32, 16, 32), (32, 32, 32), (64, 16, 24)]
RULES = [
    ("low_confidence", 0.9),
    ("confidence_threshold", 0.5),
    ("random", 0.9),
    ("confidence_threshold", 0.95),
    ("confidence_threshold", 0.7),
]
# Gap thresholds chosen so that commits land early, mid-way, late, or never (explicit spans,
# which the reference takes too); the still-masked region is checked against runs alone.
PROPHETS = [
    None,
    Prophet(thresholds=(4.0, 4.0, 4.0), answer_start=10, answer_length=5),
    Prophet(thresholds=(8.0, 3.5, 1.0), answer_start=20, answer_length=6),
    Prophet(thresholds=(9.0, 6.0, 2.5), statistic="min", answer_start=2, answer_length=8),
    Prophet(thresholds=(1e9, 1e9, 1e9), answer_start=4),
    Prophet(thresholds=(5.0, 3.5, 1.6)),
]


def _cases(tokenizer) -> list[tuple[str, DecodeParams]]:
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    cases = []
    grid = itertools.product(["prefix", "dual", None], range(len(SHAPES)))
    for i, (mode, shape) in enumerate(grid):
        for j in range(3 if mode else 1):
            n = len(cases)
            gen, block, steps = SHAPES[(shape + j) % len(SHAPES)]
            remasking, threshold = RULES[n % len(RULES)]
            prophet = PROPHETS[n % len(PROPHETS)]
            extra = {}
            if n % 7 == 3:
                extra["constraints"] = {12: a, 13: b, 14: a}
            params = DecodeParams(
                gen_length=gen,
                block_length=block,
                steps=steps,
                remasking=remasking,
                threshold=threshold,
                early_commit=prophet,
                seed=200 + n,
                kv_cache=mode,
                **extra,
            )
            cases.append((PROMPTS[(i + j) % len(PROMPTS)], params))
    return cases


def _reference(loaded, ref, prompt_ids: list[int], p: DecodeParams) -> tuple[list[int], int]:
    policy = p.early_commit
    if p.seed is not None:  # greedy cases need no seed (seed=None is the default)
        torch.manual_seed(p.seed)
    threshold = p.threshold if p.remasking == "confidence_threshold" else None
    x, nfe = cached_generate(
        ref,
        torch.tensor([prompt_ids]),
        mode=p.kv_cache,
        steps=p.steps,
        gen_length=p.gen_length,
        block_length=p.block_length,
        remasking="low_confidence" if threshold is not None else p.remasking,
        threshold=threshold,
        mask_id=loaded.model.mask_token_id,
        constraints=p.constraints,
        early_exit=early_exit_of(policy),
        statistic=policy.statistic if policy else "mean",
    )
    return x[0, len(prompt_ids) :].tolist(), nfe


def test_mixed_batch_equals_reference_and_alone(llada64) -> None:
    cases = _cases(llada64.tokenizer)
    assert len(cases) >= 40
    engine = Engine(llada64, dtype="float64", max_num_seqs=7)
    mixed = engine.generate([c[0] for c in cases], [c[1] for c in cases], use_tqdm=False)
    assert engine.metrics.kv_cache_peak_bytes > 0 and engine.metrics.kv_cache_bytes == 0
    ref = LLaDAReference(llada64.model)
    commit_steps, cached_commits, checked = set(), 0, 0
    for (prompt, params), out in zip(cases, mixed, strict=True):
        solo = Engine(llada64, dtype="float64", max_num_seqs=1)
        alone = solo.generate([prompt], params, use_tqdm=False)[0]
        assert out.token_ids == alone.token_ids, (prompt, params)
        assert out.num_forward_passes == alone.num_forward_passes, (prompt, params)
        if params.kv_cache is None:
            continue
        if out.committed_early:
            commit_steps.add(out.commit_step)
            cached_commits += 1
        policy = params.early_commit
        if policy is not None and policy.answer_start is None:
            continue  # foretell's still-masked region: the reference has no such region
        tokens, nfe = _reference(llada64, ref, out.prompt_token_ids, params)
        assert out.token_ids == tokens, (prompt, params)
        assert out.num_forward_passes == nfe, (prompt, params)
        checked += 1
    assert checked >= 30
    # Prophet must really fire at several different steps (and not in every case).
    assert cached_commits >= 6 and len(commit_steps) >= 4, commit_steps


def test_cached_steps_run_fewer_tokens(llada64) -> None:
    """A dual-cache request runs its canvas at each block start and only its block after."""
    engine = Engine(llada64, dtype="float64")
    p = DecodeParams(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    (out,) = engine.generate(["12+34="], p, use_tqdm=False)
    canvas = len(out.prompt_token_ids) + 16
    assert out.num_forward_passes == 16  # 8 steps per block, the block empties on the last
    assert engine.metrics.tokens_in_passes == 2 * (canvas + 7 * 8)
    prefix = Engine(llada64, dtype="float64")
    prefix.generate(["12+34="], p.replace(kv_cache="prefix"), use_tqdm=False)
    assert prefix.metrics.tokens_in_passes == (canvas + 7 * 16) + (canvas + 7 * 8)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"kv_cache": "bogus"},
        {"kv_cache": "prefix", "cfg_scale": 1.0},
        {"kv_cache": "dual", "remasking": "margin"},
        {"kv_cache": "dual", "gen_length": 16, "block_length": 8, "steps": 2},
    ],
)
def test_unsupported_kv_cache_is_refused_naming_the_field(fields) -> None:
    with pytest.raises(ValueError, match=r"^kv_cache: "):
        DecodeParams(**fields)
    with pytest.raises(ValueError, match=r"^kv_cache: "):
        as_params(fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"remasking": "low_confidence"},
        {"remasking": "entropy", "early_commit": "prophet"},
        {"remasking": "entropy", "alg_temp": 0.5},
    ],
)
def test_dream_refuses_what_fast_dllm_does_not_define(dream_engine, fields) -> None:
    p = DecodeParams(gen_length=16, block_length=8, steps=8, kv_cache="dual", **fields)
    with pytest.raises(ValueError, match=r"^kv_cache: "):
        dream_engine.add_request("12+34=", p)
    assert not dream_engine.has_unfinished_requests()


def test_llada_refuses_entropy_with_a_cache(llada_engine) -> None:
    p = DecodeParams(gen_length=16, block_length=8, steps=8, kv_cache="dual", remasking="entropy")
    with pytest.raises(ValueError, match=r"^kv_cache: "):
        llada_engine.add_request("12+34=", p)


DREAM_SHAPES = [(32, 8, 16), (32, 4, 32), (48, 16, 24), (32, 32, 32), (32, 8, 32)]


def test_dream_mixed_batch_equals_reference_and_alone(dream64) -> None:
    cases = []
    for n, (mode, shape, rule) in enumerate(
        itertools.product(
            ["prefix", "dual"],
            DREAM_SHAPES,
            [("entropy", 0.9), ("confidence_threshold", 0.6), ("confidence_threshold", 0.9)],
        )
    ):
        gen, block, steps = shape
        p = DecodeParams(
            gen_length=gen,
            block_length=block,
            steps=steps,
            remasking=rule[0],
            threshold=rule[1],
            kv_cache=mode,
            seed=n,
        )
        cases.append((PROMPTS[n % len(PROMPTS)], p))
    cases.append((PROMPTS[0], DecodeParams(gen_length=32, steps=16, remasking="entropy")))
    cases.append((PROMPTS[1], DecodeParams(gen_length=16, steps=16)))
    engine = Engine(dream64, dtype="float64", max_num_seqs=5)
    mixed = engine.generate([c[0] for c in cases], [c[1] for c in cases], use_tqdm=False)
    ref = LLaDAReference(dream64.model)
    for (prompt, p), out in zip(cases, mixed, strict=True):
        solo = Engine(dream64, dtype="float64", max_num_seqs=1)
        alone = solo.generate([prompt], p, use_tqdm=False)[0]
        assert (out.token_ids, out.num_forward_passes) == (
            alone.token_ids,
            alone.num_forward_passes,
        )
        if p.kv_cache is None:
            continue
        x, nfe = dream_cached_generate(
            ref,
            torch.tensor([out.prompt_token_ids]),
            mode=p.kv_cache,
            steps=p.steps,
            gen_length=p.gen_length,
            block_length=p.block_length,
            alg=p.remasking,
            threshold=p.threshold,
            mask_id=dream64.model.mask_token_id,
        )
        assert out.token_ids == x[0, len(out.prompt_token_ids) :].tolist(), (prompt, p)
        assert out.num_forward_passes == nfe, (prompt, p)


def test_budget_smaller_than_one_request_is_refused(llada64) -> None:
    per_token = bytes_per_token(llada64.model)
    assert per_token == 2 * 2 * 2 * 16 * 8  # K and V, 2 layers, 2 kv heads, head_dim 16, f64
    engine = Engine(llada64, dtype="float64", kv_cache_memory=10 * per_token)
    p = DecodeParams(gen_length=16, block_length=8, steps=16, kv_cache="prefix")
    with pytest.raises(ValueError, match=r"^kv_cache_memory: "):
        engine.add_request("12+34=", p)
    assert not engine.has_unfinished_requests()
    assert engine.metrics.kv_cache_bytes == 0
    engine.add_request("12+34=", p.replace(kv_cache=None))  # an uncached request needs none


@pytest.mark.parametrize("value", ["bogus", -1, 1.5, True])
def test_bad_kv_cache_memory_is_refused(llada64, value) -> None:
    with pytest.raises(ValueError, match=r"^kv_cache_memory: "):
        Engine(llada64, dtype="float64", kv_cache_memory=value)


def test_auto_budget_is_positive(llada64) -> None:
    engine = Engine(llada64, dtype="float64")
    assert engine.kv_pool.num_pages > 0


# -- the cache's lifecycle -----------------------------------------------------------------


def _one_cache(engine: Engine, prompt: str, gen_length: int) -> int:
    """Pool bytes of one request's pages: its canvas rounded up to whole pages."""
    canvas = len(engine.tokenizer(prompt)["input_ids"]) + gen_length
    return engine.kv_pool.pages_for(canvas) * engine.kv_pool.page_bytes


def test_cache_is_allocated_at_first_refresh_and_freed_on_finish(llada64) -> None:
    engine = Engine(llada64, dtype="float64")
    p = DecodeParams(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    engine.add_request("12+34=", p)
    assert engine.metrics.kv_cache_bytes == 0
    engine.step()
    assert engine.metrics.kv_cache_bytes == _one_cache(engine, "12+34=", 16)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.metrics.kv_cache_bytes == 0
    assert engine.metrics.kv_cache_peak_bytes == _one_cache(engine, "12+34=", 16)


def test_cache_is_freed_on_early_commit(llada64) -> None:
    engine = Engine(llada64, dtype="float64")
    never = Prophet((1e9,) * 3, answer_start=20)
    p = DecodeParams(gen_length=32, block_length=8, steps=32, kv_cache="prefix", early_commit=never)
    rid = engine.add_request("12+34=", p)
    req = engine._live[rid]
    assert engine.step() == [] and engine.metrics.kv_cache_bytes > 0
    # From now on any gap commits: the next step is a cached one, with read-only rows.
    req.params = req.params.replace(early_commit=Prophet((0.0,) * 3, answer_start=20))
    (out,) = engine.step()
    assert out.finish_reason == "early_commit" and out.commit_step == 2
    assert engine.mask_token_id not in out.token_ids
    assert engine.metrics.kv_cache_bytes == 0 and engine.metrics.kv_cache_peak_bytes > 0


def test_cache_is_freed_on_abort_and_error(llada64, fail_greedy_step) -> None:
    engine = Engine(llada64, dtype="float64")
    p = DecodeParams(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    keep = engine.add_request("12+34=", p)
    gone = engine.add_request("what is 7*8?", p)
    engine.step()
    two = _one_cache(engine, "12+34=", 16) + _one_cache(engine, "what is 7*8?", 16)
    assert engine.metrics.kv_cache_bytes == two
    engine.abort(gone)
    assert engine.metrics.kv_cache_bytes == _one_cache(engine, "12+34=", 16)

    # Greedy cached requests step together.
    fail_greedy_step(lambda req: req.request_id == keep and req.cached_step)
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.request_id == keep] == ["error"]
    assert engine.metrics.kv_cache_bytes == 0


def test_admission_passes_a_head_waiting_for_pages(llada64) -> None:
    """A cached request that waits for pages does not block those behind it that fit: the
    uncached third request runs at once, beside the first."""
    p = DecodeParams(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    probe = Engine(llada64, dtype="float64")
    budget = _one_cache(probe, "12+34=", 16) + 10
    engine = Engine(llada64, dtype="float64", kv_cache_memory=budget)
    first = engine.add_request("12+34=", p)
    second = engine.add_request("12+43=", p)
    third = engine.add_request("12+34=", p.replace(kv_cache=None))  # needs no pages
    done: dict[str, int] = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            done[out.request_id] = step
        assert engine.metrics.kv_cache_bytes <= budget
        if step == 1:
            running = {r.request_id for r in engine.scheduler.running}
            assert running == {first, third}
            assert [r.request_id for r in engine.scheduler.waiting] == [second]
    # The second waits for the first's pages; the third passed it.
    assert done[first] == 16 and done[third] == 16 and done[second] == 32
    assert engine.metrics.kv_cache_peak_bytes <= budget


def test_server_takes_kv_cache_and_reports_its_bytes(llada64) -> None:
    from foretell.engine.async_engine import AsyncEngine
    from foretell.server.metrics import render_metrics
    from foretell.server.protocol import APIError, CompletionRequest

    body = CompletionRequest(model="m", prompt="12+34=", max_tokens=16, kv_cache="dual")
    assert body.to_params().kv_cache == "dual"
    with pytest.raises(APIError) as err:
        CompletionRequest(model="m", prompt="x", max_tokens=16, kv_cache="bogus").to_params()
    assert err.value.param == "kv_cache" and err.value.status == 400

    async def main() -> dict:
        engine = AsyncEngine(llada64, dtype="float64")
        try:
            out = await engine.generate("12+34=", body.to_params())
            assert out.finish_reason == "steps"
            return engine.stats()
        finally:
            await engine.shutdown()

    stats = asyncio.run(main())
    assert stats["kv_cache_bytes"] == 0 and stats["kv_cache_peak_bytes"] > 0
    assert "\nforetell_kv_cache_bytes 0\n" in render_metrics(stats)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cached_span_on_an_unchanged_canvas_equals_the_full_forward(llada64, dream64, family):
    """With keys/values refreshed from the same canvas, a cached span (prefix or dual shape,
    with read-only rows before and after it) computes exactly what the full forward does."""
    from foretell.engine import kv_cache
    from foretell.models.attention import CacheUse

    model = (llada64 if family == "llada" else dream64).model
    length = 40
    ids = torch.randint(4, 40, (length,), generator=torch.Generator().manual_seed(0))
    ids[20:] = model.mask_token_id
    with torch.no_grad():
        pool = kv_cache.KVPool(model, torch.device("cpu"), 2**30, page_size=16)
        # Pages out of order, so that the page table really maps the positions.
        pages = pool.allocate(pool.pages_for(length) + 1)[::-1][: pool.pages_for(length)]
        slots = pool.slots(pages, length)
        full = model.forward_packed(ids, torch.arange(length), [length])
        refresh = CacheUse(slots, 0, 0, length, None)
        assert torch.equal(
            model.forward_packed(ids, torch.arange(length), [length], [refresh], pool.storage),
            full,
        )
        for lo, hi in [(24, 40), (24, 32)]:
            pos = torch.cat([torch.tensor([3, 10]), torch.arange(lo, hi), torch.tensor([39])])
            pos = pos[pos < hi].unique() if hi == length else pos
            cache = CacheUse(slots, 2, lo, hi - lo, length)
            out = model.forward_packed(ids[pos], pos, [len(pos)], [cache], pool.storage)
            torch.testing.assert_close(out, full[pos], rtol=0, atol=1e-12)


def test_uncached_threshold_rule_equals_fast_dllm_generate(llada64) -> None:
    """Without a cache, ``confidence_threshold`` is Fast-dLLM's ``generate(threshold=...)``:
    one ``topk`` over the canvas row, keep the first and every candidate >= threshold."""
    from reference_cache import threshold_generate

    cases = [
        (
            prompt,
            DecodeParams(
                gen_length=gen,
                block_length=block,
                steps=gen // block,
                remasking="confidence_threshold",
                threshold=t,
            ),
        )
        for prompt, (gen, block), t in zip(
            itertools.cycle(PROMPTS),
            [(32, 8), (32, 4), (48, 16), (32, 32), (64, 16), (32, 8)],
            [0.5, 0.9, 0.7, 0.95, 0.6, 0.99],
        )
    ]
    engine = Engine(llada64, dtype="float64", max_num_seqs=3)
    outs = engine.generate([c[0] for c in cases], [c[1] for c in cases], use_tqdm=False)
    parallel = 0
    for (_, params), out in zip(cases, outs, strict=True):
        x, nfe = threshold_generate(
            llada64.model,
            torch.tensor([out.prompt_token_ids]),
            gen_length=params.gen_length,
            block_length=params.block_length,
            threshold=params.threshold,
            mask_id=llada64.model.mask_token_id,
        )
        assert out.token_ids == x[0, len(out.prompt_token_ids) :].tolist(), params
        assert out.num_forward_passes == nfe, params
        parallel += nfe < params.gen_length
    assert parallel >= 2  # the rule really revealed several tokens per step somewhere
