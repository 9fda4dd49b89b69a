"""The engine's decoding equals the reference decoders, token for token, in a mixed batch.

Every case runs three ways: inside one heterogeneous ``Engine.generate`` call (small
``max_num_seqs``, so requests are evicted and backfilled throughout), alone in a fresh engine,
and through the plain reference re-implementation in ``reference_decoders.py`` (float64 models,
same seeds). Tokens and forward-pass counts must all agree.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference_decoders import dream_generate, early_exit_of, llada_generate

from foretell import DecodeParams, Engine, Prophet

PROMPTS = ["12+34=", "what is 7*8?", "a", "count: 1 2 3 4 5 6 7 8 9 10", "x=3, y=x+4, y?"]

# (block_length, steps) with gen_length 64: steps dividing and not dividing a block's masks.
LLADA_SHAPES = [(8, 64), (8, 40), (8, 24), (16, 64), (16, 24), (16, 12), (64, 64), (64, 20)]
# Prophet thresholds chosen so that commits land early, mid-way, late, or never.
PROPHETS = [
    None,
    Prophet(thresholds=(4.0, 4.0, 4.0), answer_start=40, answer_length=5),
    Prophet(thresholds=(5.0, 3.5, 1.6)),
    Prophet(thresholds=(8.0, 2.0, 2.0), statistic="min", answer_start=50, answer_length=14),
    Prophet(thresholds=(9.0, 9.0, 9.0)),
]
DREAM_PROPHETS = [
    Prophet(thresholds=(7.0, 5.0, 1.2), answer_start=20, answer_length=5),
    Prophet(thresholds=(8.0, 6.0, 2.0), statistic="min", answer_start=10, answer_length=20),
]


def _llada_cases(tokenizer) -> list[tuple[str, DecodeParams]]:
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    cases = []
    for i, ((block, steps), remasking, prophet) in enumerate(
        itertools.product(LLADA_SHAPES, ["low_confidence", "random"], PROPHETS)
    ):
        extra = {}
        if i % 3 == 1:
            extra["constraints"] = {30: a, 31: b, 32: a}
        if i % 4 == 2:
            extra["cfg_scale"] = 1.5
        params = DecodeParams(
            gen_length=64,
            block_length=block,
            steps=steps,
            remasking=remasking,
            early_commit=prophet,
            seed=100 + i,
            **extra,
        )
        cases.append((PROMPTS[i % len(PROMPTS)], params))
    # Other generation lengths in the same batch.
    cases.append((PROMPTS[0], DecodeParams(gen_length=16, block_length=4, steps=8)))
    cases.append((PROMPTS[1], DecodeParams(gen_length=24, block_length=8, steps=24, seed=5)))
    return cases


def _dream_cases() -> list[tuple[str, DecodeParams]]:
    cases = []
    algs = ["origin", "maskgit_plus", "topk_margin", "entropy"]
    for i, (alg, steps, prophet) in enumerate(
        itertools.product(algs, [64, 24, 10], [None, *DREAM_PROPHETS])
    ):
        gen = 64 if i % 2 == 0 else 32
        cases.append(
            (
                PROMPTS[i % len(PROMPTS)],
                DecodeParams(
                    gen_length=gen,
                    steps=min(steps, gen),
                    remasking=alg,
                    early_commit=prophet,
                    seed=7 + i,
                ),
            )
        )
    return cases


def _reference(loaded, prompt_ids: list[int], p: DecodeParams) -> tuple[list[int], int]:
    model, mask = loaded.model, loaded.model.mask_token_id
    prompt = torch.tensor([prompt_ids])
    if p.seed is not None:  # greedy cases need no seed (seed=None is the default)
        torch.manual_seed(p.seed)
    policy = p.early_commit
    if loaded.model.family == "llada":
        if policy is not None and policy.answer_start is None:
            pytest.skip("the reference has no still-masked region")  # never hit: see below
        x, passes = llada_generate(
            model,
            prompt,
            steps=p.steps,
            gen_length=p.gen_length,
            block_length=p.block_length,
            remasking=p.remasking,
            cfg_scale=p.cfg_scale,
            mask_id=mask,
            constraints=p.constraints,
            early_exit=early_exit_of(policy),
            statistic=policy.statistic if policy else "mean",
        )
    else:
        x, passes = dream_generate(
            model,
            prompt,
            steps=p.steps,
            gen_length=p.gen_length,
            alg={"low_confidence": "maskgit_plus", "margin": "topk_margin"}.get(
                p.remasking, p.remasking
            ),
            mask_id=mask,
            early_exit=early_exit_of(policy),
            statistic=policy.statistic if policy else "mean",
        )
    return x[0, len(prompt_ids) :].tolist(), passes


def _run_mixed_and_alone(loaded, cases):
    engine = Engine(loaded, dtype="float64", max_num_seqs=6)
    mixed = engine.generate([c[0] for c in cases], [c[1] for c in cases], use_tqdm=False)
    alone = []
    for prompt, params in cases:
        solo = Engine(loaded, dtype="float64", max_num_seqs=1)
        alone.append(solo.generate([prompt], params, use_tqdm=False)[0])
    return mixed, alone


def _check(loaded, cases, mixed, alone, region_free_ok: bool) -> None:
    commit_steps = set()
    for (prompt, params), out, solo in zip(cases, mixed, alone, strict=True):
        assert out.token_ids == solo.token_ids, (prompt, params)
        assert out.num_forward_passes == solo.num_forward_passes
        if out.committed_early:
            commit_steps.add(out.commit_step)
        policy = params.early_commit
        if policy is not None and policy.answer_start is None and not region_free_ok:
            continue
        if policy is not None and policy.answer_start is None:
            continue  # foretell's generalisation; the reference has no such region
        tokens, passes = _reference(loaded, out.prompt_token_ids, params)
        assert out.token_ids == tokens, (prompt, params)
        assert out.num_forward_passes == passes, (prompt, params)
    # The grid must really exercise early commits at several different steps.
    assert len(commit_steps) >= 4, commit_steps


def test_llada_mixed_batch_equals_alone_and_reference(llada64) -> None:
    cases = _llada_cases(llada64.tokenizer)
    mixed, alone = _run_mixed_and_alone(llada64, cases)
    _check(llada64, cases, mixed, alone, region_free_ok=False)
    assert sum(o.committed_early for o in mixed) >= 10


def test_dream_mixed_batch_equals_alone_and_reference(dream64) -> None:
    cases = _dream_cases()
    mixed, alone = _run_mixed_and_alone(dream64, cases)
    _check(dream64, cases, mixed, alone, region_free_ok=False)


def test_still_masked_region_commits_on_the_remaining_masks(llada64) -> None:
    """foretell's default region: the gap over every still-masked position of the generation;
    a commit fills exactly those, with this step's argmax."""
    engine = Engine(llada64, dtype="float64")
    never = DecodeParams(gen_length=32, block_length=8, steps=16, early_commit=Prophet((1e9,) * 3))
    rid = engine.add_request("12+34=", never)
    req = engine._live[rid]
    for _ in range(5):
        engine.step()
    canvas_before = req.canvas.clone()
    masked = (canvas_before == engine.mask_token_id).nonzero().flatten()
    with torch.no_grad():
        logits = llada64.model(canvas_before[None])[0]
        top2 = logits[masked].topk(2, dim=-1).values
        gap = float((top2[:, 0] - top2[:, 1]).mean())
    # Lower the bar below the gap the next step will see: it must commit now.
    req.params = req.params.replace(early_commit=Prophet((gap - 1e-6,) * 3))
    (out,) = engine.step()
    assert out.finish_reason == "early_commit" and out.commit_step == 6
    assert out.last_gap == pytest.approx(gap)
    expected = canvas_before.clone()
    expected[masked] = logits[masked].argmax(-1)
    assert out.token_ids == expected[len(out.prompt_token_ids) :].tolist()
