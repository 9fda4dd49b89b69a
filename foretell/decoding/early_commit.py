"""Prophet's early-commit test: is the answer already settled?

After each forward pass (before revealing), the top-1 minus top-2 logit gap is measured over the
answer region. Once its statistic reaches the phase's threshold, every remaining mask takes this
step's prediction and the request is done: the scheduler evicts it in the same step.
"""

from __future__ import annotations

import functools

import torch

from foretell.params import Prophet


def answer_region(policy: Prophet, prompt_len: int, canvas_len: int, masked: torch.Tensor):
    """Canvas positions the gap is measured over.

    An explicit span (the reference's ``answer_start`` / ``answer_length``, clipped to the
    canvas) counts whether or not its tokens are still masked; without one the region is every
    still-masked position of the generation (``masked``).
    """
    if policy.answer_start is None:
        return masked
    start = prompt_len + policy.answer_start
    return _span(start, min(start + policy.answer_length, canvas_len))


@functools.lru_cache(maxsize=1024)
def _span(start: int, end: int) -> torch.Tensor:
    """``arange(start, end)``, built once per span (callers only index with it)."""
    return torch.arange(start, end)


def logit_gap(logits: torch.Tensor, statistic: str) -> float | None:
    """Top-1 minus top-2 logit per row, reduced by ``statistic`` (None for no rows)."""
    if logits.shape[0] == 0:
        return None
    top2 = logits.topk(2, dim=-1).values
    return reduce_gaps(top2[:, 0] - top2[:, 1], statistic)


def reduce_gaps(gaps: torch.Tensor, statistic: str) -> float | None:
    """Per-row gaps reduced by ``statistic`` (None for no rows)."""
    if gaps.shape[0] == 0:
        return None
    return float(gaps.mean() if statistic == "mean" else gaps.min())


def should_commit(policy: Prophet, gap: float | None, step: int, steps: int) -> bool:
    """Prophet's rule at global step ``step`` (from 1) of a budget of ``steps``."""
    return gap is not None and gap >= policy.threshold(step, steps)
