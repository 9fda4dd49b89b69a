"""Prophet's early-commit test: is the answer already settled?

After each forward pass (before revealing), the top-1 minus top-2 logit gap is measured over the
answer region. Once its statistic reaches the phase's threshold, every remaining mask takes this
step's prediction and the request is done: the scheduler evicts it in the same step.
"""

from __future__ import annotations

import functools

import torch

from foretell.decoding.unmask import top2_gap
from foretell.params import Prophet


def answer_region(policy: Prophet, prompt_len: int, canvas_len: int, masked: torch.Tensor):
    """Canvas positions the gap is measured over.

    An explicit span (the reference's ``answer_start`` / ``answer_length``, clipped to the
    canvas) counts whether or not its tokens are still masked; without one the region is every
    still-masked position of the generation (``masked``).
    """
    span = policy.answer_span(prompt_len, canvas_len)
    return masked if span is None else _span(*span)


@functools.lru_cache(maxsize=1024)
def _span(start: int, end: int) -> torch.Tensor:
    """``arange(start, end)``, built once per span (callers only index with it)."""
    return torch.arange(start, end)


def row_gaps(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit of each row."""
    return top2_gap(logits, logits.argmax(dim=-1))


def reduce_gaps(gaps: torch.Tensor, statistic: str) -> float | None:
    """Per-row gaps reduced by ``statistic`` as the reference reduces them (None for no rows):
    the value Prophet's test compares with its threshold."""
    if gaps.shape[0] == 0:
        return None
    return float(gaps.mean() if statistic == "mean" else gaps.min())


def reported_gap(gaps: torch.Tensor, statistic: str) -> float | None:
    """The statistic a request reports (``RequestOutput.last_gap``): the minimum, or the mean
    as a float64 sum taken row by row in order, divided by the count.

    This is how the batched step reduces every request at once (one ``index_add_``), and on a
    CPU its value does not depend on what else shares the pass (on CUDA ``index_add_`` adds
    atomically, in no fixed order: the last bits may vary); the reference's own reduction
    (:func:`reduce_gaps`) can differ from it in the last bits, and decides the test."""
    n = gaps.shape[0]
    if n == 0:
        return None
    if statistic != "mean":
        return float(gaps.min())
    index = torch.zeros(n, dtype=torch.long, device=gaps.device)
    total = gaps.new_zeros(1, dtype=torch.float64).index_add_(0, index, gaps.double())
    return float(total) / n


# How close (relative) to the threshold a float64 mean must fall before the batched step asks
# the reference's own float32/bfloat16 reduction to decide: that reduction's rounding error is
# below n * 2^-24 of the mean for n rows (1e-3 covers 16k rows), plus one rounding to the
# gaps' dtype (its eps).
DECIDE_MARGIN = 1e-3


def undecided(mean, threshold, dtype: torch.dtype):
    """Whether a float64 mean is too close to ``threshold`` to stand for the reference's
    reduction in ``dtype`` (see :data:`DECIDE_MARGIN`): floats, or NumPy arrays of them."""
    return abs(mean - threshold) <= (DECIDE_MARGIN + torch.finfo(dtype).eps) * abs(threshold)


def should_commit(policy: Prophet, gap: float | None, step: int, steps: int) -> bool:
    """Prophet's rule at global step ``step`` (from 1) of a budget of ``steps``."""
    return gap is not None and gap >= policy.threshold(step, steps)
