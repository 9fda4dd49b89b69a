"""Self-checks of the reference decoder oracles on a tiny hand-made model.

The oracles are what the engine is compared against, so they need their own sanity checks:
schedules, no mask left behind, Prophet degenerating to plain LLaDA, and early exit firing.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference_decoders import (
    answer_gap,
    dream_generate,
    get_num_transfer_tokens,
    llada_generate,
    should_early_exit,
)

VOCAB = 16
MASK_ID = VOCAB - 1
MAX_LEN = 64


class TinyModel(torch.nn.Module):
    """Deterministic float64 logits from fixed random token/position embeddings.

    A mean over the canvas makes every logit depend on the whole input (like a bidirectional
    model), and the mask token is never predicted, as with the real models.
    """

    def __init__(self, seed: int = 1234, dim: int = 8, scale: float = 3.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tok = torch.randn(VOCAB, dim, generator=g, dtype=torch.float64)
        self.pos = torch.randn(MAX_LEN, dim, generator=g, dtype=torch.float64)
        self.out = torch.randn(dim, VOCAB, generator=g, dtype=torch.float64)
        self.scale = scale
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.clone())
        h = self.tok[x] + self.pos[: x.shape[1]]
        h = h + h.mean(dim=1, keepdim=True)
        logits = self.scale * (h @ self.out)
        logits[..., MASK_ID] = -1e4
        return logits


PROMPT = torch.tensor([[3, 7, 1]])


def _mask_counts(model: TinyModel) -> list[int]:
    return [int((c[0] == MASK_ID).sum()) for c in model.calls]


def test_schedule_m10_s4() -> None:
    mask = torch.ones(1, 10, dtype=torch.bool)
    assert get_num_transfer_tokens(mask, 4).tolist() == [[3, 3, 2, 2]]
    assert get_num_transfer_tokens(mask[:, :3], 4).tolist() == [[1, 1, 1, 0]]


@pytest.mark.parametrize(
    ("temperature", "remasking"),
    [(0.0, "low_confidence"), (0.7, "low_confidence"), (0.0, "random"), (1.0, "random")],
)
def test_llada_reveals_schedule_per_step(temperature: float, remasking: str) -> None:
    torch.manual_seed(0)
    model = TinyModel()
    out, nfe = llada_generate(
        model,
        PROMPT,
        steps=8,
        gen_length=12,
        block_length=6,
        temperature=temperature,
        remasking=remasking,
        mask_id=MASK_ID,
    )
    assert nfe == 8 == len(model.calls)
    counts = [*_mask_counts(model), int((out == MASK_ID).sum())]
    revealed = [a - b for a, b in itertools.pairwise(counts)]
    assert revealed == [2, 2, 1, 1] * 2
    assert out.shape == (1, 15)
    assert torch.equal(out[:, :3], PROMPT)
    # Semi-autoregressive: the second block is untouched while the first one decodes.
    for call in model.calls[:4]:
        assert bool((call[0, 9:] == MASK_ID).all())


def test_llada_constraints_are_kept_and_reduce_the_block_count() -> None:
    model = TinyModel()
    constraints = {1: 4, 2: 5}
    out, _ = llada_generate(
        model,
        PROMPT,
        steps=8,
        gen_length=12,
        block_length=6,
        mask_id=MASK_ID,
        constraints=constraints,
    )
    assert out[0, 4].item() == 4 and out[0, 5].item() == 5
    counts = [*_mask_counts(model), int((out == MASK_ID).sum())]
    revealed = [a - b for a, b in itertools.pairwise(counts)]
    assert revealed == [1, 1, 1, 1, 2, 2, 1, 1]


def test_llada_cfg_batches_cond_and_masked_prompt() -> None:
    model = TinyModel()
    out, nfe = llada_generate(
        model,
        PROMPT,
        steps=4,
        gen_length=8,
        block_length=8,
        cfg_scale=1.5,
        mask_id=MASK_ID,
    )
    assert nfe == 4 == len(model.calls)
    for call in model.calls:
        assert call.shape == (2, 11)
        assert torch.equal(call[0, :3], PROMPT[0])
        assert bool((call[1, :3] == MASK_ID).all())
        assert torch.equal(call[0, 3:], call[1, 3:])
    assert not bool((out == MASK_ID).any())


@pytest.mark.parametrize(("temperature", "remasking"), [(0.0, "low_confidence"), (0.8, "random")])
def test_prophet_with_huge_thresholds_equals_llada(temperature: float, remasking: str) -> None:
    kwargs = dict(
        steps=8,
        gen_length=16,
        block_length=8,
        temperature=temperature,
        remasking=remasking,
        mask_id=MASK_ID,
        constraints={4: 2, 5: 9},
    )
    torch.manual_seed(7)
    plain, nfe_plain = llada_generate(TinyModel(), PROMPT, **kwargs)
    torch.manual_seed(7)
    prophet, nfe_prophet = llada_generate(
        TinyModel(), PROMPT, early_exit={"thresholds": (1e9, 1e9, 1e9)}, **kwargs
    )
    assert torch.equal(plain, prophet)
    assert nfe_plain == nfe_prophet == 8


def test_prophet_negative_thresholds_exit_at_step_one() -> None:
    model = TinyModel()
    constraints = {4: 2, 5: 9}
    out, nfe = llada_generate(
        model,
        PROMPT,
        steps=8,
        gen_length=16,
        block_length=8,
        mask_id=MASK_ID,
        constraints=constraints,
        early_exit={"thresholds": (-1, -1, -1)},
    )
    assert nfe == 1 == len(model.calls)
    assert not bool((out == MASK_ID).any())
    first = model.calls[0]
    argmax = model(first).argmax(-1)
    masked = first == MASK_ID
    assert torch.equal(out[masked], argmax[masked])
    assert out[0, 7].item() == 2 and out[0, 8].item() == 9


def test_prophet_without_answer_start_never_exits() -> None:
    out, nfe = llada_generate(
        TinyModel(),
        PROMPT,
        steps=4,
        gen_length=8,
        block_length=8,
        mask_id=MASK_ID,
        early_exit={"thresholds": (-1, -1, -1)},
    )
    assert nfe == 4
    assert not bool((out == MASK_ID).any())


def test_prophet_min_statistic_is_stricter_than_mean() -> None:
    model = TinyModel()
    x = torch.cat([PROMPT, torch.full((1, 8), MASK_ID)], dim=1)
    positions = list(range(5, 10))
    logits = model(x)
    mean_gap = answer_gap(logits, positions, "mean")
    min_gap = answer_gap(logits, positions, "min")
    assert mean_gap is not None and min_gap is not None and min_gap < mean_gap
    threshold = (mean_gap + min_gap) / 2
    early_exit = {"answer_start": 2, "thresholds": (threshold, 1e9, 1e9)}
    common = dict(steps=8, gen_length=8, block_length=8, mask_id=MASK_ID, early_exit=early_exit)
    _, nfe_mean = llada_generate(TinyModel(), PROMPT, statistic="mean", **common)
    _, nfe_min = llada_generate(TinyModel(), PROMPT, statistic="min", **common)
    assert nfe_mean == 1
    assert nfe_min == 8


def test_should_early_exit_phases() -> None:
    thresholds = (7.5, 5.0, 2.5)
    assert should_early_exit(1, 10, 7.5, thresholds)
    assert not should_early_exit(3, 10, 7.4, thresholds)
    assert should_early_exit(4, 10, 5.0, thresholds)
    assert not should_early_exit(6, 10, 4.9, thresholds)
    assert should_early_exit(7, 10, 2.5, thresholds)
    assert not should_early_exit(10, 10, 2.4, thresholds)
    assert not should_early_exit(1, 10, None, thresholds)


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k", "alg_temp"),
    [(0.0, None, None, None), (0.9, 0.9, 5, None), (0.5, None, None, 0.3)],
)
def test_dream_leaves_no_mask(
    alg: str, temperature: float, top_p: float | None, top_k: int | None, alg_temp: float | None
) -> None:
    torch.manual_seed(3)
    model = TinyModel()
    out, nfe = dream_generate(
        model,
        PROMPT,
        steps=6,
        gen_length=10,
        alg=alg,
        alg_temp=alg_temp,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        mask_id=MASK_ID,
    )
    assert nfe == 6 == len(model.calls)
    assert out.shape == (1, 13)
    assert torch.equal(out[:, :3], PROMPT)
    assert not bool((out == MASK_ID).any())


def test_dream_maskgit_schedule() -> None:
    model = TinyModel()
    steps, gen_length = 5, 10
    out, _ = dream_generate(
        model, PROMPT, steps=steps, gen_length=gen_length, alg="maskgit_plus", mask_id=MASK_ID
    )
    counts = [*_mask_counts(model), int((out == MASK_ID).sum())]
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    for i in range(steps):
        t, s = timesteps[i], timesteps[i + 1]
        n = torch.tensor(float(counts[i]))
        expected = int(n * (1 - s / t)) if i < steps - 1 else int(n)
        assert counts[i] - counts[i + 1] == expected


def test_dream_early_exit() -> None:
    torch.manual_seed(5)
    plain, nfe_plain = dream_generate(
        TinyModel(),
        PROMPT,
        steps=6,
        gen_length=10,
        alg="origin",
        temperature=0.7,
        mask_id=MASK_ID,
    )
    torch.manual_seed(5)
    never, nfe_never = dream_generate(
        TinyModel(),
        PROMPT,
        steps=6,
        gen_length=10,
        alg="origin",
        temperature=0.7,
        mask_id=MASK_ID,
        early_exit={"answer_start": 4, "thresholds": (1e9, 1e9, 1e9)},
    )
    assert torch.equal(plain, never) and nfe_plain == nfe_never == 6

    model = TinyModel()
    out, nfe = dream_generate(
        model,
        PROMPT,
        steps=6,
        gen_length=10,
        alg="maskgit_plus",
        mask_id=MASK_ID,
        early_exit={"answer_start": 4, "thresholds": (-1, -1, -1)},
    )
    assert nfe == 1
    first = model.calls[0]
    raw = model(first)
    shifted = torch.cat([raw[:, :1], raw[:, :-1]], dim=1).argmax(-1)
    masked = first == MASK_ID
    assert torch.equal(out[masked], shifted[masked])
    assert torch.equal(out[:, :3], PROMPT)
