"""Canvas rows: every running request's canvas is a row of one matrix, given back when it ends.

The batched step writes a whole pass's reveals with one scatter into these rows and the packer
reads a whole pass with one gather, so a request's canvas must be a true view of its row from
its first pass to its end, across the matrix growing, and a copy of its own after.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import foretell.decoding.batched as batched_module
from foretell import DecodeParams, Engine, Prophet
from foretell.models.tiny import tiny_model
from foretell.scheduler.canvas_rows import CanvasRows
from foretell.scheduler.request import Request


def _request(name: str, prompt_len: int, gen_length: int = 8) -> Request:
    prompt = list(range(1, prompt_len + 1))
    params = DecodeParams(gen_length=gen_length, block_length=8)
    return Request(name, "p", prompt, params, 0, "llada")


def test_a_canvas_is_a_view_of_its_row_until_it_is_given_back() -> None:
    rows = CanvasRows(capacity=2, width=16)
    req = _request("a", 3)
    before = req.canvas_np.copy()
    row = rows.add(req)
    assert req.canvas_row == row and rows.num_held == 1
    np.testing.assert_array_equal(rows.tokens[row, : req.canvas_len], before)
    req.write(torch.tensor([3, 4]), torch.tensor([7, 9]))  # the per-request step's write
    assert rows.tokens[row, 3] == 7 and rows.tokens[row, 4] == 9
    rows.flat[row * rows.width + 5] = 11  # the batched step's write
    assert int(req.canvas[5]) == 11 and req.canvas_np[5] == 11
    req.release_canvas_row()
    assert req.canvas_row is None and rows.num_held == 0
    rows.tokens[row] = -1  # the row is someone else's now: the canvas is a copy
    assert req.canvas_np[3:6].tolist() == [7, 9, 11]
    req.release_canvas_row()  # idempotent


def test_rows_grow_and_holders_follow() -> None:
    rows = CanvasRows(capacity=1, width=8)
    short = _request("short", 2, gen_length=4)
    rows.add(short)
    short.write(torch.tensor([2]), torch.tensor([5]))
    reqs = [_request(str(i), 5 + i, gen_length=16) for i in range(4)]  # wider, and more rows
    for req in reqs:
        rows.add(req)
    assert rows.tokens.shape[0] >= 5 and rows.width >= max(r.canvas_len for r in reqs)
    assert len({r.canvas_row for r in [short, *reqs]}) == 5
    for req in [short, *reqs]:  # every view is of the new matrix, its tokens carried over
        assert np.shares_memory(req.canvas_np, rows.tokens)
        np.testing.assert_array_equal(rows.tokens[req.canvas_row, : req.canvas_len], req.canvas_np)
    assert short.canvas_np[2] == 5
    short.write(torch.tensor([3]), torch.tensor([6]))
    assert rows.tokens[short.canvas_row, 3] == 6


def test_float_values_follow_the_params_across_growth_and_swaps() -> None:
    """A row's float columns (the runner's sampling values) come from its request's params
    at its first gather, survive the rows growing, follow a params swap, and are recomputed
    for the next holder of a row given back."""
    import dataclasses

    def values(req: Request) -> tuple[float, ...]:
        return (req.params.temperature, float(req.prompt_len))

    rows = CanvasRows(capacity=1, width=8, values_of=values, values_width=2)
    first = _request("first", 2)
    first.params = dataclasses.replace(first.params, temperature=0.3)
    rows.add(first)
    rows.geometry_of([first], np.array([first.canvas_row]))
    assert rows.values[first.canvas_row].tolist() == [0.3, 2.0]
    more = [_request(str(i), 3 + i, gen_length=16) for i in range(3)]  # grows both ways
    for req in more:
        rows.add(req)
    held = np.array([r.canvas_row for r in [first, *more]])
    rows.geometry_of([first, *more], held)
    assert rows.values[held].tolist() == [[0.3, 2.0], [0.0, 3.0], [0.0, 4.0], [0.0, 5.0]]
    first.params = dataclasses.replace(first.params, temperature=0.9)  # swapped mid-life
    rows.geometry_of([first], held[:1])
    assert rows.values[first.canvas_row].tolist() == [0.9, 2.0]
    row = first.canvas_row
    first.release_canvas_row()
    late = _request("late", 6)
    assert rows.add(late) == row
    rows.geometry_of([late], np.array([row]))
    assert rows.values[row].tolist() == [0.0, 6.0]
    with pytest.raises(ValueError, match="values_of and values_width"):
        CanvasRows(values_of=values)


def test_a_row_is_reused_and_misuse_is_refused() -> None:
    rows = CanvasRows(capacity=2, width=16)
    a, b = _request("a", 3), _request("b", 4)
    row = rows.add(a)
    with pytest.raises(ValueError, match="already holds"):
        rows.add(a)
    with pytest.raises(ValueError, match="holds no row"):
        rows.remove(b)
    a.release_canvas_row()
    assert rows.add(b) == row
    np.testing.assert_array_equal(rows.tokens[row, : b.canvas_len], b.canvas_np)
    with pytest.raises(ValueError, match="capacity and width"):
        CanvasRows(capacity=0)


def test_a_restart_while_holding_a_row_starts_over_in_it() -> None:
    rows = CanvasRows(capacity=1, width=16)
    req = _request("a", 3)
    fresh = req.canvas_np.copy()
    rows.add(req)
    req.write(torch.tensor([3]), torch.tensor([7]))
    req.restart()
    np.testing.assert_array_equal(rows.tokens[req.canvas_row, : req.canvas_len], fresh)
    with pytest.raises(ValueError, match="holds a canvas row"):  # its row fits its canvas only
        req.set_canvas(torch.zeros(req.canvas_len + 1, dtype=torch.long))


def test_every_row_returns_however_a_request_ends(llada64, monkeypatch) -> None:
    engine = Engine(llada64, dtype="float64", max_num_seqs=4)
    rows = engine.runner.canvas_rows
    dual = DecodeParams(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    # Finished, committed, cached and guided, batched and per request.
    params = [
        dual,
        DecodeParams(gen_length=16, block_length=8, steps=16),
        dual.replace(early_commit=Prophet((0.0,) * 3)),
        DecodeParams(gen_length=16, block_length=8, steps=16, cfg_scale=1.0),
        DecodeParams(gen_length=16, block_length=8, steps=16, temperature=0.7, seed=1),
    ]
    outs = engine.generate(["12+34="] * len(params), params, use_tqdm=False)
    assert all(o.finish_reason in ("steps", "early_commit") for o in outs)
    assert rows.num_held == 0
    # Aborted, running and waiting.
    running = engine.add_request("12+34=", dual)
    engine.step()
    assert rows.num_held == 1
    waiting = engine.add_request("12+43=", dual)
    engine.abort(waiting)
    engine.abort(running)
    engine.step()
    assert rows.num_held == 0
    # Failed inside the batched step, in its own rule (it finishes at its first step: one
    # block of one step), after the batch's write: its row returns, the other runs on.
    real = batched_module.BatchedStep._apply

    def failing(self, j, req, *args):
        if req.request_id == "bad":
            raise RuntimeError("injected fault")
        return real(self, j, req, *args)

    monkeypatch.setattr(batched_module.BatchedStep, "_apply", failing)
    one_step = DecodeParams(gen_length=8, block_length=8, steps=1)
    engine.add_request("12+34=", one_step, request_id="bad")
    engine.add_request("12+34=", dual, request_id="good")
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step()})
    assert finished["bad"].finish_reason == "error" and finished["good"].finish_reason == "steps"
    # The failed request's canvas is as its step found it, though the batch's write came first.
    assert set(finished["bad"].token_ids) == {engine.mask_token_id}
    assert finished["good"].token_ids == outs[0].token_ids  # unaffected by its neighbour
    assert rows.num_held == 0


def test_finished_outputs_keep_their_tokens_after_the_row_is_reused(llada64) -> None:
    """A finished request's canvas is copied out of its row before the row is reused, so an
    output built later (a snapshot, a stream) still reads its own tokens."""
    engine = Engine(llada64, dtype="float64", max_num_seqs=1)
    p = DecodeParams(gen_length=16, block_length=8, steps=16)
    alone = engine.generate(["12+34="], p, use_tqdm=False)[0].token_ids
    first = engine.make_request("12+34=", p, request_id="first")
    engine.enqueue(first)
    engine.add_request("what is 7*8?", p, request_id="second")
    while not first.is_finished:
        engine.step()
    engine.step()  # the second request takes the row
    assert first.generated_ids == alone


def _reference_sequence(req: Request) -> tuple[np.ndarray, tuple | None]:
    """A request's sequence in a pass, request by request (the rule the packer computes for the
    whole batch at once): its canvas positions, and (write_row, write_start, write_len,
    read_len) of its KV pool use."""
    length = req.canvas_len
    if req.params.kv_cache is None:
        return np.arange(length), None
    if not req.cached_step:  # a refresh: the canvas, attending to itself
        return np.arange(length), (0, 0, length, None)
    lo, hi = req.query_span()
    policy = req.params.early_commit
    keep = np.zeros(length, dtype=bool)
    if policy is not None and policy.answer_start is None:  # every generated mask
        keep[req.prompt_len :] = req.canvas_np[req.prompt_len :] == req.mask_token_id
    elif policy is not None:
        keep[req.prompt_len + policy.answer_start :][: policy.answer_length] = True
    before = int(keep[:lo].sum())  # read-only rows ahead of the span
    keep[lo:hi] = True
    return np.flatnonzero(keep), (before, lo, hi - lo, length)


def test_every_pass_packs_each_request_by_the_layout_rule(llada64) -> None:
    """Each request's sequence in every pass of a mixed run (uncached, guided, refreshes and
    cached steps of both caches, with Prophet over every mask, an explicit span or none) is
    the per-request rule's: positions, tokens from its canvas, its pool use, where its rows
    begin, and the guided copy; sequences come in attention's order."""
    engine = Engine(llada64, dtype="float64", max_num_seqs=8)
    never = (1e9,) * 3  # Prophet's rows without its commit: every pass keeps them
    params = []
    for cache in (None, "prefix", "dual"):
        for policy in (None, Prophet(never), Prophet(never, answer_start=2, answer_length=5)):
            params.append(
                DecodeParams(
                    gen_length=24, block_length=8, steps=24, kv_cache=cache, early_commit=policy
                )
            )
    params.append(DecodeParams(gen_length=16, block_length=8, steps=16, cfg_scale=1.0))
    prompts = ["12+34=", "what is 7*8?", "1", "22+22="]
    real = engine.runner.packer.pack
    checked = []

    def checking(batch, canvas_rows):
        step = real(batch, canvas_rows)
        ids, positions = step.ids, step.positions
        keys = []
        for i, req in enumerate(batch):
            pos, cache = _reference_sequence(req)
            seq, (cond, uncond) = step.seq_of[i], step.offsets(i)
            assert step.seq_lens[seq] == len(pos)
            np.testing.assert_array_equal(positions[cond : cond + len(pos)], pos)
            np.testing.assert_array_equal(ids[cond : cond + len(pos)], req.canvas_np[pos])
            use = None if step.caches is None else step.caches.use(seq)
            assert (None if use is None else tuple(use)[1:5]) == cache
            assert step.row_offsets[i] == (cache[0] if req.cached_step else 0)
            if req.cached_step:
                np.testing.assert_array_equal(step.span(i), pos)
            else:
                assert step.span(i) is None
            assert (uncond is None) == (req.params.cfg_scale <= 0)
            if req.params.cfg_scale > 0:
                copy = np.where(req.given_np, req.mask_token_id, req.canvas_np)
                np.testing.assert_array_equal(ids[uncond : uncond + req.canvas_len], copy)
                assert step.caches is None or step.caches.use(seq + 1) is None
            reading = cache is not None and cache[3] is not None
            keys.append((seq, (reading, len(pos), cache[3] if reading else 0)))
        assert [k for _, k in sorted(keys)] == sorted(k for _, k in keys)
        checked.append({(r.params.kv_cache, r.cached_step) for r in batch})
        return step

    engine.runner.packer.pack = checking
    outs = engine.generate(
        [prompts[i % len(prompts)] for i in range(len(params))], params, use_tqdm=False
    )
    assert all(o.finish_reason == "steps" for o in outs)
    seen = set().union(*checked)
    assert {(None, False), ("prefix", False), ("prefix", True), ("dual", True)} <= seen


def _reference_block_sequences(req: Request) -> list[tuple[np.ndarray, tuple]]:
    """A block-causal request's sequences in a pass, request by request: a store sequence when
    keys are due (from the first position not stored to its block's start), then its query
    sequence (its block, or without the block cache its window from 0), each with (write_row,
    write_start, write_len, read_len, block_size) of its pool use."""
    size = req.params.block_length
    start = req.block * size
    end = start + size
    out = []
    if req.params.block_cache and req.kv_stored < start:
        out.append((np.arange(req.kv_stored, start), (0, req.kv_stored, start - req.kv_stored)))
        out[-1] = (out[-1][0], (*out[-1][1], start, size))
    query = start if req.params.block_cache else 0
    out.append((np.arange(query, end), (0, query, end - query, end, size)))
    return out


def test_every_pass_packs_each_block_causal_request_by_the_layout_rule() -> None:
    """Each SDAR request's sequences in every pass of a mixed run (prompts over several blocks:
    their whole blocks stored at the first pass; blocks finished and stored with the next
    block's queries; the window re-encoded without the block cache): positions, tokens, pool
    use and page table; store sequences first, in (length, keys) order, then the queries."""
    loaded = tiny_model("sdar", seed=3, block_size=4)
    # Fewer slots than requests: late joiners' prompts are stored beside earlier requests'
    # finished blocks, so the store order (length first) is put to the test.
    engine = Engine(loaded, max_num_seqs=3)
    params = [
        DecodeParams(gen_length=g, block_length=4, steps=s, block_cache=c, ignore_eos=True)
        for g, s, c in [(8, 4, True), (12, 2, True), (8, 2, False), (16, 4, True)]
    ]
    prompts = [[5 + i % 30 for i in range(n)] for n in (1, 6, 2, 13, 3, 17, 11, 9)]
    real = engine.runner.packer.pack
    seen = {"store": 0, "window": 0}

    def checking(batch, canvas_rows):
        step = real(batch, canvas_rows)
        ids, positions = step.ids, step.positions
        starts = np.cumsum(step.seq_lens) - np.asarray(step.seq_lens)
        stores, queries = [], []
        for i, req in enumerate(batch):
            *store, query = _reference_block_sequences(req)
            stores += [(req, *s) for s in store]
            queries.append((i, req, *query))
            seen["window"] += not req.params.block_cache
        stores.sort(key=lambda s: (len(s[1]), s[2][3]))
        for seq, (req, pos, use) in enumerate(stores):  # the pass's first sequences
            assert step.seq_lens[seq] == len(pos)
            at = starts[seq]
            np.testing.assert_array_equal(positions[at : at + len(pos)], pos)
            np.testing.assert_array_equal(ids[at : at + len(pos)], req.canvas_np[pos])
            got = step.caches.use(seq)
            assert tuple(got)[1:] == use
            np.testing.assert_array_equal(got.slots[: len(req.kv_slots)], req.kv_slots)
        seen["store"] += len(stores)
        for i, req, pos, use in queries:
            seq = step.seq_of[i]
            assert seq >= len(stores) and step.seq_lens[seq] == len(pos)
            at = step.offsets(i)[0]
            np.testing.assert_array_equal(positions[at : at + len(pos)], pos)
            np.testing.assert_array_equal(ids[at : at + len(pos)], req.canvas_np[pos])
            got = step.caches.use(seq)
            assert tuple(got)[1:] == use
            np.testing.assert_array_equal(got.slots[: len(req.kv_slots)], req.kv_slots)
        return step

    engine.runner.packer.pack = checking
    outs = engine.generate(prompts, [params[i % 4] for i in range(8)], use_tqdm=False)
    assert all(o.finish_reason == "steps" for o in outs)
    assert seen["store"] > 8 and seen["window"] > 0


def test_store_sequences_come_by_length_then_keys() -> None:
    """A late joiner's prompt store (12 positions up to 12) and a finished block's (4 up to
    16) in one pass: the shorter first, whatever their keys; equal lengths by keys, then in
    batch order; no store without the block cache or with the keys already stored."""
    from types import SimpleNamespace

    from foretell.engine.packing import _block_layouts

    def req(stored: int, cache: bool = True) -> SimpleNamespace:
        return SimpleNamespace(
            params=SimpleNamespace(block_length=4, block_cache=cache), kv_stored=stored
        )

    reqs = [req(0), req(12), req(8), req(4), req(0, cache=False), req(12)]
    block = np.array([3, 4, 4, 2, 2, 3])
    queries, stores = _block_layouts(reqs, block)
    assert stores[0].tolist() == [3, 1, 2, 0]  # which requests, in pass order
    assert stores[3].tolist() == [4, 4, 8, 12] and stores[4].tolist() == [8, 16, 16, 12]
    assert stores[2].tolist() == [4, 12, 8, 0]  # each from its first position not stored
    assert queries[2].tolist() == [12, 16, 16, 8, 0, 12]  # the window from 0 without the cache
    assert queries[4].tolist() == [16, 20, 20, 12, 12, 16]


def test_block_constants_are_kept_per_block_causal_row_and_follow_a_swap() -> None:
    """A block-causal request's constants (the batched block step's table) are computed at
    its row's first gather, follow a params swap, and other requests' rows hold none."""
    import dataclasses

    from foretell.decoding.block_step import BLOCK_CONSTANTS, _constants, block_constants

    rows = CanvasRows(
        capacity=1,
        width=8,
        block_constants_of=block_constants,
        block_constants_width=BLOCK_CONSTANTS,
    )
    params = DecodeParams(gen_length=8, block_length=4, steps=2, ignore_eos=True)
    block = Request("b", "p", [1, 2, 3], params, 0, "sdar", block_causal=True)
    assert block.block_causal
    other = _request("o", 3)
    for req in (block, other):
        rows.add(req)
    held = np.array([block.canvas_row, other.canvas_row])
    rows.geometry_of([block, other], held)
    np.testing.assert_array_equal(rows.block_constants[held[0]], _constants(params))
    assert np.isnan(rows.block_constants[held[1]]).all()
    block.params = dataclasses.replace(params, steps=4, early_commit=Prophet())
    rows.geometry_of([block], held[:1])
    np.testing.assert_array_equal(rows.block_constants[held[0]], _constants(block.params))
    with pytest.raises(ValueError, match="block_constants_of and block_constants_width"):
        CanvasRows(block_constants_of=block_constants)
