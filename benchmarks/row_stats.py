"""The pass's row statistics (``RowStats.of``) at a real vocabulary: the default confidence's
softmax over every gathered row, against over only the rows no variant scores again.

    OMP_NUM_THREADS=1 python benchmarks/row_stats.py --out benchmarks/results/row_stats.json
    OMP_NUM_THREADS=1 python benchmarks/row_stats.py --subset \
        --out benchmarks/results/row_stats_subset.json

``--subset`` measures what the runner's rule (``foretell.engine.runner._some_rows``) decides:
for a share of wanted rows, the default softmax and the gap over those rows alone (a gather
and a scatter back) against over every row, at small vocabularies (the micro and shipped
models') and large ones, with the rule's choice beside each point.

With Fast-dLLM's rules (a KV cache or the threshold rule) a LLaDA request's confidence is a
float64 softmax, so its rows are a variant's and the default (model dtype) softmax over them is
thrown away. The runner passes the default rows only when variants hold most rows. This times
both on random logits of LLaDA-8B's vocabulary (126,464), for a share of variant rows, median of
``--repeats`` interleaved runs, and checks that the statistics are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from foretell.bench.report import machine_info, write_json
from foretell.decoding.unmask import ProbVariant, RowStats

VOCAB = 126_464  # LLaDA-8B's


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(rows: int, share: float, repeats: int, vocab: int = VOCAB) -> dict:
    """Both ways on the same ``[rows, vocab]`` logits, ``share`` of the rows a float64
    variant's, interleaved; median milliseconds of each."""
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=gen)
    first = rows - int(rows * share)
    variants = [ProbVariant(torch.arange(first, rows), torch.float64)]
    default_rows = torch.arange(first)
    every = RowStats.of(logits, variants)
    only = RowStats.of(logits, variants, default_rows)
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            (every.argmax, every.prob, every.gap), (only.argmax, only.prob, only.gap), strict=True
        )
    )
    t_every, t_only = [], []
    for _ in range(repeats):
        t_every += _time(lambda: RowStats.of(logits, variants), 1)
        t_only += _time(lambda: RowStats.of(logits, variants, default_rows), 1)
    return {
        "rows": rows,
        "vocab": vocab,
        "variant_share": share,
        "every_row_ms": 1e3 * statistics.median(t_every),
        "default_rows_only_ms": 1e3 * statistics.median(t_only),
        "identical": same,
    }


# (vocabulary, rows, shares of wanted rows) of ``--subset``.
SUBSET_POINTS = (
    *((v, n, (0.1, 0.3, 0.5, 0.7)) for v in (51, 56) for n in (128, 512, 1147, 4096)),
    (4096, 512, (0.3, 0.5, 0.7, 0.9)),
    (32000, 128, (0.3, 0.5, 0.7, 0.9)),
    (VOCAB, 64, (0.3, 0.5, 0.7, 0.9)),
)


def measure_subset(vocab: int, rows: int, share: float, repeats: int) -> dict:
    """The default confidence and the gap over ``share`` of ``rows`` random float32 logits
    rows alone, against over every row, interleaved; median milliseconds of each, whether the
    wanted rows' statistics are identical, and whether the runner's rule takes the subset."""
    import numpy as np

    from foretell.engine.runner import _some_rows

    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    logits = torch.randn(rows, vocab, generator=gen)
    wanted = torch.randperm(rows, generator=gen)[: int(rows * share)].sort().values
    flags = np.zeros(rows, dtype=bool)
    flags[wanted.numpy()] = True
    every = RowStats.of(logits)
    default = RowStats.of(logits, (), wanted, None)
    gap = RowStats.of(logits, (), None, wanted)
    same = torch.equal(every.prob[wanted], default.prob[wanted]) and torch.equal(
        every.gap[wanted], gap.gap[wanted]
    )
    times: dict[str, list[float]] = {"every": [], "default": [], "gap": []}
    for _ in range(repeats):
        times["every"] += _time(lambda: RowStats.of(logits), 1)
        times["default"] += _time(lambda: RowStats.of(logits, (), wanted, None), 1)
        times["gap"] += _time(lambda: RowStats.of(logits, (), None, wanted), 1)
    every_ms = 1e3 * statistics.median(times["every"])
    return {
        "vocab": vocab,
        "rows": rows,
        "wanted_share": share,
        "logits_left_out": (rows - len(wanted)) * vocab,
        "every_row_ms": every_ms,
        "default_subset_ratio": 1e3 * statistics.median(times["default"]) / every_ms,
        "gap_subset_ratio": 1e3 * statistics.median(times["gap"]) / every_ms,
        "rule_takes_subset": _some_rows(flags, logits) is not None,
        "identical": same,
    }


def _checked_and_written(records: list[dict], out: str | None) -> int:
    """Exit status 1 if some record's statistics differ between the two ways; else 0, with
    the records written to ``out`` as JSON when given."""
    if not all(r["identical"] for r in records):
        print("statistics differ", file=sys.stderr)
        return 1
    if out:
        write_json(
            out,
            {
                "records": records,
                "machine": machine_info(),
                "command": "python benchmarks/row_stats.py " + " ".join(sys.argv[1:]),
            },
        )
    return 0


def main_subset(args: argparse.Namespace) -> int:
    records = [
        measure_subset(vocab, rows, share, args.repeats)
        for vocab, rows, shares in SUBSET_POINTS
        for share in shares
    ]
    print(
        f"{'vocab':>6} {'rows':>5} {'wanted':>6} {'left out':>9} {'every row ms':>12} "
        f"{'softmax subset/every':>20} {'gap subset/every':>16} {'rule':>6} same"
    )
    for r in records:
        rule = "subset" if r["rule_takes_subset"] else "every"
        print(
            f"{r['vocab']:>6} {r['rows']:>5} {r['wanted_share']:>6.0%} "
            f"{r['logits_left_out']:>9,} {r['every_row_ms']:>12.3f} "
            f"{r['default_subset_ratio']:>20.2f} {r['gap_subset_ratio']:>16.2f} {rule:>6} "
            f"{r['identical']}"
        )
    return _checked_and_written(records, args.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="gathered rows of the pass")
    p.add_argument("--shares", default="0.5,0.75,1.0", help="shares of variant rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--subset",
        action="store_true",
        help="time the runner's subset rule's choices instead (SUBSET_POINTS)",
    )
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.subset:
        return main_subset(args)
    records = [measure(args.rows, float(s), args.repeats) for s in args.shares.split(",")]
    header = f"{'variant rows':>12} {'every row ms':>13} {'default rows only ms':>21}"
    print(f"{header} {'ratio':>6} same")
    for r in records:
        ratio = r["default_rows_only_ms"] / r["every_row_ms"]
        print(
            f"{r['variant_share']:>12.0%} {r['every_row_ms']:>13.1f} "
            f"{r['default_rows_only_ms']:>21.1f} {ratio:>6.2f} {r['identical']}"
        )
    return _checked_and_written(records, args.out)


if __name__ == "__main__":
    sys.exit(main())
