"""Prophet's gap statistic as the batched step computes it: one float64 sum for every request
(reported), and the reference's own reduction only where a float64 mean is too close to the
threshold to stand for it (decided)."""

from __future__ import annotations

import pytest
import torch

from foretell.decoding.early_commit import DECIDE_MARGIN, reduce_gaps, reported_gap, undecided
from foretell.decoding.unmask import top2_gap


def _gaps(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Logit gaps: nonnegative, spread over several orders of magnitude.
    return (
        torch.rand(n, generator=g, dtype=torch.float64)
        * 10 ** torch.randint(-4, 2, (n,), generator=g)
    ).to(dtype)


def test_reported_mean_is_the_row_order_float64_sum_over_the_count() -> None:
    gaps = _gaps(257, torch.float32, 0)
    total = 0.0
    for value in gaps.tolist():
        total += value
    assert reported_gap(gaps, "mean") == total / 257
    assert reported_gap(gaps, "min") == float(gaps.min())
    assert reported_gap(gaps[:0], "mean") is None


def test_one_sum_over_segments_reports_each_request_as_alone() -> None:
    """What ``BatchedStep._gaps`` computes for a whole pass equals each request's own value,
    whatever shares the pass."""
    sizes = [1, 7, 64, 3, 200]
    parts = [_gaps(n, torch.float32, i) for i, n in enumerate(sizes)]
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    flat = torch.cat(parts)
    sums = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, segment, flat.double())
    means = (sums / torch.tensor(sizes)).tolist()
    mins = torch.full((len(sizes),), torch.inf).scatter_reduce_(0, segment, flat, "amin")
    assert means == [reported_gap(p, "mean") for p in parts]
    assert mins.tolist() == [reported_gap(p, "min") for p in parts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_decided_float64_mean_falls_on_the_same_side_as_the_reference_reduction(dtype) -> None:
    """Thresholds placed just inside and just outside the margin around the mean: outside it,
    the float64 mean and the reference's ``mean()`` in the gaps' dtype always agree."""
    decided = 0
    for seed in range(200):
        gaps = _gaps(1 + seed * 7, dtype, seed)
        mean64 = reported_gap(gaps, "mean")
        reference = reduce_gaps(gaps, "mean")
        for rel in (-0.5, -0.02, -2e-3, -1e-6, 0.0, 1e-6, 2e-3, 0.02, 0.5):
            threshold = mean64 * (1 + rel)
            if undecided(mean64, threshold, dtype):
                assert abs(rel) <= DECIDE_MARGIN + torch.finfo(dtype).eps
                continue
            decided += 1
            assert (mean64 >= threshold) == (reference >= threshold), (seed, rel)
    assert decided > 600


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_top2_gap_is_topk_difference_exactly(dtype: torch.dtype) -> None:
    """``top2_gap`` (what every pass computes the gap and the margin with) equals the
    references' ``topk(2)`` difference bit for bit: with ties at the top, suppressed (-inf)
    columns, and short and long vocabularies."""
    g = torch.Generator().manual_seed(7)
    for vocab in (2, 3, 51, 1000):
        logits = (torch.randn(300, vocab, generator=g) * 4).to(dtype)
        # Ties at the top: rounded copies of a few rows, and a row of equal values.
        logits[:40] = logits[:40].round()
        logits[40] = 1.5
        logits[41:60, : max(1, vocab // 3)] = float("-inf")
        logits[60, 1:] = float("-inf")  # one finite value: an infinite gap, as topk's
        top2 = logits.topk(2, dim=-1).values
        expected = top2[:, 0] - top2[:, 1]
        got = top2_gap(logits, logits.argmax(dim=-1))
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected), vocab


def test_row_stats_score_default_rows_alone_identically() -> None:
    """The runner may give ``RowStats.of`` the rows that take the default confidence (when
    variants hold most rows): the statistics are those of scoring every row, bit for bit."""
    from foretell.decoding.unmask import ProbVariant, RowStats

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 37, generator=g, dtype=torch.float32)
    variants = [
        ProbVariant(torch.arange(10, 25), torch.float64),
        ProbVariant(torch.arange(25, 32), torch.float32, (4, 5)),
        ProbVariant(torch.arange(32, 40), torch.float32, (), "margin"),
    ]
    every = RowStats.of(logits, variants)
    only = RowStats.of(logits, variants, torch.arange(10))
    for field in ("argmax", "prob", "gap"):
        a, b = getattr(every, field), getattr(only, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    everything = [ProbVariant(torch.arange(40), torch.float64)]
    assert torch.equal(
        RowStats.of(logits, everything).prob,
        RowStats.of(logits, everything, torch.arange(0)).prob,
    )


def test_row_stats_benchmark_checks_identity() -> None:
    from tests.benchmark_scripts import script_module

    with script_module("row_stats") as bench:
        record = bench.measure(rows=8, share=0.75, repeats=1, vocab=50)
        assert record["identical"] and record["rows"] == 8 and record["every_row_ms"] > 0
        # --subset: the wanted rows' statistics are the same either way; the rule's choice shown.
        few = bench.measure_subset(vocab=51, rows=1147, share=0.1, repeats=1)
        assert few["identical"] and few["rule_takes_subset"] and few["default_subset_ratio"] > 0
        assert few["logits_left_out"] == (1147 - 114) * 51
        assert not bench.measure_subset(vocab=51, rows=1000, share=0.5, repeats=1)[
            "rule_takes_subset"
        ]


@pytest.mark.parametrize(
    ("rows", "wanted", "subset"),
    [
        (1147, 115, True),  # a tenth
        (1147, 344, True),  # 30%
        (4096, 2048, False),  # half
        (4096, 2867, False),  # 70%
        (128, 13, False),  # a tenth, few logits left out
        (964, 321, True),  # a third, 643 rows x 51 = 32,793 logits left out
        (963, 321, False),  # a third, 642 rows x 51 = 32,742 logits left out
        (1000, 334, False),  # just over a third
    ],
)
def test_row_statistics_take_a_subset_only_where_it_was_measured_to_pay(
    rows: int, wanted: int, subset: bool
) -> None:
    """The runner scores only the rows that read a score (or a gap) when they are at most a
    third of the pass's and leave out at least 32k logits; otherwise every row (a gather and
    a scatter back cost more). The cases are points of the measurement behind the rule, and
    its two bounds."""
    import numpy as np

    from foretell.engine.runner import _some_rows

    flags = np.zeros(rows, dtype=bool)
    flags[np.random.default_rng(0).choice(rows, wanted, replace=False)] = True
    got = _some_rows(flags, torch.zeros(rows, 51))
    if subset:
        assert torch.equal(got, torch.from_numpy(flags.nonzero()[0]))
    else:
        assert got is None
