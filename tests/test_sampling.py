"""Temperature sampling draws from softmax(logits / T), and only from the request's generator."""

from __future__ import annotations

import pytest
import torch

from foretell.decoding.unmask import candidates

# Chi-square critical value for 5 degrees of freedom at p = 0.001.
CHI2_CRIT_DF5 = 20.515
# One 6-token row, drawn from many times.
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.5], dtype=torch.float64)
DRAWS = 20000


def _foretell_samples(family: str, temperature: float) -> torch.Tensor:
    """``DRAWS`` tokens that foretell's sampler draws from ``LOGITS`` (seed 1234)."""
    x0, _ = candidates(
        LOGITS.expand(DRAWS, -1),
        family=family,
        rule="low_confidence",
        temperature=temperature,
        top_p=None,
        top_k=None,
        generator=torch.Generator().manual_seed(1234),
    )
    return x0


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax(family: str, temperature: float) -> None:
    logits, n = LOGITS, DRAWS
    x0 = _foretell_samples(family, temperature)
    observed = torch.bincount(x0, minlength=6).double()
    expected = torch.softmax(logits / temperature, -1) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRIT_DF5, (observed, expected)


def test_greedy_draws_nothing_and_top_k_limits_the_support() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]], dtype=torch.float64).expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x0, conf = candidates(
        logits,
        family="llada",
        rule="low_confidence",
        temperature=0.0,
        top_p=None,
        top_k=None,
        generator=g,
    )
    assert torch.equal(g.get_state(), state)
    assert (x0 == 1).all()
    assert torch.allclose(conf, torch.softmax(logits[0], -1)[1].expand(4000))
    x0, _ = candidates(
        logits,
        family="dream",
        rule="low_confidence",
        temperature=1.0,
        top_p=None,
        top_k=2,
        generator=g,
    )
    assert set(x0.tolist()) == {1, 2}


def _official_llada_samples(logits: torch.Tensor, temperature: float, n: int) -> torch.Tensor:
    """LLaDA's generate.py: Gumbel-max in float64 over the whole row, exp(l) / (-log u)^T."""
    torch.manual_seed(99)
    rows = logits.to(torch.float64).expand(n, -1)
    noise = torch.rand_like(rows, dtype=torch.float64)
    return torch.argmax(rows.exp() / (-torch.log(noise)) ** temperature, dim=-1)


def _official_dream_samples(logits: torch.Tensor, temperature: float, n: int) -> torch.Tensor:
    """Dream's sample_tokens: Categorical(softmax(logits / T)).sample()."""
    torch.manual_seed(98)
    probs = torch.softmax(logits.expand(n, -1) / temperature, dim=-1)
    return torch.distributions.Categorical(probs=probs).sample()


def homogeneity_chi2(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Two-sample chi-square statistic (k - 1 degrees of freedom) of two samples of [0, k)."""
    counts = torch.stack([torch.bincount(a, minlength=k), torch.bincount(b, minlength=k)])
    counts = counts.double()
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_sampling_is_distribution_equal_to_the_official_not_token_equal(
    family: str, temperature: float
) -> None:
    """foretell draws its noise per needed row (Gumbel-max) where LLaDA draws it over the whole
    canvas x vocabulary and Dream samples a Categorical: the same distribution (a two-sample
    chi-square test cannot tell them apart), but not the same tokens for the same seed."""
    logits, n = LOGITS, DRAWS
    ours = _foretell_samples(family, temperature)
    official = (_official_llada_samples if family == "llada" else _official_dream_samples)(
        logits, temperature, n
    )
    assert homogeneity_chi2(ours, official, 6) < CHI2_CRIT_DF5
    assert (ours != official).float().mean() > 0.2  # not token-equal
