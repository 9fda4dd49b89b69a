"""The pass's row statistics (``RowStats.of``) at a real vocabulary: the default confidence's
softmax over every gathered row, against over only the rows no variant scores again.

    OMP_NUM_THREADS=1 python benchmarks/row_stats.py --out benchmarks/results/row_stats.json

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="gathered rows of the pass")
    p.add_argument("--shares", default="0.5,0.75,1.0", help="shares of variant rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = [measure(args.rows, float(s), args.repeats) for s in args.shares.split(",")]
    header = f"{'variant rows':>12} {'every row ms':>13} {'default rows only ms':>21}"
    print(f"{header} {'ratio':>6} same")
    for r in records:
        ratio = r["default_rows_only_ms"] / r["every_row_ms"]
        print(
            f"{r['variant_share']:>12.0%} {r['every_row_ms']:>13.1f} "
            f"{r['default_rows_only_ms']:>21.1f} {ratio:>6.2f} {r['identical']}"
        )
    if not all(r["identical"] for r in records):
        print("statistics differ", file=sys.stderr)
        return 1
    if args.out:
        write_json(
            args.out,
            {
                "records": records,
                "machine": machine_info(),
                "command": "python benchmarks/row_stats.py " + " ".join(sys.argv[1:]),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
