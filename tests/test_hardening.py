"""Engine-side hardening: limits checked before anything is allocated, strict numbers, nothing
kept of a refused request, and a failed forward pass isolated to the request that causes it."""

from __future__ import annotations

import asyncio
import gc
import math

import pytest

from foretell import AsyncEngine, DecodeParams, Engine, Prophet
from foretell.engine.async_engine import QueueFullError
from foretell.scheduler import Request

SHORT = DecodeParams(gen_length=16, block_length=8)


def live_requests() -> int:
    gc.collect()
    return sum(type(o) is Request for o in gc.get_objects())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("cfg_scale", math.inf),
        ("alg_temp", math.inf),
        ("top_p", math.nan),
        ("eps", math.nan),
        ("threshold", math.nan),
        ("temperature", True),
        ("seed", 2**64),
        ("seed", 1.5),
    ],
)
def test_params_refuse_non_finite_and_out_of_range_numbers(field, value) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        DecodeParams(**{field: value})


def test_prophet_refuses_text_and_infinite_thresholds() -> None:
    with pytest.raises(ValueError, match=r"^early_commit.thresholds: need numbers"):
        Prophet(thresholds=("7", "5", "2"))
    with pytest.raises(ValueError, match=r"^early_commit.bounds: need numbers"):
        Prophet(bounds=7)
    with pytest.raises(ValueError, match=r"^early_commit.thresholds: need 3 finite"):
        Prophet(thresholds=(math.inf, 5.0, 2.0))
    with pytest.raises(ValueError, match=r"^early_commit.answer_length"):
        Prophet(answer_length=True)


def test_limits_are_checked_before_anything_is_allocated(llada64) -> None:
    engine = Engine(llada64, dtype="float64", max_num_batched_tokens=512, max_gen_length=128)
    assert engine.max_gen_length == 128
    assert engine.max_prompt_tokens == 511
    before = live_requests()
    cases = {
        # 1e10 positions would be an 80 GB canvas: refused from the params alone.
        "gen_length": [("x", DecodeParams(gen_length=10**10, block_length=10**9))],
        "prompt": [
            ("x" * 10**6, SHORT),  # refused before it is tokenized
            (list(range(4, 10)) * 10**5, SHORT),  # a 600k-id prompt
            ([{"role": "user", "content": "y" * 10**6}], SHORT),
            ("x" * 500, SHORT),  # tokenized, then too long with its canvas
        ],
    }
    for field, requests in cases.items():
        for prompt, params in requests:
            with pytest.raises(ValueError, match=f"^{field}: "):
                engine.make_request(prompt, params)
    # A canvas that leaves no room for a prompt blames gen_length, not the prompt.
    with pytest.raises(ValueError, match=r"^gen_length: .* leaves no room"):
        Engine(llada64, dtype="float64", max_num_batched_tokens=64).make_request(
            "1", DecodeParams(gen_length=64)
        )
    short = Engine(llada64, dtype="float64", max_model_len=64)
    with pytest.raises(ValueError, match=r"^gen_length: 64 leaves no room .* maximum length 64"):
        short.make_request("1", DecodeParams(gen_length=64))
    with pytest.raises(ValueError, match=r"^prompt: 60 prompt tokens \+ gen_length 16 exceed"):
        short.make_request([5] * 60, SHORT)
    with pytest.raises(ValueError, match=r"^prompt: .* characters cannot fit"):
        short.make_request("x" * (63 * 32 + 1), SHORT)
    with pytest.raises(ValueError, match=r"^prompt: not valid Unicode"):
        engine.make_request("a\ud800", SHORT)
    with pytest.raises(ValueError, match=r"^constraints: not valid Unicode"):
        engine.make_request("a", SHORT.replace(constraints={0: "\udfff"}))
    with pytest.raises(ValueError, match=r"^max_gen_length"):
        Engine(llada64, max_gen_length=0)
    assert live_requests() == before
    assert not engine.has_unfinished_requests()


def test_a_refused_batch_leaves_no_request_behind(llada64) -> None:
    """The first prompts of a batch are built before a later one is refused; the error that
    reaches the caller must not keep them alive through its traceback's frames."""

    async def main() -> None:
        async with AsyncEngine(llada64, dtype="float64") as engine:
            before = live_requests()
            for _ in range(3):
                try:
                    await engine.add_requests(["12+34=", "what?", ""], SHORT)
                except ValueError as err:
                    assert str(err) == "prompts[2]: prompt: is empty"
                    caught = err
            assert caught.__traceback__ is not None  # raised here, but holds no engine frames
            assert live_requests() == before
            assert engine.stats()["waiting"] == engine.stats()["running"] == 0

    asyncio.run(main())


def test_queue_limits_refuse_with_queue_full(llada64) -> None:
    long = DecodeParams(gen_length=256, steps=256)

    async def main() -> None:
        async with AsyncEngine(
            llada64, dtype="float64", max_num_seqs=1, max_queued_requests=1
        ) as engine:
            running = await engine.add_request("a", long)
            queued = await engine.add_request("b", long)
            with pytest.raises(QueueFullError, match="max_queued_requests 1"):
                await engine.add_request("c", SHORT)
            await queued.abort()
            await queued.result()
            out = None
            for _ in range(100):  # the aborted one left the queue: room again
                try:
                    third = await engine.add_request("c", SHORT)
                except QueueFullError:
                    await asyncio.sleep(0.01)
                    continue
                await running.abort()
                out = await third.result()
                break
            assert out is not None and out.finish_reason == "steps"

        async with AsyncEngine(
            llada64, dtype="float64", max_num_seqs=1, max_queued_tokens=300
        ) as engine:
            running = await engine.add_request("a", long)
            queued = await engine.add_request("b", long)  # nothing waits: always admitted
            with pytest.raises(QueueFullError, match="max_queued_tokens 300"):
                await engine.add_request("c", long)
            with pytest.raises(ValueError, match=r"^prompts: 2 prompts of .* exceed"):
                await engine.add_requests(["c", "d"], long)  # could never be admitted
            await running.abort()
            await queued.abort()

    asyncio.run(main())


def test_a_failed_forward_pass_fails_only_its_own_request(llada64, poison_forward) -> None:
    """One poisoned request in a batch of seven: the pass is retried in halves, the poisoned
    request alone ends with "error", every other one gets exactly its undisturbed result."""
    prompts = ["12+34=", "what is 7*8?", "a", "hello there", "9-4=", "abc"]
    params = [
        SHORT,
        DecodeParams(gen_length=16, block_length=8, temperature=0.7, seed=3),
        DecodeParams(gen_length=32, block_length=8, early_commit=Prophet((3.0, 2.0, 1.0))),
        SHORT,
        DecodeParams(gen_length=16, steps=8, remasking="random", seed=5),
        DecodeParams(gen_length=16, block_length=8, cfg_scale=1.5),
    ]
    clean = Engine(llada64, dtype="float64", max_num_seqs=8).generate(
        prompts, params, use_tqdm=False
    )
    seen = {t for out in clean for t in out.prompt_token_ids + out.token_ids}
    vocab, mask = llada64.model.vocab_size, llada64.model.mask_token_id
    poison = next(t for t in range(vocab) if t not in seen and t != mask)  # in no clean canvas
    engine = Engine(llada64, dtype="float64", max_num_seqs=8)
    poison_forward(llada64.model, poison)
    outs = engine.generate(
        [*prompts[:3], [poison, *clean[0].prompt_token_ids], *prompts[3:]],
        [*params[:3], SHORT, *params[3:]],
        use_tqdm=False,
    )
    bad = outs.pop(3)
    assert bad.finish_reason == "error" and "injected forward fault" in bad.error
    assert bad.num_forward_passes == 0
    for out, ref in zip(outs, clean, strict=True):
        assert out.finish_reason == ref.finish_reason
        assert out.token_ids == ref.token_ids
        assert out.num_forward_passes == ref.num_forward_passes
        assert out.commit_step == ref.commit_step
