"""Randomness as vLLM does it: a seeded request owns its stream; unseeded requests share one.

A seeded request must come out the same alone or in any batch (its draws are the official
code's); unseeded ones draw from the engine's stream, one draw a step for all of them in the
batched step, and a fresh engine given the same requests repeats its run exactly.
"""

from __future__ import annotations

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from foretell import DecodeParams, Engine
from foretell.models.tiny import tiny_model

RANDOM = DecodeParams(gen_length=16, block_length=8, steps=16, remasking="random")
PROMPTS = ["1+1=", "22+22=", "333+333=", "a", "bb", "ccc+d"]


@pytest.fixture(scope="module")
def llada():
    return tiny_model("llada", seed=11, dtype="float64")


class _Draws(TorchDispatchMode):
    """Counts the uniform draws dispatched (``torch.rand``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("uniform_", "rand"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_seed_defaults_to_none_and_bad_seeds_are_refused() -> None:
    assert DecodeParams().seed is None
    for bad in (1.5, True, "3", 2**64):
        with pytest.raises(ValueError, match=r"^seed: "):
            DecodeParams(seed=bad)


@pytest.mark.parametrize("seeded", [False, True])
def test_unseeded_random_remasking_draws_once_a_step_for_the_batch(llada, seeded) -> None:
    """Per step: one draw for every unseeded request; one per request when each is seeded."""
    per_step = {}
    for n in (2, 6):
        engine = Engine(llada, dtype="float64", max_num_seqs=n)
        for i in range(n):
            engine.add_request(PROMPTS[i], RANDOM.replace(seed=i if seeded else None))
        engine.step()  # every request joins
        with _Draws() as draws:
            engine.step()
        per_step[n] = draws.count
        while engine.has_unfinished_requests():
            engine.step()
    assert per_step == ({2: 2, 6: 6} if seeded else {2: 1, 6: 1})


def test_unseeded_runs_repeat_on_a_fresh_engine_and_finish(llada) -> None:
    params = [
        RANDOM,
        RANDOM.replace(remasking="low_confidence", temperature=0.7),  # sampled: the shared stream
        RANDOM.replace(kv_cache="dual"),
    ] * 2
    runs = []
    for _ in range(2):
        engine = Engine(llada, dtype="float64", max_num_seqs=6)
        outs = engine.generate(PROMPTS, params, use_tqdm=False)
        assert {o.finish_reason for o in outs} == {"steps"}
        assert all(len(o.token_ids) == p.gen_length for o, p in zip(outs, params, strict=True))
        runs.append([o.token_ids for o in outs])
    assert runs[0] == runs[1]


def test_a_seeded_request_is_the_same_beside_unseeded_ones(llada) -> None:
    seeded = [RANDOM.replace(seed=5), RANDOM.replace(seed=9, temperature=0.7)]
    alone = [
        Engine(llada, dtype="float64").generate([PROMPTS[0]], [p], use_tqdm=False)[0].token_ids
        for p in seeded
    ]
    engine = Engine(llada, dtype="float64", max_num_seqs=8)
    crowd = engine.generate(
        [PROMPTS[0], PROMPTS[0], *PROMPTS[1:]],
        [*seeded, RANDOM, RANDOM, RANDOM.replace(temperature=0.7), RANDOM, RANDOM],
        use_tqdm=False,
    )
    assert [o.token_ids for o in crowd[:2]] == alone
