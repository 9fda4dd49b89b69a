"""Unseeded sampling of block-causal requests (SDAR, LLaDA2): every such request of a pass is
filtered with its own parameters and drawn from the engine's one shared stream, in a fixed
number of ops (issue #24: a request without a seed draws from one batched device stream); a
seeded request keeps its own generator, exact with the official draws
(``tests/test_block_engine.py``)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from foretell.decoding.block_step import filter_block_logits, sample_shared_rows, score_rows
from foretell.decoding.unmask import filter_logits_by_row
from foretell.engine import Engine
from foretell.engine import runner as runner_module
from foretell.params import DecodeParams
from tests.shared_draws import run_counting_draws

# Chi-square critical value for 3 degrees of freedom at p = 0.001.
CHI2_CRIT_DF3 = 16.266
DRAWS = 20000

# (temperature, top_k, top_p): each filter alone, both (where their order matters), neither.
SETTINGS = [
    (0.7, None, None),
    (1.0, 5, None),
    (0.0, 8, None),
    (1.3, None, 0.8),
    (0.9, 6, 0.7),
    (0.6, 3, 0.95),
    (1.0, None, 1.0),
    (0.0, 40, 0.5),
]


def _columns(settings: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runner's float columns of each setting: temperature, top-k (0: none), top-p
    (1: none)."""
    temperature = np.asarray([t for t, _, _ in settings], dtype=np.float64)
    top_k = np.asarray([k or 0 for _, k, _ in settings], dtype=np.int64)
    top_p = np.asarray([1.0 if p is None else p for _, _, p in settings], dtype=np.float64)
    return temperature, top_k, top_p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_each_row_is_filtered_as_the_official_decoders_filter_it_alone(dtype) -> None:
    """Bit for bit, row by row, in every dtype; logits on a coarse grid, so that the top-k's
    cut and the nucleus's edge tie often."""
    g = torch.Generator().manual_seed(3)
    settings = SETTINGS * 6
    logits = (torch.randint(-12, 12, (len(settings), 40), generator=g) / 4).to(dtype)
    temperature, top_k, top_p = _columns(settings)
    batched = filter_logits_by_row(
        logits, temperature, top_p, top_k, top_k_first=True, fill=float("-inf")
    )
    for row, (t, k, p) in enumerate(settings):
        assert torch.equal(batched[row], filter_block_logits(logits[row : row + 1], t, k, p)[0])
    # Dream's order (top-p first) keeps other tokens on these rows: the order is checked.
    dream_order = filter_logits_by_row(
        logits, temperature, top_p, top_k, top_k_first=False, fill=float("-inf")
    )
    assert not torch.equal(dream_order, batched)
    # The shared draw samples from these rows: each token is in its row's support, and its
    # confidence is its probability there.
    scores = sample_shared_rows(logits, temperature, top_k, top_p, torch.Generator())
    for row, (t, k, p) in enumerate(settings):
        probs = filter_block_logits(logits[row : row + 1], t, k, p).softmax(-1)[0]
        token = int(scores[0, row])
        assert probs[token] > 0
        assert float(scores[1, row]) == float(probs[token].float())


def test_shared_draws_follow_the_filtered_distribution() -> None:
    """20,000 rows of one 6-token row (temperature 0.7, top-k 5, top-p 0.95: four tokens
    left): the draws follow the filtered softmax, never leave it, and each row's confidence
    is its token's filtered probability; the gaps are the raw logits' (Prophet's)."""
    row = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.5]])
    logits = row.expand(DRAWS, -1).contiguous()
    temperature, top_k, top_p = _columns([(0.7, 5, 0.95)] * DRAWS)
    g = torch.Generator().manual_seed(0)
    scores = sample_shared_rows(logits, temperature, top_k, top_p, g)
    token = scores[0].long()
    probs = filter_block_logits(row, 0.7, 5, 0.95).softmax(-1)[0]
    support = probs > 0
    assert int(support.sum()) == 4
    assert support[token].all()
    observed = torch.bincount(token, minlength=6).double()[support]
    expected = probs[support].double() * DRAWS
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRIT_DF3, (observed, expected)
    assert torch.equal(scores[1], probs[token].float().double())
    assert torch.equal(scores[2], score_rows(logits, False)[2])
    # One engine stream, seeded: the same draws again from the same state.
    again = sample_shared_rows(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    assert torch.equal(again, scores)


def _unseeded(rng: random.Random, n: int) -> list[DecodeParams]:
    settings = [rng.choice(SETTINGS[:-1]) for _ in range(n)]
    return [
        DecodeParams(
            gen_length=rng.randrange(8, 17),
            steps=2,
            temperature=t,
            top_k=k,
            top_p=p,
            ignore_eos=True,
        )
        for t, k, p in settings
    ]


@pytest.mark.parametrize("family", ["sdar", "llada2"])
def test_unseeded_requests_share_one_draw_a_step(block_checkpoints, family) -> None:
    """Ten unseeded sampled requests with different filters in one batch: each step draws
    once from the shared stream (one ``rand``, no ``multinomial``) whatever their number, no
    request gets a generator of its own, and a fresh engine repeats the run exactly."""
    rng = random.Random(1)
    params = _unseeded(rng, 10)
    vocab = 40
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randrange(1, 12))] for _ in params]
    engine = Engine(str(block_checkpoints[family]), max_num_seqs=10)
    reqs = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    outputs, draws_per_step = run_counting_draws(engine)
    assert set(draws_per_step) == {(1, 0)}, draws_per_step
    assert all(outputs[r].finish_reason == "steps" for r in reqs)
    again = Engine(str(block_checkpoints[family]), max_num_seqs=10)
    repeated = again.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in repeated] == [outputs[r].token_ids for r in reqs]


def test_a_failed_shared_draw_fails_only_the_request_that_fails_alone(
    block_checkpoints, monkeypatch
) -> None:
    """The pass's shared draw fails: its requests are drawn one by one, so only the one whose
    own draw fails ends with the error; the others finish, and every page returns."""
    real = runner_module.sample_shared_rows

    def failing(logits, temperature, top_k, top_p, generator):
        if (temperature == 0.5).any():
            raise RuntimeError("boom")
        return real(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(runner_module, "sample_shared_rows", failing)
    engine = Engine(str(block_checkpoints["sdar"]), max_num_seqs=4)
    good = DecodeParams(gen_length=12, temperature=0.8, top_k=6, ignore_eos=True)
    bad = DecodeParams(gen_length=12, temperature=0.5, ignore_eos=True)
    outs = engine.generate([[5, 9], [6, 7], [8]], [good, bad, good], use_tqdm=False)
    assert [o.finish_reason for o in outs] == ["steps", "error", "steps"]
    assert "sampling failed" in outs[1].error and "boom" in outs[1].error
    assert engine.kv_pool.used_pages == 0


@pytest.mark.parametrize("family", ["sdar", "llada2"])
def test_each_request_is_filtered_with_its_own_parameters(block_checkpoints, family) -> None:
    """Unseeded requests whose filters leave one token a row (top-k 1, or a nucleus of 1e-6)
    draw what their seeded twins draw, in a batch with other unseeded sampled requests: the
    shared draw reads each request's own temperature, top-k and top-p (read crosswise, as
    top-k 0 and top-p 1, they would sample freely)."""
    single = [(1.0, 1, 0.5), (1.3, 40, 1e-6), (0.7, 1, None)]
    rng = random.Random(2)
    prompts = [[rng.randrange(4, 40) for _ in range(n)] for n in (3, 7, 5, 2, 9)]

    def params(t, k, p, seed=None):
        return DecodeParams(
            gen_length=16, steps=2, temperature=t, top_k=k, top_p=p, seed=seed, ignore_eos=True
        )

    others = [params(0.9, None, 0.9), params(1.2, 6, None)]
    engine = Engine(str(block_checkpoints[family]), max_num_seqs=5)
    unseeded = engine.generate(prompts, [params(*s) for s in single] + others, use_tqdm=False)
    twins = [params(*s, seed=i) for i, s in enumerate(single)]
    seeded = engine.generate(prompts[:3], twins, use_tqdm=False)
    assert [o.token_ids for o in unseeded[:3]] == [o.token_ids for o in seeded]


def test_a_row_of_nan_logits_draws_no_token() -> None:
    """A row with a NaN logit has no distribution (the official multinomial refuses it): the
    shared draw gives it token -1 and leaves every other row's draw as it is."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 12, generator=gen)
    broken = logits.clone()
    broken[1, 4] = float("nan")
    temperature, top_k, top_p = _columns([(0.8, None, None)] * 3)
    clean = sample_shared_rows(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    drawn = sample_shared_rows(broken, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    assert float(drawn[0, 1]) == -1
    assert torch.equal(drawn[0, [0, 2]], clean[0, [0, 2]])


def test_a_request_whose_logits_are_nan_fails_alone(block_checkpoints) -> None:
    """An unseeded sampled request whose logits turn NaN (a NaN embedding of a token only its
    prompt holds) ends with an error that says so; the requests beside it in the shared draw
    finish, and every page returns. Before, the draw took a NaN column's index as its token."""
    engine = Engine(str(block_checkpoints["sdar"]), max_num_seqs=3)
    with torch.no_grad():
        engine.runner.model.embed.weight[39] = float("nan")
    params = DecodeParams(gen_length=12, steps=4, temperature=0.8, ignore_eos=True)
    outs = engine.generate([[5, 9], [6, 39, 7], [8]], params, use_tqdm=False)
    assert [o.finish_reason for o in outs] == ["steps", "error", "steps"]
    assert "NaN" in outs[1].error
    assert engine.kv_pool.used_pages == 0
