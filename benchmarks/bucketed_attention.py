"""The ``sdpa_buckets`` attention call alone: its time and its ops per bucket group (issue #24).

    OMP_NUM_THREADS=1 python benchmarks/bucketed_attention.py \
        --out benchmarks/results/bucketed_attention.json

Packed self-attention over a batch of sequences of seeded random lengths (36-264 tokens, the
issue's mix: prompts of 4-200 and gen 32/64), through ``foretell.models.attention``'s bucketed
path, at a few ``heads x head_dim`` shapes and batch sizes: the fastest of ``--repeats`` runs
of ``--calls`` calls, and the aten ops one call dispatches per bucket group (its constant part,
the padding and the copy back, spread over the groups). Two revisions are compared by running
the script with each one first on ``PYTHONPATH``, alternately; the inputs are the same
(seeded), so the outputs' checksum must agree too. Or in one process: ``--against`` another
checkout's ``foretell/models/attention.py`` loads it beside this one, and both run in
alternating rounds on the same inputs (the fairer timing on a noisy machine), with whether
their outputs are bitwise equal.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_overhead import OpCounter

from foretell.bench.report import machine_info, write_json
from foretell.models import attention

SHAPES = "2x16x64,2x16x16,8x64x64,32x128x16"  # heads x head_dim x sequences


def batch(heads: int, dim: int, sequences: int, seed: int = 0):
    """Seeded packed q, k, v and the self-attention specs of ``sequences`` sequences."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(36, 265, sequences)
    total = int(lens.sum())
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(total, heads, dim, generator=gen) for _ in range(3))
    starts = np.cumsum(lens) - lens
    return q, k, v, np.stack([starts, lens, starts, lens], axis=1)


def load_attention(path: str):
    """Another revision's ``foretell/models/attention.py`` as a module of its own (it imports
    only what this revision's package also has)."""
    spec = importlib.util.spec_from_file_location("other_attention", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["other_attention"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _best(modules: list, q, k, v, specs, calls: int, repeats: int) -> list[float]:
    """Each module's fastest call (of ``repeats`` runs of ``calls``), in alternating order."""
    best = [float("inf")] * len(modules)
    for round_ in range(repeats):
        order = range(len(modules)) if round_ % 2 == 0 else reversed(range(len(modules)))
        for m in order:
            out = torch.empty_like(q)
            start = time.perf_counter()
            for _ in range(calls):
                modules[m]._bucketed(q, k, v, out, specs)
            best[m] = min(best[m], (time.perf_counter() - start) / calls)
    return best


def measure(heads: int, dim: int, sequences: int, calls: int, repeats: int, against=None) -> dict:
    q, k, v, specs = batch(heads, dim, sequences)
    out = torch.empty_like(q)
    attention._bucketed(q, k, v, out, specs)  # builds the layout (kept for the pass)
    groups = len(attention._bucket_groups(specs, len(q), len(k), q.device))
    ops = OpCounter()  # host_overhead's: every op that reaches the dispatcher
    with ops:
        attention._bucketed(q, k, v, out, specs)
    modules = [attention] if against is None else [attention, against]
    times = _best(modules, q, k, v, specs, calls, repeats)
    extra = {}
    if against is not None:
        other = torch.empty_like(q)
        against._bucketed(q, k, v, other, specs)
        extra = {
            "against_ms_per_call": 1e3 * times[1],
            "ratio": times[0] / times[1],
            "bitwise_equal": bool(torch.equal(out, other)),
        }
    best = times[0]
    return {
        "heads": heads,
        "head_dim": dim,
        "sequences": sequences,
        "tokens": len(q),
        "groups": groups,
        "ops_per_call": ops.count,
        "ops_per_group": ops.count / groups,
        "ms_per_call": 1e3 * best,
        "checksum": float(out.double().sum()),
        **extra,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--shapes", default=SHAPES, help="heads x head_dim x sequences, comma-separated"
    )
    ap.add_argument("--calls", type=int, default=5, help="calls per timed run")
    ap.add_argument("--repeats", type=int, default=4, help="timed runs; the fastest is kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--against", default=None, help="another checkout's foretell/models/attention.py"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    against = None if args.against is None else load_attention(args.against)
    records = []
    head = ("heads x dim", "seqs", "tokens", "groups", "ops/group", "ms/call")
    line = f"{head[0]:>12} {head[1]:>5} {head[2]:>7} {head[3]:>6} {head[4]:>9} {head[5]:>9}"
    print(line + ("" if against is None else "  against ms   ratio  bitwise equal"))
    for shape in args.shapes.split(","):
        heads, dim, sequences = (int(x) for x in shape.split("x"))
        rec = measure(heads, dim, sequences, args.calls, args.repeats, against)
        records.append(rec)
        line = (
            f"{f'{heads} x {dim}':>12} {sequences:>5} {rec['tokens']:>7} {rec['groups']:>6} "
            f"{rec['ops_per_group']:>9.2f} {rec['ms_per_call']:>9.2f}"
        )
        if against is not None:
            line += f"  {rec['against_ms_per_call']:>10.2f} {rec['ratio']:>7.3f}"
            line += f"  {rec['bitwise_equal']}"
        print(line)
    if args.out:
        command = "python benchmarks/bucketed_attention.py " + " ".join(sys.argv[1:])
        write_json(args.out, {"records": records, "machine": machine_info(), "command": command})
    return records


if __name__ == "__main__":
    main()
