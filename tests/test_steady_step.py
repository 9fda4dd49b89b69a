"""A step runs no Python per request while its requests only move on (issue #24).

Per-request Python may run when a request joins, finishes, commits or leaves its block, never
in a step where every request just takes its next step: then the scheduler's batch, the packed
pass, the KV pool plan, attention's layout, the decoding and every cursor's move are array
operations over the whole batch. These tests count the Python function calls of such a step
(model included) at two batch sizes, and check the pieces that make it so against
independent per-sequence rules.
"""

from __future__ import annotations

import cProfile
import itertools
import os
import pstats
import random
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from foretell import DecodeParams, Engine, Prophet
from foretell.engine.kv_cache import KVPool
from foretell.models.attention import CacheUse, PoolUses, plan_kv
from foretell.models.tiny import tiny_model
from foretell.scheduler.request import Request

NEVER = (1e9,) * 3  # Prophet measures its gap every step and never commits


@pytest.fixture(scope="module")
def micro():
    return tiny_model(
        "llada",
        seed=0,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )


def _kinds() -> list[DecodeParams]:
    """Every greedy kind of the issue's mix: each rule with no cache, prefix and dual, with and
    without Prophet; and sampled, filtered and guided kinds of every LLaDA rule (uncached:
    sampling with Prophet and a cache is stepped per request). One block of 32 steps, so
    nothing leaves its block for a while."""
    one_block = dict(gen_length=32, block_length=32, steps=32, seed=None)
    kinds = []
    sampling = ({"temperature": 0.7}, {"temperature": 0.9, "top_p": 0.9}, {"top_k": 5})
    for rule, drawn, cfg in itertools.product(
        ("low_confidence", "random", "margin", "entropy"), sampling, (0.0, 1.0)
    ):
        policy = None if cfg else Prophet(NEVER)
        kinds.append(
            DecodeParams(remasking=rule, cfg_scale=cfg, early_commit=policy, **drawn, **one_block)
        )
    rules = ("low_confidence", "random", "confidence_threshold")
    for rule, cache, prophet in itertools.product(rules, (None, "prefix", "dual"), (0, 1)):
        kw = {"threshold": 1.0} if rule == "confidence_threshold" else {}
        policy = Prophet(NEVER) if prophet else None
        kinds.append(
            DecodeParams(remasking=rule, kv_cache=cache, early_commit=policy, **kw, **one_block)
        )
    return kinds


def _block_moves() -> list[DecodeParams]:
    """Kinds whose schedule moves every request on to its next block at every second step
    (LLaDA's blocks of two steps, Fast-dLLM's refresh and one cached step), none finishing
    for a while: each rule of a fixed schedule, greedy and sampled, with no cache, prefix and
    dual, with and without Prophet."""
    blocks = dict(gen_length=32, block_length=4, steps=16, seed=None)
    kinds = []
    for rule, cache, prophet, drawn in itertools.product(
        ("low_confidence", "random"), (None, "prefix", "dual"), (0, 1), (0.0, 0.7)
    ):
        policy = Prophet(NEVER) if prophet else None
        kinds.append(
            DecodeParams(
                remasking=rule, kv_cache=cache, early_commit=policy, temperature=drawn, **blocks
            )
        )
    return kinds


def _step_calls(
    loaded, copies: int, kinds: list[DecodeParams] | None = None, warm: int = 3
) -> tuple[dict[str, int], dict[str, int]]:
    """Python calls of one steady step with ``copies`` requests of every kind running, and the
    lines of foretell's code the next steady step runs (a comprehension over the batch runs a
    line per request but no call). ``kinds``: :func:`_kinds` unless given; ``warm``: the
    steps run before the profiled one."""
    kinds = kinds or _kinds()
    engine = Engine(
        loaded,
        max_num_seqs=copies * len(kinds),
        max_num_batched_tokens=1 << 30,
        kv_cache_memory=None,
        forward_chunk_tokens=None,
        attention_backend="sdpa_buckets",
    )
    for params in kinds * copies:
        engine.add_request("12+34=", params)
    for _ in range(warm):  # admitted, refreshed, and into their cached steps
        assert not engine.step()
    profiler = cProfile.Profile()
    profiler.enable()
    outs = engine.step()
    profiler.disable()
    assert not outs and engine.scheduler.num_running == copies * len(kinds)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    calls = {
        f"{path.split('/')[-1]}:{line}:{name}": v[1] for (path, line, name), v in stats.items()
    }
    lines: Counter[str] = Counter()

    def trace(frame, event, arg):
        path = frame.f_code.co_filename
        if f"{os.sep}foretell{os.sep}" not in path:
            return None

        def line(frame, event, arg):
            if event == "line":
                lines[f"{path.split(os.sep)[-1]}:{frame.f_lineno}"] += 1
            return line

        return line

    sys.settrace(trace)
    try:
        outs = engine.step()
    finally:
        sys.settrace(None)
    assert not outs
    return calls, dict(lines)


def test_a_steady_step_runs_no_python_per_request(micro) -> None:
    """Four times the requests, and the Python calls (the model's own included) grow by less
    than one per added request in all: none runs per request. A size-dependent branch may
    add a few (the rows' scores gathered apart once the rows left out are many); a single
    call per request (a property read in a comprehension, a tuple per cached sequence, a
    spec per sequence in attention) adds one per added request, and fails this."""
    (small, _), (large, _) = _step_calls(micro, 1), _step_calls(micro, 4)
    added = 3 * len(_kinds())
    grew = _grown(small, large)
    detail = f"calls that grew with {added} more requests: {sorted(grew.items())[:20]}"
    assert sum(grew.values()) < added, detail


def test_a_steady_step_runs_no_line_of_python_per_request(micro) -> None:
    """The same at the level of lines: four times the requests, and the lines of foretell's
    code a steady step runs grow by less than one per added request in all. What a step reads
    of every request (its canvas row, its params object, whether it has a generator) is
    gathered in C (``foretell.scheduler.gather``); a comprehension or a loop over the batch
    (``[r.canvas_row for r in batch]``) runs a line per request, and fails this."""
    (_, small), (_, large) = _step_calls(micro, 1), _step_calls(micro, 4)
    added = 3 * len(_kinds())
    grew = _grown(small, large)
    detail = f"lines that grew with {added} more requests: {sorted(grew.items())[:20]}"
    assert sum(grew.values()) < added, detail


def test_a_block_move_runs_no_python_per_request(micro) -> None:
    """A step that moves every request on to its next block, as its schedule does (no commit,
    no finish), is a steady step too: the calls and the lines grow by less than one per added
    request (the cursors move in one write for all; calling each request's cursor rule, as
    before, adds a dozen calls per request)."""
    kinds = _block_moves()
    # Every second step moves: the calls of the fourth (the profiled one after three), the
    # lines of the fourth (the traced one, after the profiled third).
    small, _ = _step_calls(micro, 1, kinds, warm=3)
    large, _ = _step_calls(micro, 4, kinds, warm=3)
    _, small_lines = _step_calls(micro, 1, kinds, warm=2)
    _, large_lines = _step_calls(micro, 4, kinds, warm=2)
    added = 3 * len(kinds)
    grown_calls, grown_lines = _grown(small, large), _grown(small_lines, large_lines)
    for measured, grown in (("calls", grown_calls), ("lines", grown_lines)):
        detail = f"{measured} that grew with {added} more requests: {sorted(grown.items())[:20]}"
        assert sum(grown.values()) < added, detail


def _grown(small: dict[str, int], large: dict[str, int]) -> dict[str, int]:
    grew = {k: large.get(k, 0) - small.get(k, 0) for k in set(small) | set(large)}
    return {k: d for k, d in grew.items() if d > 0}


def test_the_scheduler_charges_what_a_pass_runs_only_when_costs_do_not_fit(
    llada64, monkeypatch
) -> None:
    """While every running request fits charged its largest pass (its cost), a step's batch is
    decided without asking any request what its pass runs; under a budget the costs exceed,
    the exact sum is asked for and admits what it leaves room for (a cached request's step
    runs its block, not its canvas)."""
    asked = []
    real = Request.step_tokens

    def counting(req):
        asked.append(req.request_id)
        return real.fget(req)

    monkeypatch.setattr(Request, "step_tokens", property(counting))
    dual = DecodeParams(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    prompt = [5, 6, 7, 8]  # a canvas of 20: the cost; a cached step runs 8
    roomy = Engine(llada64, dtype="float64", max_num_seqs=4, kv_cache_memory=None)
    for _ in range(3):
        roomy.add_request(prompt, dual)
    outs = roomy.generate([prompt], dual, use_tqdm=False)
    assert outs[0].finish_reason == "steps" and asked == []
    tight = Engine(
        llada64, dtype="float64", max_num_seqs=4, max_num_batched_tokens=40, kv_cache_memory=None
    )
    first, second = (tight.add_request(prompt, dual) for _ in range(2))
    tight.step()  # both refresh: 40 tokens
    third = tight.add_request(prompt, dual)
    tight.step()  # costs 60 > 40; the cached steps run 16, so the third's refresh fits
    assert asked and {first, second} <= set(asked)
    assert [r.request_id for r in tight.scheduler.running] == [first, second, third]


def test_cursor_gap_reveals_and_page_table_live_in_the_row(llada64) -> None:
    """What a step moves is held in the request's canvas row while it runs (so the batched
    step moves a whole batch with array writes) and is the request's own again after."""
    engine = Engine(llada64, dtype="float64", max_num_seqs=2, kv_cache_memory=None)
    rows = engine.runner.canvas_rows
    params = DecodeParams(
        gen_length=16, block_length=8, steps=16, kv_cache="dual", early_commit=Prophet(NEVER)
    )
    rid = engine.add_request("12+34=", params)
    engine.step()
    engine.step()
    (req,) = engine.scheduler.running
    row = req.canvas_row
    assert np.shares_memory(req.cursor_np, rows.cursor)
    assert np.shares_memory(req.kv_slots, rows.slots)
    assert req.global_step == rows.cursor[row, 2] == 2
    assert req.step_in_block == rows.cursor[row, 1] == 2
    assert req.last_gap == rows.last_gap[row] and req.last_gap is not None
    revealed = req.revealed_last_step
    assert len(revealed) == 1 and rows.revealed[row, revealed[0]]
    assert req.canvas_np[revealed[0]] != engine.mask_token_id
    rows.cursor[row, 2] = 7  # the batched step's write is the request's state
    assert req.global_step == 7
    req.global_step = 2
    slots = req.kv_slots.copy()
    req.release_canvas_row()
    rows.cursor[row] = -1
    rows.slots[row] = -1
    rows.revealed[row] = False
    assert req.global_step == 2 and req.step_in_block == 2
    np.testing.assert_array_equal(req.kv_slots, slots)
    np.testing.assert_array_equal(req.revealed_last_step, revealed)
    engine.abort(rid)


def _reference_plan(seq_lens: list[int], caches: list[CacheUse | None]) -> dict:
    """The KV plan, sequence by sequence: what every piece of a pass's pool use must be."""
    write_rows, write_slots, read_slots, k_lens, runs, groups, specs = [], [], [], [], [], [], []
    start = read_at = 0
    total = sum(seq_lens)
    own_specs, read_specs = [], []
    for length, cache in zip(seq_lens, caches, strict=True):
        reads = cache is not None and cache.read_len is not None
        if cache is not None and cache.write_len:
            first = start + cache.write_row
            write_rows += range(first, first + cache.write_len)
            write_slots += list(
                cache.slots[cache.write_start : cache.write_start + cache.write_len]
            )
        if not reads:
            k_lens.append(length)
            own_specs.append((start, length, start, length, 0, 0))
            if runs and runs[-1][0] + sum(runs[-1][1]) == start:
                runs[-1][1].append(length)
            else:
                runs.append((start, [length]))
        else:
            k_lens.append(cache.read_len)
            read_slots += list(cache.slots[: cache.read_len])
            # A block-causal sequence's rows are the last ``length`` of its keys' positions.
            block, first_query = cache.block_size or 0, cache.read_len - length
            read_specs.append((start, length, total + read_at, cache.read_len, block, first_query))
            shape = (length, cache.read_len, cache.block_size or 0)
            last = groups[-1] if groups else None
            if last and last[0] + last[1] * last[2] == start and last[5] == shape:
                last[1] += 1
            else:
                groups.append([start, 1, length, read_at, cache.read_len, shape])
            read_at += cache.read_len
        start += length
    specs = own_specs + read_specs
    return {
        "write_rows": write_rows,
        "write_slots": write_slots,
        "read_slots": read_slots,
        "k_lens": tuple(k_lens),
        "self_runs": tuple((s, tuple(lens)) for s, lens in runs),
        "read_groups": tuple(tuple(g[:5]) for g in groups),
        "specs": specs,
    }


def test_the_pool_plan_is_the_per_sequence_rule(llada64) -> None:
    """``plan_kv`` over :class:`PoolUses` (array ops for the whole pass) lays out every random
    mix of self-attending, refreshing, cached and block-causal sequences as the per-sequence
    rule does; ``PoolUses.of`` and ``use`` carry each sequence's use both ways."""
    pool = KVPool(llada64.model, torch.device("cpu"), 10**7, page_size=4)
    rng = random.Random(0)
    for _ in range(40):
        seq_lens, caches = [], []
        for _ in range(rng.randint(1, 9)):
            canvas = rng.randint(4, 30)
            slots = pool.slots(list(rng.sample(range(pool.num_pages), -(-canvas // 4))), canvas)
            kind = rng.choice(("none", "refresh", "step", "step", "block"))
            if kind == "none":
                seq_lens.append(canvas)
                caches.append(None)
            elif kind == "refresh":
                seq_lens.append(canvas)
                caches.append(CacheUse(slots, 0, 0, canvas, None))
            elif kind == "step":
                lo = rng.randint(0, canvas - 2)
                span = rng.randint(1, canvas - lo)
                before = rng.randint(0, 3)
                seq_lens.append(before + span + rng.randint(0, 2))
                caches.append(CacheUse(slots, before, lo, span, canvas))
            else:
                block = 4
                hi = rng.randrange(block, canvas + 1, block)
                lo = rng.randrange(0, hi, block)
                seq_lens.append(hi - lo)
                caches.append(CacheUse(slots, 0, lo, hi - lo, hi, block))
        if rng.random() < 0.3:  # equal neighbours share one attention call
            seq_lens, caches = seq_lens + seq_lens[-1:], caches + caches[-1:]
        uses = PoolUses.of(caches)
        for i, cache in enumerate(caches):
            back = uses.use(i)
            assert (back is None) == (cache is None)
            if cache is not None:
                np.testing.assert_array_equal(back.slots[: len(cache.slots)], cache.slots)
                assert tuple(back)[1:] == tuple(cache)[1:]
        plan = plan_kv(pool.storage, seq_lens, uses, varlen=True)
        expected = _reference_plan(seq_lens, caches)
        for name in ("write_rows", "write_slots", "read_slots"):
            got = getattr(plan, name)
            assert (got.tolist() if got is not None else []) == expected[name], name
        assert plan.k_lens == expected["k_lens"]
        assert plan.self_runs == expected["self_runs"]
        assert plan.read_groups == expected["read_groups"]
        assert plan.specs.tolist() == [list(s) for s in expected["specs"]]
        assert len(plan.read_masks) == len(plan.read_groups)
        half = len(seq_lens) // 2  # a chunk of the pass is the plan of its sequences
        if half:
            chunk = plan_kv(pool.storage, seq_lens[half:], uses[half:])
            assert chunk.k_lens == _reference_plan(seq_lens[half:], caches[half:])["k_lens"]


def test_a_swapped_cost_is_charged_at_once(llada64) -> None:
    """A running request whose params are swapped for ones whose passes cost more (guidance
    doubles its sequences) is charged its new cost from the next schedule on: the batch
    stays within the token budget, as the per-request rule keeps it."""
    engine = Engine(llada64, dtype="float64", max_num_seqs=4, max_num_batched_tokens=40)
    params = DecodeParams(gen_length=12, block_length=12, steps=12)
    first = engine.add_request("1+1=", params)  # a canvas of 16 tokens
    second = engine.add_request("2+2=", params)
    engine.step()
    req = next(r for r in engine.scheduler.running if r.request_id == second)
    req.params = req.params.replace(cfg_scale=1.0)  # its passes now run 32 tokens
    batch = engine.scheduler.schedule()
    assert [r.request_id for r in batch] == [first]
    assert sum(r.step_tokens for r in batch) <= 40
    assert engine.scheduler._running_cost == 16 + 32
