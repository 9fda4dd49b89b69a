"""Forward chunking on CPU: cost per sequence of one packed pass, by chunk size.

    python benchmarks/forward_chunks.py --out benchmarks/results/forward_chunks.json

The runner can run a step's packed batch through the model in chunks of whole sequences
(``Engine(forward_chunk_tokens=...)``); this measures what that buys on this machine. The same
batches (the shipped model, or its shape with random weights) go through ``ModelRunner._forward``
with each chunk budget in turn, interleaved so that background load hits every budget alike,
and the median of the repeats is kept. The largest difference in hidden states between a
budget and one piece is reported too (rounding at most: sequences never attend across chunks).
Then the engine itself: ``static-prophet`` and ``engine-prophet`` of ``foretell bench`` on its
default workload at B=32, with and without chunking, round-robin, fastest of ``--repeats-engine``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from foretell.bench.report import machine_info, model_info, write_json
from foretell.bench.setup import default_size_model
from foretell.engine.runner import CPU_FORWARD_CHUNK_TOKENS, ModelRunner

CASES = ((20, 28), (43, 14), (43, 28), (43, 56), (100, 28))  # (canvas length, sequences)
BUDGETS = (None, 320, CPU_FORWARD_CHUNK_TOKENS, 1280)


def _name(budget: int | None) -> str:
    return "one piece" if budget is None else f"{budget} tok"


def measure(model, length: int, seqs: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(length * 1000 + seqs)
    ids = torch.randint(0, model.config.vocab_size, (length * seqs,), generator=gen)
    positions = torch.arange(length).repeat(seqs)
    lens = [length] * seqs
    runners = {b: ModelRunner(model, forward_chunk_tokens=b) for b in BUDGETS}
    times: dict[int | None, list[float]] = {b: [] for b in BUDGETS}
    with torch.inference_mode():
        reference = runners[None]._forward(ids, positions, lens)
        diff = max(
            float((runner._forward(ids, positions, lens) - reference).abs().max())
            for runner in runners.values()
        )
        for _ in range(repeats):
            for budget, runner in runners.items():
                start = time.perf_counter()
                runner._forward(ids, positions, lens)
                times[budget].append(time.perf_counter() - start)
    ms = {_name(b): 1e3 * statistics.median(t) / seqs for b, t in times.items()}
    return {"canvas_len": length, "sequences": seqs, "ms_per_sequence": ms, "max_abs_diff": diff}


def engine_ab(repeats: int) -> dict:
    """Generated tokens/s of the Prophet modes at B=32, one piece against the CPU default."""
    from foretell.bench.run import run_mode, warm_up
    from foretell.bench.setup import load_for_bench

    setup = load_for_bench(None)
    requests = setup.workload(200, 0)
    warm_up(setup.loaded, requests, 32)
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):
        for mode in ("static-prophet", "engine-prophet"):
            for budget in (None, "auto"):
                rec = run_mode(
                    setup.loaded,
                    requests,
                    mode,
                    batch_size=32,
                    prophet=setup.prophet,
                    forward_chunk_tokens=budget,
                )
                key = f"{mode}, {'one piece' if budget is None else 'chunked (auto)'}"
                runs.setdefault(key, []).append(rec["tokens_per_s"])
    return {key: {"tokens_per_s": max(v), "runs": v} for key, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--repeats-engine", type=int, default=3, help="0: skip the engine runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded, which = default_size_model()
    model = loaded.model
    rows = [measure(model, length, seqs, args.repeats) for length, seqs in CASES]
    names = [_name(b) for b in BUDGETS]
    head = f"{'canvas':>6} {'seqs':>4} {'tokens':>6}  " + " ".join(f"{n:>10}" for n in names)
    lines = [
        f"forward cost per sequence (ms, median of {args.repeats}), {which} model, "
        f"{args.threads} thread(s)",
        head,
        "-" * len(head),
    ]
    for row in rows:
        ms = row["ms_per_sequence"]
        best = min(ms.values())
        cells = " ".join(f"{ms[n]:>9.2f}{'*' if ms[n] == best else ' '}" for n in names)
        tokens = row["canvas_len"] * row["sequences"]
        lines.append(f"{row['canvas_len']:>6} {row['sequences']:>4} {tokens:>6}  {cells}")
    lines.append(
        "* fastest; 'one piece' is no chunking, the engine's default on CPU is "
        f"{CPU_FORWARD_CHUNK_TOKENS} tokens; largest hidden-state difference from one piece: "
        f"{max(row['max_abs_diff'] for row in rows):.1e}"
    )
    engine = engine_ab(args.repeats_engine) if args.repeats_engine > 0 else {}
    if engine:
        lines.append("")
        lines.append(
            f"engine, default workload, B=32, generated tokens/s (fastest of "
            f"{args.repeats_engine}):"
        )
        for key, rec in engine.items():
            lines.append(f"  {key:<32} {rec['tokens_per_s']:8.1f}")
    print("\n".join(lines))
    if args.out:
        write_json(
            args.out,
            {
                "rows": rows,
                "engine": engine,
                "default_cpu_budget": CPU_FORWARD_CHUNK_TOKENS,
                "model": {"name": which, **model_info(model, loaded.path)},
                "machine": machine_info(),
                "repeats": args.repeats,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
