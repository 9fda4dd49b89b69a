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
    # Failed inside the batched step: its row returns, the other request's runs on.
    real = batched_module.BatchedStep._apply

    def failing(self, j, req, *args):
        if req.request_id == "bad":
            raise RuntimeError("injected fault")
        return real(self, j, req, *args)

    monkeypatch.setattr(batched_module.BatchedStep, "_apply", failing)
    engine.add_request("12+34=", dual, request_id="bad")
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
