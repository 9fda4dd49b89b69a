"""Every block-causal request of a pass steps at once (``block_step.advance_blocks``), and
each one's step equals the per-request rule (``block_step.advance_block``, which the engine
tests pin against the SDAR and LLaDA2 reference decoders).

The scores are synthetic so that every branch runs often: confidences on a grid of quarters
(ties at the cut, and at the threshold) and now and then NaN, Prophet gaps around the
thresholds (means within the margin that the reference's own reduction decides), stop ids
among the tokens (LLaDA2's early stop and the stop after a block), and the mask token among
them (a block's last mask revealed as the mask token is not done)."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from foretell.decoding import block_step
from foretell.engine import Engine
from foretell.engine import engine as engine_module
from foretell.engine import runner as runner_module
from foretell.engine.runner import ModelRunner
from foretell.params import DecodeParams, Prophet

STOP = 7  # a token id the synthetic draws return now and then


def _synthetic_scores(self, batch, blocks, block_pos, gathered, bounds, values):
    """``ModelRunner._block_scores`` from a stream of the request's prompt and step alone."""
    out = []
    flat, counts = block_pos[0], block_pos[1]
    positions = torch.from_numpy(flat).split(counts.tolist())
    for i, pos in zip(blocks.tolist(), positions, strict=True):
        req = batch[i]
        key = f"{req.prompt_token_ids}:{req.global_step}".encode()  # the same in both runs
        g = torch.Generator().manual_seed(zlib.crc32(key))
        n = len(pos)
        tokens = torch.randint(4, 40, (n,), generator=g)
        tokens[torch.rand(n, generator=g) < 0.03] = STOP
        tokens[torch.rand(n, generator=g) < 0.05] = req.mask_token_id  # stays masked
        conf = torch.randint(0, 4, (n,), generator=g).float() / 4
        conf[torch.rand(n, generator=g) < 0.02] = float("nan")  # topk ranks it first
        # The middle threshold, and its float32 neighbours: a float32 mean and a float64
        # one fall on either side of it often.
        gaps = 2.5 + (torch.randint(-1, 2, (n,), generator=g) * 2.0**-22)
        scores = torch.stack([tokens.double(), conf.double(), gaps.float().double()])
        out.append((req, pos, scores))
    return out


def _params(rng: random.Random, family: str, i: int) -> DecodeParams:
    block = (4, 8, 16)[i % 3]
    steps = rng.choice([s for s in (1, 2, 3, 4, 8, block) if s <= block])
    policy = None
    if i % 2:
        span = (None, 5) if i % 4 == 1 else (rng.randrange(0, 6), rng.randrange(1, 6))
        statistic = rng.choice(["mean", "min"])
        policy = Prophet((4.0, 2.5, 1.0), (0.33, 0.67), *span, statistic)
    rule = rng.choice(["low_confidence", "confidence_threshold"])
    early_stop = family == "llada2" and i % 3 == 0
    return DecodeParams(
        gen_length=rng.randrange(6, 41),
        block_length=block,
        steps=steps,
        remasking=rule,
        threshold=rng.choice([0.25, 0.5, 0.6]),
        early_commit=policy,
        stop_token_ids=[STOP] if i % 5 == 0 or early_stop else [],
        ignore_eos=True,
        eos_early_stop=early_stop,
    )


def _per_request(items, canvas_rows) -> None:
    for req, positions, scores in items:
        try:
            block_step.advance_block(req, positions, scores)
        except Exception as err:
            req.finish("error", f"decoding failed: {err!r}")


@pytest.mark.parametrize("family", ["sdar", "llada2"])
def test_the_batched_block_step_equals_each_request_stepped_alone(
    block_checkpoints, family, monkeypatch
) -> None:
    monkeypatch.setattr(ModelRunner, "_block_scores", _synthetic_scores)
    rng = random.Random(5)
    engine = Engine(str(block_checkpoints[family]), max_num_seqs=24)
    vocab, mask = engine.model.vocab_size, engine.mask_token_id
    tokens = [t for t in range(4, vocab) if t not in (mask, STOP)]
    prompts = [[rng.choice(tokens) for _ in range(rng.randrange(1, 30))] for _ in range(60)]
    params = [_params(rng, family, i) for i in range(60)]
    # The batched step's fallbacks, counted: each must run for this test to mean anything.
    alone_calls, reductions = [], []
    real_alone, real_reduce = block_step.advance_block, block_step.reduce_gaps

    # Ties whose Prophet gap the plan measured, which the step takes as planned: each with
    # what the request measures alone (its test must not fire), before its step.
    planned_gaps = []

    def counting_alone(req, positions, scores, *planned):
        alone_calls.append(req.request_id)
        policy = req.params.early_commit
        lo, hi = req.block_bounds()
        if not (planned and policy is not None and req.masked_count(lo, hi)):
            return real_alone(req, positions, scores, *planned)
        before = req.last_gap
        gaps = scores[2].float()
        assert not block_step._prophet_fires(req, policy, positions, gaps, lo, hi)
        alone, req.last_gap = req.last_gap, before  # measured alone; then as it was
        real_alone(req, positions, scores, *planned)
        planned_gaps.append((alone, planned[0], req.last_gap))
        return None

    def counting_reduce(gaps, statistic):
        reductions.append(statistic)
        return real_reduce(gaps, statistic)

    monkeypatch.setattr(block_step, "advance_block", counting_alone)
    monkeypatch.setattr(block_step, "reduce_gaps", counting_reduce)
    batched = engine.generate(prompts, params, use_tqdm=False)
    assert alone_calls and reductions  # ties were ranked alone; close means were reduced
    assert any(alone is not None for alone, _, _ in planned_gaps)
    for alone, planned, stored in planned_gaps:  # the gap measured alone is the one stored
        assert planned == alone if alone is not None else planned != planned  # NaN: none
        assert stored == alone
    monkeypatch.setattr(engine_module, "advance_blocks", _per_request)
    alone = engine.generate(prompts, params, use_tqdm=False)

    def outcome(o):
        return (
            o.token_ids,
            o.finish_reason,
            o.num_forward_passes,
            o.commit_step,
            o.last_gap,
            o.error,
            o.revealed,
        )

    assert [outcome(o) for o in batched] == [outcome(o) for o in alone]
    reasons = {o.finish_reason for o in batched}
    assert {"stop", "steps"} <= reasons and any(o.committed_early for o in batched)
    assert all(o.error is None for o in batched)
    assert engine.kv_pool.used_pages == 0


def test_a_failing_plan_steps_every_request_alone(block_checkpoints, monkeypatch) -> None:
    """Planning changes nothing before it fails, so each request then takes its own step."""
    engine = Engine(str(block_checkpoints["sdar"]), max_num_seqs=4)
    params = DecodeParams(gen_length=8, block_length=4, steps=4, ignore_eos=True)
    prompts = [[5, 9, 12], [7, 8, 9, 10, 11]]
    expected = engine.generate(prompts, params, use_tqdm=False)

    def failing(items, canvas_rows):
        raise RuntimeError("planning failed")

    monkeypatch.setattr(block_step, "_plan_blocks", failing)
    got = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.num_forward_passes for o in got] == [o.num_forward_passes for o in expected]


def test_the_rows_of_a_pass_are_each_requests_block_positions(
    block_checkpoints, monkeypatch
) -> None:
    """``block_rows`` (every request of a pass at once) equals ``block_positions`` (one
    request) at every step of a mix: greedy and sampled, with and without the block cache,
    Prophet with an explicit span or none."""
    rng = random.Random(8)
    engine = Engine(str(block_checkpoints["sdar"]), max_num_seqs=16)
    params = []
    for i in range(24):
        policy = Prophet((4.0, 2.5, 1.0), answer_start=rng.randrange(0, 6), answer_length=3)
        params.append(
            DecodeParams(
                gen_length=rng.randrange(6, 30),
                block_length=(4, 8)[i % 2],
                steps=4,
                temperature=0.7 if i % 3 == 0 else 0.0,
                block_cache=i % 4 != 1,
                early_commit=policy if i % 3 == 2 else None,
                ignore_eos=True,
                seed=i,
            )
        )
    checked = []
    real = block_step.block_rows

    def checking(reqs, canvas_rows):
        flat, counts, query, drawn = real(reqs, canvas_rows)
        parts = np.split(flat, np.cumsum(counts)[:-1])
        for req, part, start, sampled in zip(reqs, parts, query, drawn, strict=True):
            np.testing.assert_array_equal(part, block_step.block_positions(req).numpy())
            assert start == req.query_start and sampled == block_step.samples(req)
            checked.append((sampled, req.params.block_cache, req.params.early_commit is None))
        return flat, counts, query, drawn

    monkeypatch.setattr(runner_module, "block_rows", checking)
    prompts = [[rng.randrange(4, 30) for _ in range(rng.randrange(1, 20))] for _ in params]
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert all(o.error is None for o in outs)
    assert len(set(checked)) == 6  # every kind above, checked at many steps
