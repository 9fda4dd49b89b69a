"""Temperature sampling draws from softmax(logits / T), and only from the request's generator."""

from __future__ import annotations

import pytest
import torch

from foretell.decoding.unmask import candidates

# Chi-square critical value for 5 degrees of freedom at p = 0.001.
CHI2_CRIT_DF5 = 20.515


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax(family: str, temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.5], dtype=torch.float64)
    n = 20000
    generator = torch.Generator().manual_seed(1234)
    x0, _ = candidates(
        logits.expand(n, -1),
        family=family,
        rule="low_confidence",
        temperature=temperature,
        top_p=None,
        top_k=None,
        generator=generator,
    )
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
