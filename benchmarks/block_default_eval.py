"""Prophet on the shipped block-diffusion (SDAR) model: the threshold sweep and the held-out table.

    python benchmarks/block_default_eval.py --threads 1 --sweep-n 200 --n 500 \
        --out benchmarks/results/block_default_eval.json

``--sweep-n`` prompts of another seed's stream (seed 1; not the held-out prompts reported)
choose Prophet's thresholds: the lowest whose accuracy stays within a point of full decoding
there. Then every configuration of ``foretell eval --block-default`` (full, half, threshold,
Prophet, threshold + Prophet, one step per block) runs on the ``--n`` held-out prompts with the
chosen policy. Forward passes are the engine's (the official decoder's prefill and store passes
ride in the next pass).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foretell.engine import Engine
from foretell.evaluation import evaluate, format_table
from foretell.models.block_default import BLOCK_DEFAULT_MODEL_DIR, TASK_NAMES
from foretell.params import Prophet

CANDIDATES = [(7.5, 5.0, 2.5), (6.0, 4.0, 2.0), (4.0, 2.5, 1.0), (3.0, 2.0, 1.0), (2.0, 1.0, 0.5)]
SWEEP_SEED = 1


def sweep(engine: Engine, n: int) -> list[dict]:
    """Full decoding and Prophet with each candidate (min and mean statistic) on seed 1."""
    rows = []
    full = evaluate(engine, list(TASK_NAMES), n=n, seed=SWEEP_SEED, names=("Full",), use_tqdm=False)
    base = full["tasks"][TASK_NAMES[0]]["table"]["Full / low_confidence"]
    rows.append({"policy": "full", **base})
    for statistic in ("min", "mean"):
        for thresholds in CANDIDATES:
            engine.default_prophet = Prophet(thresholds=thresholds, statistic=statistic)
            report = evaluate(
                engine, list(TASK_NAMES), n=n, seed=SWEEP_SEED, names=("Prophet",), use_tqdm=False
            )
            row = report["tasks"][TASK_NAMES[0]]["table"]["Prophet / low_confidence"]
            rows.append({"policy": f"prophet {statistic} {thresholds}", **row})
            rows[-1].update(statistic=statistic, thresholds=list(thresholds))
    return rows


def choose(rows: list[dict]) -> dict:
    """The candidate with the fewest passes whose accuracy is within a point of full."""
    full = rows[0]["accuracy"]
    ok = [r for r in rows[1:] if r["accuracy"] >= full - 0.01]
    return min(ok, key=lambda r: r["mean_forward_passes"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sweep-n", type=int, default=200)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine(str(BLOCK_DEFAULT_MODEL_DIR), max_num_seqs=64)
    rows = sweep(engine, args.sweep_n)
    print(f"sweep on seed {SWEEP_SEED}, n={args.sweep_n}")
    for r in rows:
        print(f"  {r['policy']:<34} {100 * r['accuracy']:6.1f}% {r['mean_forward_passes']:6.2f}")
    best = choose(rows)
    print(f"chosen: {best['policy']}")
    engine.default_prophet = Prophet(
        thresholds=tuple(best["thresholds"]), statistic=best["statistic"]
    )
    report = evaluate(engine, list(TASK_NAMES), n=args.n, use_tqdm=False)
    print(format_table(report))
    if args.out:
        result = {"sweep": rows, "chosen": best, "heldout": report}
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
