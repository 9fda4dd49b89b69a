"""The batched step equals the per-request step, request for request and step by step."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import foretell.decoding.batched as batched_module
from foretell import DecodeParams, Engine, Prophet
from foretell.decoding.unmask import gumbel_perturbed
from foretell.models.tiny import tiny_model
from tests.shared_draws import run_counting_draws

PROMPTS = ["1+1=", "22+22=", "333+333=", "4444+4444=", "a", "bb", "ccc+d", "9"]


def _mixed_params(n: int, seed: int) -> list[DecodeParams]:
    """Greedy LLaDA requests of every shape the batched step takes (lengths, blocks, budgets,
    both remaskings, Prophet spans and masked regions with mean and min, constraints that leave
    steps with nothing to reveal), plus requests it must leave to the per-request path."""
    rng = random.Random(seed)
    policies = [
        None,
        Prophet(answer_start=2, answer_length=3, thresholds=(3.0, 2.0, 1.0)),
        Prophet(answer_start=0, answer_length=4, thresholds=(2.0, 1.0, 0.5), statistic="min"),
        Prophet(thresholds=(2.5, 1.5, 0.5)),
        Prophet(thresholds=(1.5, 1.0, 0.5), statistic="min"),
    ]
    out = []
    for i in range(n):
        gen = rng.choice([8, 16, 24, 32])
        block = rng.choice([b for b in (4, 8, 16, 32) if gen % b == 0])
        blocks = gen // block
        steps = rng.choice([s for s in range(blocks, gen + 1, blocks)])
        kwargs = dict(
            gen_length=gen,
            block_length=block,
            steps=steps,
            remasking=rng.choice(["low_confidence", "random"]),
            # The last policy's span runs past the canvas and is clipped.
            early_commit=rng.choice([*policies, Prophet(answer_start=gen - 2, answer_length=8)]),
            seed=rng.randrange(1000),
        )
        if rng.random() < 0.3:
            kwargs["constraints"] = {0: "x", gen // 2: "y"}
        kind = i % 9
        if kind == 5:
            kwargs["temperature"] = 0.8  # sampled: per-request path
        elif kind == 6:
            kwargs["cfg_scale"] = 1.0  # guided: per-request path
        elif kind == 7:
            kwargs["remasking"] = "confidence_threshold"
            kwargs["threshold"] = rng.choice([0.3, 0.6, 0.9])
        elif kind == 8:
            # Fast-dLLM's caches, with each rule; the static rules need 2 steps a block.
            kwargs["kv_cache"] = rng.choice(["prefix", "dual"])
            kwargs["remasking"] = rng.choice(["low_confidence", "random", "confidence_threshold"])
            kwargs["threshold"] = rng.choice([0.3, 0.6, 0.9])
            kwargs["steps"] = rng.choice([s for s in range(2 * blocks, gen + 1, blocks)])
            kwargs.pop("constraints", None)
        out.append(DecodeParams(**kwargs))
    # Constraints leave 7 masks for 8 steps per block: one step per block reveals nothing.
    idle = {"gen_length": 16, "block_length": 8, "steps": 16, "constraints": {0: "x", 8: "y"}}
    out[0] = DecodeParams(**idle, remasking="random", seed=1)
    return out


def _state(out) -> tuple:
    return (
        out.token_ids,
        out.revealed,
        out.finish_reason,
        out.num_forward_passes,
        out.commit_step,
        out.last_gap,
        out.error,
    )


@pytest.mark.parametrize(
    ("logit_scale", "dtype", "recheck"),
    [
        (8.0, "float64", False),
        (400.0, "float64", False),
        (8.0, "float32", False),
        (8.0, "float32", True),
    ],
    ids=["float64", "saturated-ties", "float32", "float32-every-mean-rechecked"],
)
def test_greedy_batch_equals_per_request_step(logit_scale, dtype, recheck, monkeypatch) -> None:
    """Two engines over the same model, one stepping greedy requests together and one per
    request, agree on every request's canvas, revealed positions, gap and outcome after every
    step. With a huge logit scale many probabilities are exactly 1.0, so top-k breaks ties.
    ``recheck``: every mean gap counts as too close to its threshold for the batched float64
    mean, so the reference's own reduction decides each one (the rare path, taken always)."""
    if recheck:
        monkeypatch.setattr(batched_module, "undecided", lambda *args: True)
    loaded = tiny_model("llada", seed=5, dtype=dtype, logit_scale=logit_scale)
    members, fills, outside = [], [], []
    real_bind = batched_module.BatchedStep.bind

    def counting(self, rows, rows_d, stats, more, read_only=None, logits=None):
        members.append(len(self.reqs))

        def counted_more(flat_rows):
            fills.append(len(flat_rows))
            return more(flat_rows)

        def counted_read_only(reqs, positions):
            outside.append(len(reqs))
            return read_only(reqs, positions)

        return real_bind(self, rows, rows_d, stats, counted_more, counted_read_only, logits)

    monkeypatch.setattr(batched_module.BatchedStep, "bind", counting)
    engines = [Engine(loaded, dtype=dtype, max_num_seqs=6) for _ in range(2)]
    engines[1].runner.batched = False
    params = _mixed_params(54, seed=int(logit_scale))
    for i, p in enumerate(params):
        for engine in engines:
            engine.add_request(PROMPTS[i % len(PROMPTS)], p, request_id=str(i))
    finished = [{}, {}]
    steps, idle_random_steps = 0, 0
    while engines[0].has_unfinished_requests() or engines[1].has_unfinished_requests():
        for engine, done in zip(engines, finished, strict=True):
            done.update({o.request_id: _state(o) for o in engine.step()})
        assert finished[0] == finished[1], f"step {steps}"
        live = [r.request_id for r in engines[0].scheduler.running]
        for rid in live:
            state = _state(engines[0].snapshot(rid))
            assert state == _state(engines[1].snapshot(rid)), rid
            if not state[1] and params[int(rid)].remasking == "random":
                idle_random_steps += 1  # a step that revealed nothing still drew
        steps += 1
    assert len(finished[0]) == len(params)
    outcomes = {state[2] for state in finished[0].values()}
    assert outcomes == {"steps", "early_commit"}, outcomes
    greedy = [p for p in params if p.temperature == 0 and p.cfg_scale == 0]
    assert sum(members) >= len(greedy) > len(params) // 2  # every greedy one took the batch
    assert {p.kv_cache for p in greedy} == {None, "prefix", "dual"}
    assert {p.remasking for p in greedy} == {"low_confidence", "random", "confidence_threshold"}
    # The rare paths ran too: a commit filling rows outside the gathered ones, and random
    # remasking on a step with nothing to reveal.
    assert fills and idle_random_steps


def test_a_greedy_batch_that_cannot_be_built_falls_back_to_the_per_request_path(
    llada64, monkeypatch
) -> None:
    params = [DecodeParams(gen_length=16, steps=8, seed=i) for i in range(3)]
    expected = Engine(llada64, dtype="float64").generate(PROMPTS[:3], params, use_tqdm=False)

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(batched_module.BatchedStep, "__init__", broken)
    outs = Engine(llada64, dtype="float64").generate(PROMPTS[:3], params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]
    assert {o.finish_reason for o in outs} == {"steps"}


def test_batchable_covers_every_llada_rule_and_dreams_scored_rules() -> None:
    from foretell.scheduler.request import Request

    def req(family="llada", **kw) -> Request:
        return Request("r", "p", [1, 2], DecodeParams(gen_length=8, **kw), 0, family)

    assert batched_module.batchable(req())
    assert batched_module.batchable(req(remasking="random", early_commit=Prophet()))
    assert batched_module.batchable(req(temperature=0.5))
    assert batched_module.batchable(req(temperature=0.5, early_commit=Prophet()))
    cached = {"kv_cache": "dual", "steps": 4, "block_length": 4}
    assert batched_module.batchable(req(temperature=0.5, **cached))
    assert batched_module.batchable(req(temperature=0.5, early_commit=Prophet(), **cached))
    assert batched_module.batchable(req(cfg_scale=1.0))
    assert batched_module.batchable(req(cfg_scale=1.0, early_commit=Prophet()))
    span = Prophet(answer_start=0, answer_length=4)  # a commit would need unguided rows
    assert batched_module.batchable(req(cfg_scale=1.0, early_commit=span))
    assert batched_module.batchable(req(remasking="confidence_threshold"))
    assert batched_module.batchable(req(kv_cache="dual", steps=4, block_length=4))
    assert batched_module.batchable(req(remasking="margin"))
    assert batched_module.batchable(req(remasking="entropy", kv_cache="prefix", steps=8))
    assert batched_module.batchable(req(top_k=3))
    assert batched_module.batchable(req(family="dream", remasking="entropy"))
    assert batched_module.batchable(req(family="dream", remasking="topk_margin"))
    assert batched_module.batchable(req(family="dream", remasking="random"))
    assert batched_module.batchable(req(family="dream", remasking="origin"))
    assert batched_module.batchable(req(family="dream", alg_temp=0.5))
    assert batched_module.batchable(req(family="dream", remasking="random", alg_temp=0.5))
    assert batched_module.batchable(req(family="dream", temperature=0.2, top_p=0.95))
    dream_cached = req(
        family="dream", kv_cache="dual", steps=8, block_length=4, remasking="entropy"
    )
    assert batched_module.batchable(dream_cached)


def test_seeded_random_remasking_in_bfloat16_equals_the_per_request_step() -> None:
    """Random draws are float32; in a bfloat16 model they must not be rounded to the
    confidences' dtype before ranking (distinct draws would tie and be ranked apart)."""
    loaded = tiny_model("llada", seed=5, dtype="bfloat16", logit_scale=8.0)
    engines = [Engine(loaded, dtype="bfloat16", max_num_seqs=16) for _ in range(2)]
    engines[1].runner.batched = False
    for i in range(32):
        p = DecodeParams(gen_length=64, block_length=64, steps=4, remasking="random", seed=100 + i)
        for engine in engines:
            engine.add_request("1+1=", p, request_id=str(i))
    tokens = [{}, {}]
    for engine, out in zip(engines, tokens, strict=True):
        while engine.has_unfinished_requests():
            out.update({o.request_id: o.token_ids for o in engine.step()})
    assert tokens[0] == tokens[1]


def _scored_params(family: str, n: int, seed: int, sampled: bool = False) -> list[DecodeParams]:
    """Greedy requests ranked by a score other than LLaDA's low confidence: Dream's rules
    (uncached: one grid of steps over the generation) and LLaDA's margin and entropy (which
    take no cache), with Prophet on some. ``sampled``: every request draws or filters its
    candidates instead (temperature, top-p, top-k); a commit then draws its fill."""
    rng = random.Random(seed)
    policies = [None, Prophet(thresholds=(2.5, 1.5, 0.5)), Prophet(statistic="min")]
    out = []
    for _ in range(n):
        gen = rng.choice([8, 16, 24])
        kwargs = dict(gen_length=gen, early_commit=rng.choice(policies), seed=rng.randrange(99))
        if sampled:
            kwargs.update(
                rng.choice(
                    [
                        {"temperature": 0.7},
                        {"temperature": 1.0, "top_p": 0.9},
                        {"temperature": 0.5, "top_k": 5},
                        {"temperature": 0.0, "top_k": 3},  # filtered, not drawn
                    ]
                )
            )
        if family == "dream":
            rules = ["maskgit_plus", "topk_margin", "entropy", "random", "confidence_threshold"]
            kwargs["remasking"] = rng.choice(rules)
            kwargs["threshold"] = rng.choice([0.1, 0.5, 0.9])
            kwargs["steps"] = rng.choice([2, gen // 2, gen])
        else:
            block = rng.choice([b for b in (4, 8) if gen % b == 0])
            kwargs.update(block_length=block, remasking=rng.choice(["margin", "entropy"]))
            kwargs["steps"] = rng.choice([1, 2]) * (gen // block)  # (no cache: LLaDA's ranks)
        out.append(DecodeParams(**kwargs))
    return out


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", ["dream", "llada"])
def test_scored_rules_in_the_batch_equal_the_per_request_step(family, dtype, sampled) -> None:
    """Dream's maskgit_plus / topk_margin / entropy and LLaDA's margin / entropy, stepped by
    the batched step, equal the per-request step after every step (state and outcome); so do
    seeded sampled and filtered requests of both families (and, for LLaDA, of every rule and
    cache mode: ``_sampled_llada``); and Fast-dLLM's cached Dream steps (``_dream_cached``)."""
    loaded = tiny_model(family, seed=7, dtype=dtype)
    params = _scored_params(family, 24, seed=3, sampled=sampled)
    if sampled and family == "llada":
        params += _sampled_llada(16, seed=4)
    if family == "dream":
        params += _dream_cached(16, seed=6, sampled=sampled)
    finished, members = _lockstep(loaded, dtype, params)
    assert len(finished) == len(params)
    assert sum(members) >= 2 * len(params)  # every request took the batch, step after step
    assert {state[2] for state in finished.values()} == {"steps", "early_commit"}


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_dreams_alg_temp_in_the_batch_equals_the_per_request_step(dtype) -> None:
    """Dream's ``alg_temp`` (the reveal drawn without replacement from ``softmax(scores /
    alg_temp)``) by every ranked rule, greedy or sampled, with Prophet on some, seeded: drawn
    from each request's own stream after its candidates' and random remasking's draws, every
    step equal to the per-request step; the threshold rule ignores it there and here."""
    loaded = tiny_model("dream", seed=7, dtype=dtype)
    rng = random.Random(12)
    params = []
    for _ in range(20):
        gen = rng.choice([8, 16])
        kwargs = dict(gen_length=gen, steps=rng.choice([2, gen // 2, gen]), seed=rng.randrange(99))
        kwargs["remasking"] = rng.choice(["maskgit_plus", "topk_margin", "entropy", "random"])
        kwargs["alg_temp"] = rng.choice([0.05, 0.5, 2.0])
        kwargs["temperature"] = rng.choice([0.0, 0.7])
        kwargs["early_commit"] = rng.choice([None, Prophet(thresholds=(2.5, 1.5, 0.5))])
        params.append(DecodeParams(**kwargs))
    params.append(DecodeParams(gen_length=8, remasking="confidence_threshold", alg_temp=0.5))
    drawn, real = [], batched_module.BatchedStep._draw_reveals

    def counting(self, ranking, chosen):
        drawn.append(len(ranking.draws_own))
        return real(self, ranking, chosen)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batched_module.BatchedStep, "_draw_reveals", counting)
        finished, members = _lockstep(loaded, dtype, params)
    assert len(finished) == len(params)
    assert sum(members) >= 2 * len(params)  # every request took the batch, step after step
    assert sum(drawn) >= 2 * len(params)


def _sampled_llada(n: int, seed: int) -> list[DecodeParams]:
    """Seeded sampled LLaDA requests of the other rules and Fast-dLLM's cache modes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rule = rng.choice(["low_confidence", "random", "confidence_threshold"])
        out.append(
            DecodeParams(
                gen_length=16,
                block_length=8,
                steps=4,
                remasking=rule,
                threshold=0.5,
                kv_cache=rng.choice([None, "prefix", "dual"]),
                temperature=rng.choice([0.4, 0.9]),
                top_p=rng.choice([None, 0.8]),
                seed=rng.randrange(99),
            )
        )
    return out


def test_dream_counts_without_tensors_equal_dreams_float32_counts() -> None:
    from foretell.decoding.unmask import dream_transfer_count, dream_transfer_counts_np

    for eps in (1e-3, 0.07):
        for steps in (1, 3, 7, 64, 255):
            grid = torch.linspace(1, eps, steps + 1)
            cases = [(m, st) for st in range(steps) for m in (0, 1, 5, 63, 200, 1001)]
            masked, step = (np.array(c, dtype=np.int64) for c in zip(*cases, strict=True))
            at = np.maximum(np.minimum(step, steps - 2), 0)
            g = grid.numpy()
            counts = dream_transfer_counts_np(
                masked, step, np.full_like(step, steps), g[at], g[at + 1]
            )
            expected = [dream_transfer_count(int(m), int(st), steps, grid) for m, st in cases]
            assert counts.tolist() == expected


def test_llada_step_counts_are_the_block_schedule() -> None:
    """LLaDA's per-step counts, from the block's first mask count alone (ints or arrays)."""
    from foretell.decoding.unmask import llada_step_count

    for masked in (0, 1, 7, 32, 33):
        for steps in (1, 4, 8, 32):
            base, extra = divmod(masked, steps)
            schedule = [base + (1 if i < extra else 0) for i in range(steps)]
            assert [llada_step_count(masked, steps, i) for i in range(steps)] == schedule
            assert sum(schedule) == masked
            arr = llada_step_count(np.full(steps, masked), np.full(steps, steps), np.arange(steps))
            assert arr.tolist() == schedule


def _lockstep(loaded, dtype: str, params: list[DecodeParams]) -> tuple[dict, list[int]]:
    """Run ``params`` through a batched and a per-request engine side by side, checking every
    live request's state after every step; the outcomes, and the batched step's sizes."""
    engines = [Engine(loaded, dtype=dtype, max_num_seqs=8) for _ in range(2)]
    engines[1].runner.batched = False
    for i, p in enumerate(params):
        for engine in engines:
            engine.add_request(PROMPTS[i % len(PROMPTS)], p, request_id=str(i))
    members: list[int] = []
    real_bind = batched_module.BatchedStep.bind

    def counting(self, *args, **kwargs):
        members.append(len(self.reqs))
        return real_bind(self, *args, **kwargs)

    finished: list[dict] = [{}, {}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batched_module.BatchedStep, "bind", counting)
        while engines[0].has_unfinished_requests() or engines[1].has_unfinished_requests():
            for engine, done in zip(engines, finished, strict=True):
                done.update({o.request_id: _state(o) for o in engine.step()})
            assert finished[0] == finished[1]
            for rid in [r.request_id for r in engines[0].scheduler.running]:
                assert _state(engines[0].snapshot(rid)) == _state(engines[1].snapshot(rid)), rid
    return finished[0], members


@pytest.mark.parametrize("statistics", [("min",), ("mean",), ("min", "mean")])
def test_batches_of_one_gap_statistic_equal_the_per_request_step(statistics) -> None:
    """The batched step computes only the statistics its Prophet requests take (the mean
    alone, the minimum alone, or both); each batch, stepped in lockstep with the per-request
    step, commits at the same steps with the same gaps (thresholds low enough to commit)."""
    loaded = tiny_model("llada", seed=3)
    rng = random.Random(5)
    params = []
    for i in range(8):
        policy = Prophet(thresholds=(1.0, 0.5, 0.2), statistic=statistics[i % len(statistics)])
        rule = rng.choice(["low_confidence", "random", "confidence_threshold"])
        params.append(
            DecodeParams(gen_length=16, block_length=8, steps=16, remasking=rule, seed=i).replace(
                early_commit=policy, kv_cache=rng.choice([None, "dual"])
            )
        )
    outcomes, members = _lockstep(loaded, "float32", params)
    assert members and max(members) == 8
    assert any(state[4] is not None for state in outcomes.values())  # some commit


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_guided_requests_in_the_batch_equal_the_per_request_step(dtype) -> None:
    """Classifier-free guidance in the batched step (rows guided in place, then
    ``logits_eos_inf``): greedy with and without Prophet's masked region or an explicit span
    (whose commit asks for guided rows the pass did not gather), sampled, random remasking, a
    float64 confidence; every step equal to the per-request step."""
    loaded = tiny_model("llada", seed=11, dtype=dtype)
    rng = random.Random(5)
    span = Prophet(answer_start=0, answer_length=3, thresholds=(2.0, 1.0, 0.5))
    params = []
    for _ in range(24):
        kwargs = dict(
            gen_length=16, block_length=8, steps=rng.choice([4, 8, 16]), seed=rng.randrange(99)
        )
        kwargs["cfg_scale"] = rng.choice([0.5, 1.0, 2.0])
        kwargs.update(
            rng.choice(
                [
                    {},
                    {"early_commit": Prophet(thresholds=(2.0, 1.0, 0.5))},
                    {"early_commit": span},
                    {"early_commit": span, "logits_eos_inf": True},
                    {"early_commit": span, "temperature": 0.8, "logits_eos_inf": True},
                    {"temperature": 0.8},
                    {"remasking": "random"},
                    {"logits_eos_inf": True, "confidence_dtype": "float64"},
                ]
            )
        )
        params.append(DecodeParams(**kwargs))
    asked, real_more_own = [], batched_module.BatchedStep._more_own

    def counting(self, j, flat, more):
        asked.append((self.uncond_at[j] >= 0, self.reqs[j].params.temperature > 0))
        return real_more_own(self, j, flat, more)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batched_module.BatchedStep, "_more_own", counting)
        finished, members = _lockstep(loaded, dtype, params)
    assert len(finished) == len(params) and sum(members) >= 2 * len(params)
    # Guided commits asked for rows the pass did not gather: greedy and sampled ones.
    assert set(asked) == {(True, False), (True, True)}, asked


def test_guided_commits_suppress_eos_in_the_rows_they_ask_for() -> None:
    """A guided commit with an explicit span asks for rows the pass did not gather; with
    ``logits_eos_inf`` their EOS column is suppressed after guidance, as alone. On a model
    made to favour EOS (otherwise a tiny random model never predicts it), those rows' argmax
    is EOS before suppression; every step equals the per-request step."""
    loaded = tiny_model("llada", seed=21, dtype="float32", logit_scale=16.0)
    eos = loaded.model.eos_token_ids[0]
    with torch.no_grad():  # EOS where the model's most frequent prediction (40) was
        weight = loaded.model.lm_head.weight
        weight[eos] = weight[40] * 1.02
    params = [
        DecodeParams(
            gen_length=16,
            block_length=8,
            steps=16,
            cfg_scale=scale,
            logits_eos_inf=True,
            early_commit=Prophet(thresholds=(t, t / 2, t / 4), answer_start=0, answer_length=2),
            seed=1,
        )
        for scale in (0.5, 1.0)
        for t in (1.0, 4.0, 8.0)
    ]
    asked_eos, real_more_own = [], batched_module.BatchedStep._more_own

    def watching(self, j, flat, more):
        logits = real_more_own(self, j, flat, more)
        asked_eos.append(bool((logits.argmax(dim=-1) == eos).any()))
        return logits

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batched_module.BatchedStep, "_more_own", watching)
        finished, members = _lockstep(loaded, "float32", params)
    assert len(finished) == len(params) and sum(members) >= 2 * len(params)
    assert True in asked_eos, asked_eos


def test_a_guided_commit_that_fails_to_ask_for_its_rows_fails_alone() -> None:
    """A fault while a guided commit asks for its rows ends that request only: the others of
    the pass, committing at the same step, complete as alone."""
    loaded = tiny_model("llada", seed=11, dtype="float32")
    span = Prophet(thresholds=(0.5, 0.25, 0.1), answer_start=0, answer_length=2)
    params = DecodeParams(gen_length=16, block_length=8, steps=16, cfg_scale=1.0, early_commit=span)
    alone = Engine(loaded, dtype="float32").generate(["1+1="], params, use_tqdm=False)[0]
    assert alone.finish_reason == "early_commit"
    real_more_own, asked = batched_module.BatchedStep._more_own, []

    def failing(self, j, flat, more):
        asked.append(self.reqs[j].request_id)
        if self.reqs[j].request_id == "bad":
            raise RuntimeError("injected fault")
        return real_more_own(self, j, flat, more)

    engine = Engine(loaded, dtype="float32")
    for rid in ("good-1", "bad", "good-2"):
        engine.add_request("1+1=", params, request_id=rid)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batched_module.BatchedStep, "_more_own", failing)
        outs = {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o for o in engine.step()})
    assert sorted(asked) == ["bad", "good-1", "good-2"]
    assert outs["bad"].finish_reason == "error" and "injected fault" in outs["bad"].error
    for rid in ("good-1", "good-2"):
        assert outs[rid].finish_reason == "early_commit"
        assert outs[rid].token_ids == alone.token_ids


def _dream_cached(n: int, seed: int, sampled: bool) -> list[DecodeParams]:
    """Fast-dLLM's cached Dream requests: refresh steps (the block's first position), then
    entropy or threshold steps over the prefix or dual cache."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        block = rng.choice([4, 8])
        gen = block * rng.choice([1, 2, 3])
        out.append(
            DecodeParams(
                gen_length=gen,
                block_length=block,
                steps=(gen // block) * rng.choice([2, 4]),
                kv_cache=rng.choice(["prefix", "dual"]),
                remasking=rng.choice(["entropy", "confidence_threshold"]),
                threshold=rng.choice([0.2, 0.6]),
                temperature=rng.choice([0.5, 1.0]) if sampled else 0.0,
                seed=rng.randrange(99),
            )
        )
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampled_cached_commits_in_the_batch_equal_the_per_request_step(dtype) -> None:
    """Seeded sampled or filtered LLaDA requests over Fast-dLLM's caches with Prophet: a
    commit draws over every mask of its canvas in position order, those outside its cached
    pass (an explicit span leaves some out) from the read-only pass, also where they lie
    between the pass's own (positions revealed as the mask token itself stay masks), from its
    stream as it stood before the step's reveal draw; every step equal to the per-request
    step."""
    loaded = tiny_model("llada", seed=3, dtype=dtype, logit_scale=3.0)
    # The dual cache's pass holds the block and the span at 8: a commit in the first block
    # leaves masks out both between them and past the span.
    params = [
        DecodeParams(
            gen_length=16,
            block_length=4,
            steps=16,
            temperature=1.0,
            kv_cache="dual",
            seed=seed,
            early_commit=Prophet(thresholds=(t, t / 2, t / 4), answer_start=8, answer_length=3),
        )
        for seed in range(4)
        for t in (0.5, 1.0, 1.5, 2.0)
    ]
    rng = random.Random(3)
    for _ in range(24):  # nucleus, top-k, filtered but not drawn; every rule; both caches
        block = rng.choice([4, 8])
        kwargs = dict(gen_length=16, block_length=block, seed=rng.randrange(99))
        kwargs["steps"] = 2 * (16 // block) * rng.choice([1, 2])
        kwargs.update(
            rng.choice(
                [
                    {"temperature": 2.0},
                    {"temperature": 1.0, "top_p": 0.9},
                    {"temperature": 1.0, "top_k": 5},
                    {"temperature": 0.0, "top_k": 3},
                ]
            )
        )
        kwargs["remasking"] = rng.choice(["low_confidence", "random", "confidence_threshold"])
        kwargs.update(threshold=0.5, kv_cache=rng.choice(["prefix", "dual"]))
        kwargs["early_commit"] = Prophet(
            thresholds=(1.0, 0.5, 0.2),
            answer_start=rng.choice([None, 0, 8]),
            answer_length=3,  # (no span without a start)
            statistic=rng.choice(["mean", "min"]),
        )
        params.append(DecodeParams(**kwargs))
    outside = []  # per drawn commit with masks outside its pass: whether they interleave
    real_commit = batched_module.BatchedStep._sampled_commit

    def watching(self, j, req, plan, rows, more):
        if j in plan.outside_logits and req.params.temperature > 0:
            start, end = self.starts[j], self.starts[j] + self.seq_lens[j]
            own = self.positions_np[start:end][self.generated_np[start:end]]
            outside.append(bool(plan.outside_logits[j][0].min() < own.max()))
        return real_commit(self, j, req, plan, rows, more)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batched_module.BatchedStep, "_sampled_commit", watching)
        finished, members = _lockstep(loaded, dtype, params)
    assert len(finished) == len(params)
    assert sum(members) >= 2 * len(params)  # every request took the batch, step after step
    commits = [rid for rid, state in finished.items() if state[2] == "early_commit"]
    assert len(commits) >= len(params) // 2, commits
    assert True in outside and False in outside, outside


def test_a_failed_sampling_pass_leaves_seeded_streams_as_they_were(monkeypatch) -> None:
    """The batched step draws a seeded request's uniforms inside the pass; when the pass then
    fails and is retried in halves, each stream is back where it was, so every request still
    decodes exactly what it decodes alone."""
    import foretell.engine.runner as runner_module

    loaded = tiny_model("llada", seed=3, dtype="float32")
    params = [DecodeParams(gen_length=16, steps=8, temperature=0.9, seed=s) for s in (1, 2, 3)]
    prompts = PROMPTS[:3]
    clean = Engine(loaded, dtype="float32").generate(prompts, params, use_tqdm=False)
    real, calls = runner_module.sample, []  # the Gumbel-max, after the uniforms are drawn

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "sample", failing_once)
    outs = Engine(loaded, dtype="float32", max_num_seqs=4).generate(prompts, params, use_tqdm=False)
    assert [o.finish_reason for o in outs] == ["steps"] * 3
    assert [o.token_ids for o in outs] == [o.token_ids for o in clean]


def test_request_geometry_follows_its_params() -> None:
    """The batched step reads a request's fixed geometry from one cached tuple; a caller that
    swaps the params (as tests and ``override`` users do) gets the new region, not a stale one."""
    import dataclasses

    from foretell.scheduler.request import Request

    params = DecodeParams(gen_length=8, steps=8, block_length=4, early_commit=Prophet())
    req = Request("r", "p", [1, 2, 3], params, 0, "llada")
    # prompt and canvas length, blocks, where block 0 starts, block length, cached, prefix
    assert req.geometry[:7] == (3, 11, 1, 3, 4, 0, 0)
    assert req.geometry[8:11] == (0, 0, 1)  # no explicit span; the region is every mask
    # steps, per block, Dream, threshold, random, origin, sequences
    assert req.geometry[11:] == (8, 4, 0, 0, 0, 0, 1)
    span = Prophet(answer_start=2, answer_length=3)
    req.params = dataclasses.replace(params, early_commit=span, remasking="confidence_threshold")
    assert req.geometry[8:11] == (5, 8, 0)
    assert req.geometry[14:17] == (1, 0, 0)
    req.params = dataclasses.replace(params, remasking="random")
    assert req.geometry[14:17] == (0, 1, 0)


def test_concat_ranges_is_the_concatenated_aranges() -> None:
    """A batch's rows from each request's ``[start, end)`` in a fixed number of NumPy calls."""
    from foretell.ranges import concat_ranges

    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 8))
        starts = rng.integers(0, 50, n)
        ends = starts + rng.integers(0, 6, n)  # empty ranges too
        expected = [i for s, e in zip(starts, ends, strict=True) for i in range(s, e)]
        assert concat_ranges(starts, ends).tolist() == expected


def test_cursor_stays_agrees_with_the_cursor_rule() -> None:
    """The batched step moves a cursor with array arithmetic where it stays in its block and
    calls ``move_cursor`` otherwise: for every kind and random outcomes, the arrays say "stays"
    exactly when the rule keeps the block and does not finish, and give the step it takes;
    where the block's schedule (LLaDA's, or the cached loop) ends with a block after it, the
    rule moves on to that block's first step without finishing, as the batched step's one
    write does for all."""
    import dataclasses

    from foretell.decoding.step import cursor_stays, move_cursor
    from foretell.scheduler.request import Request

    rng = random.Random(0)
    kinds = [
        (family, cache, rule)
        for family in ("llada", "dream")
        for cache in (None, "prefix", "dual")
        for rule in ("low_confidence" if family == "llada" else "entropy", "confidence_threshold")
    ]
    rows, reqs, outcomes = [], [], []
    for _ in range(400):
        family, cache, rule = rng.choice(kinds)
        params = DecodeParams(
            gen_length=16, steps=rng.choice([8, 16]), block_length=4, kv_cache=cache
        )
        drawn = rng.random() < 0.5
        params = dataclasses.replace(params, remasking=rule, temperature=0.7 if drawn else 0.0)
        req = Request("r", "p", [1, 2, 3], params, 0, family)
        spb = params.steps_per_block
        req.block = rng.randrange(params.num_blocks)
        req.step_in_block = rng.randrange(2 * spb if rule == "confidence_threshold" else spb)
        req.global_step = rng.randrange(1, params.steps + 3)  # after the step's increment
        outcome = (rng.random() < 0.3, rng.random() < 0.7, rng.randrange(3), rng.randrange(3))
        g = req.geometry
        rows.append((req.step_in_block, req.global_step, g[11], g[12], g[2], g[5], g[14], drawn))
        reqs.append(req)
        outcomes.append(outcome)
    cols = [np.array(c) for c in zip(*rows, strict=True)]
    stalled, revealed, block_masks, masks = (np.array(c) for c in zip(*outcomes, strict=True))
    flags = [c.astype(bool) for c in cols[4:]]
    stays, steps_on = cursor_stays(
        *cols[:4], *flags[:3], stalled, revealed, block_masks, masks, flags[3]
    )
    seen = set()
    for j, req in enumerate(reqs):
        block, step = req.block, req.step_in_block
        move_cursor(req, bool(stalled[j]), bool(revealed[j]), int(block_masks[j]), int(masks[j]))
        kept = req.block == block and not req.is_finished
        assert bool(stays[j]) == kept, (j, req.params, outcomes[j])
        if kept:
            assert req.step_in_block == step + int(steps_on[j])
        p = req.params
        scheduled = p.kv_cache is not None or p.remasking != "confidence_threshold"
        if not kept and req.uses_blocks and scheduled and block + 1 < p.num_blocks:
            assert (req.block, req.step_in_block, req.is_finished) == (block + 1, 0, False)
        seen.add((req.family, req.params.kv_cache, req.params.remasking, kept))
    assert len(seen) == 2 * len(kinds)  # every kind both stays and moves on


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_filtering_by_row_equals_filtering_each_row_alone(dtype) -> None:
    """Each row filtered with its own temperature, top-p and top-k in one call is bit for bit
    that row filtered alone with Python scalars (the references' expression), and a row-wise
    guidance factor rounds as the scalar does: with ties, ``-inf`` columns and parameters that
    no dtype holds exactly (``benchmarks/gpu_smoke.py``'s check, which a GPU runs too)."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("gpu_smoke", script)
    smoke = importlib.util.module_from_spec(spec)
    added = str(script.parent) not in sys.path
    try:
        spec.loader.exec_module(smoke)  # it imports host_overhead from beside it
    finally:
        if added and str(script.parent) in sys.path:
            sys.path.remove(str(script.parent))
    (result,) = smoke.row_filtering("cpu", dtypes=(dtype,), trials=60)
    assert result["rows"] > 0
    assert result["differ"] == 0, result


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["dream", "llada"])
def test_distinct_sampling_values_in_the_batch_equal_the_per_request_step(family, dtype) -> None:
    """Every request with its own temperature, top-p, top-k (and, for LLaDA, guidance scale),
    values no dtype holds exactly, filtered and drawn in one call for the batch: every step
    equals the per-request step's, which filters each request with Python scalars. A top-k
    beyond any integer type (the API takes any int) keeps the whole vocabulary, as alone."""
    loaded = tiny_model(family, seed=13, dtype=dtype, logit_scale=4.0)
    rng = random.Random(8)
    params = []
    for i in range(12):
        kwargs = dict(
            gen_length=16,
            block_length=8 if family == "llada" else 16,
            steps=8,
            seed=rng.randrange(99),
            temperature=rng.choice([0.0, 0.37, 0.71, 1.3]) + i * 1e-3,
            top_p=rng.choice([None, 0.83, 0.9137]),
            top_k=rng.choice([None, 3, 7, 10**40]),  # any int: past the vocabulary, all
        )
        if family == "llada":
            kwargs["remasking"] = rng.choice(["low_confidence", "margin", "entropy"])
            kwargs["cfg_scale"] = rng.choice([0.0, 0.3, 1.7])
        else:
            kwargs["remasking"] = rng.choice(["maskgit_plus", "topk_margin", "entropy"])
        params.append(DecodeParams(**kwargs))
    finished, members = _lockstep(loaded, dtype, params)
    assert len(finished) == len(params)
    assert sum(members) >= 2 * len(params)


def test_dream_threshold_rules_at_saturation_equal_the_per_request_step() -> None:
    """Dream's uncached threshold rule keeps scores strictly above its threshold and
    Fast-dLLM's cached one those at or above it: with a huge logit scale many confidences are
    exactly 1.0, so a threshold of 1.0 tells the two apart (the batched step compares a strict
    threshold as ``>=`` of its next value up). Batched and per-request agree at every step."""
    loaded = tiny_model("dream", seed=7, dtype="float64", logit_scale=400.0)
    params = []
    for i in range(12):
        gen = (8, 16)[i % 2]
        threshold = (1.0, 0.9, 1.0)[i % 3]
        if i % 4 < 2:  # uncached: the whole generation at once, strictly above
            kw = dict(gen_length=gen, block_length=gen, steps=gen)
        else:  # Fast-dLLM's cached Dream: blocks of 4, at or above
            kw = dict(gen_length=gen, block_length=4, steps=gen, kv_cache=("prefix", "dual")[i % 2])
        params.append(
            DecodeParams(**kw, remasking="confidence_threshold", threshold=threshold, seed=i)
        )
    engines = [Engine(loaded, dtype="float64", max_num_seqs=6) for _ in range(2)]
    engines[1].runner.batched = False
    for i, p in enumerate(params):
        for engine in engines:
            engine.add_request(PROMPTS[i % len(PROMPTS)], p, request_id=str(i))
    finished: list[dict] = [{}, {}]
    revealed_at_once = 0
    while engines[0].has_unfinished_requests() or engines[1].has_unfinished_requests():
        for engine, done in zip(engines, finished, strict=True):
            done.update({o.request_id: _state(o) for o in engine.step()})
        assert finished[0] == finished[1]
        for req in engines[0].scheduler.running:
            state = _state(engines[0].snapshot(req.request_id))
            assert state == _state(engines[1].snapshot(req.request_id)), req.request_id
            revealed_at_once += len(state[1]) > 1
    assert len(finished[0]) == len(params)
    assert revealed_at_once  # some step revealed several saturated positions at once


# Chi-square critical values at p = 0.001: 2 and 5 degrees of freedom.
CHI2_CRIT_DF2, CHI2_CRIT_DF5 = 13.816, 20.515


def test_gumbel_perturbed_top_k_is_dreams_draw_without_replacement() -> None:
    """20,000 rows of three scores: the top one of the perturbed row follows
    ``softmax(scores / alg_temp)`` (Dream's ``multinomial`` of one) and the ordered top two
    the draw of two without replacement; a ``-inf`` (a padding column) is never drawn."""
    draws = 20000
    scores = torch.tensor([0.9, 0.6, 0.2, float("-inf")], dtype=torch.float64)
    alg_temp = 0.4
    rows = scores.expand(draws, -1)
    uniforms = torch.rand(
        rows.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    temps = torch.full((draws,), alg_temp, dtype=torch.float64)
    top2 = gumbel_perturbed(rows, temps, uniforms).topk(2, dim=1).indices
    assert (top2 < 3).all()
    weights = torch.softmax(scores[:3] / alg_temp, dim=0)
    first = torch.bincount(top2[:, 0], minlength=3).double()
    chi2 = float(((first - weights * draws) ** 2 / (weights * draws)).sum())
    assert chi2 < CHI2_CRIT_DF2, (first, weights * draws)
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
    expected = torch.tensor([weights[a] * weights[b] / (1 - weights[a]) for a, b in pairs]) * draws
    observed = torch.tensor(
        [float(((top2[:, 0] == a) & (top2[:, 1] == b)).sum()) for a, b in pairs]
    )
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRIT_DF5, (observed, expected)


@pytest.mark.parametrize("count", [2, 6])
def test_unseeded_alg_temp_requests_share_one_draw_a_step(count) -> None:
    """Unseeded greedy Dream requests with ``alg_temp`` in one batch: each step draws their
    reveals from the shared stream once (one ``rand``, no ``multinomial``) whatever their
    number, none gets a generator of its own, and a fresh engine repeats the run exactly."""
    loaded = tiny_model("dream", seed=7, dtype="float32")
    rules = ["maskgit_plus", "topk_margin", "entropy"]
    params = [
        DecodeParams(gen_length=16, steps=8, remasking=rules[i % 3], alg_temp=0.5 + i / 4)
        for i in range(count)
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    engine = Engine(loaded, dtype="float32")
    reqs = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    outputs, draws_per_step = run_counting_draws(engine)
    assert set(draws_per_step) == {(1, 0)}, draws_per_step
    assert all(outputs[r].finish_reason == "steps" for r in reqs)
    repeated = Engine(loaded, dtype="float32").generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in repeated] == [outputs[r].token_ids for r in reqs]


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_dreams_origin_rule_in_the_batch_equals_the_per_request_step(dtype) -> None:
    """Dream's ``origin`` rule, seeded: each window row transfers with the step's
    probability (its uniforms first), then the transferred rows alone draw their candidates
    (greedy, sampled, filtered), with Prophet on some; in a batch with ranked Dream requests,
    every step equal to the per-request step."""
    loaded = tiny_model("dream", seed=7, dtype=dtype)
    rng = random.Random(21)
    params = []
    for i in range(20):
        gen = rng.choice([8, 16])
        kwargs = dict(gen_length=gen, steps=rng.choice([2, gen // 2, gen]), seed=rng.randrange(99))
        kwargs.update(
            rng.choice([{}, {"temperature": 0.8}, {"temperature": 1.0, "top_p": 0.9}, {"top_k": 3}])
        )
        kwargs["early_commit"] = rng.choice([None, Prophet(thresholds=(2.5, 1.5, 0.5))])
        kwargs["remasking"] = "origin" if i % 4 else rng.choice(["maskgit_plus", "random"])
        params.append(DecodeParams(**kwargs))
    own, real = [], batched_module.BatchedStep._origin_own

    def counting(self, members, rows, x0, chosen):
        own.append(len(members))
        return real(self, members, rows, x0, chosen)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batched_module.BatchedStep, "_origin_own", counting)
        finished, members = _lockstep(loaded, dtype, params)
    assert len(finished) == len(params)
    assert sum(members) >= 2 * len(params)  # every request took the batch, step after step
    assert sum(own) >= len(params)
    assert {state[2] for state in finished.values()} == {"steps", "early_commit"}


@pytest.mark.parametrize("count", [2, 6])
def test_unseeded_origin_requests_share_one_draw_a_step(count) -> None:
    """Unseeded greedy Dream ``origin`` requests: each step draws every window row's
    transfer uniform from the shared stream at once (one ``rand``) whatever their number,
    none gets a generator of its own, and a fresh engine repeats the run exactly."""
    loaded = tiny_model("dream", seed=7, dtype="float32")
    params = [DecodeParams(gen_length=16, steps=4 + i, remasking="origin") for i in range(count)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    engine = Engine(loaded, dtype="float32")
    reqs = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    outputs, draws_per_step = run_counting_draws(engine)
    assert {rand for rand, _ in draws_per_step} == {1}, draws_per_step
    assert all(outputs[r].finish_reason == "steps" for r in reqs)
    repeated = Engine(loaded, dtype="float32").generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in repeated] == [outputs[r].token_ids for r in reqs]
