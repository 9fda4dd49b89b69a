"""The SDAR and LLaDA2 reference decoders agree with themselves where they must: the cached
decoder (prefill, past K/V, store passes) gives the no-cache recomputation's tokens."""

from __future__ import annotations

import pytest

from foretell.models import load_model
from tests.block_checkpoints import llada2_checkpoint, sdar_checkpoint
from tests.reference_llada2 import llada2_generate
from tests.reference_sdar import bd3_generate, cut, schedule

PROMPTS = [[5, 9], [7, 8, 9, 10, 11], list(range(4, 13)), [20] * 4]


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    return load_model(sdar_checkpoint(tmp_path_factory.mktemp("s"), seed=11)[0]).model


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    return load_model(llada2_checkpoint(tmp_path_factory.mktemp("l"), seed=12)[0]).model


def test_schedule() -> None:
    assert schedule(4, 4) == [1, 1, 1, 1]
    assert schedule(8, 3) == [3, 3, 2]
    assert schedule(32, 5) == [7, 7, 6, 6, 6]


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("steps", [4, 2, 3])
def test_sdar_cached_equals_recomputed(sdar, steps, threshold) -> None:
    for prompt in PROMPTS:
        kw = dict(gen_length=10, block_length=4, steps=steps, threshold=threshold)
        cached, passes = bd3_generate(sdar, prompt, **kw)
        full, denoising = bd3_generate(sdar, prompt, use_cache=False, **kw)
        assert cached == full
        assert bd3_generate(sdar, prompt, count_stores=False, **kw)[1] == denoising
        assert sdar.mask_token_id not in cached
        blocks = -(-(len(prompt) + 10) // 4) - len(prompt) // 4
        # prefill once (if the prompt fills a block), then per block its steps + one store
        low = (len(prompt) >= 4) + blocks * 2
        high = (len(prompt) >= 4) + blocks * (steps + 1)
        assert low <= passes <= high
        if threshold is None and 4 % steps == 0 and len(prompt) % 4 == 0:
            assert passes == (len(prompt) >= 4) + blocks * (steps + 1)


def test_sdar_stops_after_the_block_with_a_stop_token(sdar) -> None:
    prompt = PROMPTS[1]
    full, _ = bd3_generate(sdar, prompt, gen_length=24, block_length=4, steps=4)
    stop = full[6]  # a token of the generation's second block (positions 8..11 of the canvas)
    first = full.index(stop)
    stopped, _ = bd3_generate(
        sdar, prompt, gen_length=24, block_length=4, steps=4, stop_ids=(stop,)
    )
    end = (len(prompt) + first) // 4 * 4 + 4 - len(prompt)  # end of the block holding it
    assert stopped[:end] == full[:end]
    assert set(stopped[end:]) == {sdar.mask_token_id}
    assert cut(stopped, 24, (stop,)) == full[: first + 1]


@pytest.mark.parametrize("threshold", [0.95, 0.3, 1.0])
def test_llada2_cached_equals_uncached(llada2, threshold) -> None:
    for prompt in PROMPTS:
        for steps in (8, 3):
            kw = dict(gen_length=13, block_length=8, steps=steps, threshold=threshold, eos_id=-1)
            plain, p_plain = llada2_generate(llada2, prompt, **kw)
            cached, p_cached = llada2_generate(llada2, prompt, use_cache=True, **kw)
            assert plain == cached and p_plain == p_cached
            assert len(plain) == 13 and llada2.mask_token_id not in plain


def test_llada2_eos_and_step_cap(llada2) -> None:
    prompt = PROMPTS[2]
    full, _ = llada2_generate(llada2, prompt, gen_length=24, block_length=8, steps=8, eos_id=-1)
    # an EOS stand-in absent from the prompt (the official early stop searches the prompt too)
    eos = next(t for t in full[8:] if t not in prompt)
    first = full.index(eos)
    out, _ = llada2_generate(llada2, prompt, gen_length=24, block_length=8, steps=8, eos_id=eos)
    assert out == full[: first + 1]
    early, _ = llada2_generate(
        llada2, prompt, gen_length=24, block_length=8, steps=8, eos_id=eos, eos_early_stop=True
    )
    assert early[-1] == eos and early == full[: len(early)]
    # minimal_topk caps steps at gen_length // minimal_topk: 24 // 12 = 2 passes per block
    _, capped = llada2_generate(
        llada2,
        prompt,
        gen_length=24,
        block_length=8,
        steps=8,
        threshold=1.0,
        minimal_topk=12,
        eos_id=-1,
    )
    assert capped == 2 * 4  # four blocks (prompt of 9 spills into the first), two steps each
