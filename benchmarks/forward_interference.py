"""What the forward does to the host work after it, on this CPU (issue #24).

    OMP_NUM_THREADS=1 python benchmarks/forward_interference.py \
        --out benchmarks/results/forward_interference.json

``host_overhead.py`` times a step's host work twice: as the issue defines it (wall less the
model's forward) and with the model's outputs replayed from a recording, the model not run
("replayed"). On this CPU the first is well above the second: the forward runs on the same
core as the host work that follows it. This script replays the same steps with other work in
the forward's place, after each replayed forward pass and on the model's clock (so its own
time is not host time), to tell which kind of work slows what follows:

- ``none``: nothing (the replayed figure);
- ``read``: a sum over a 16 MB array, which evicts the data caches;
- ``write``: 16 MB filled;
- ``alloc``: six ``[4559, 128]`` float32 tensors allocated and filled (12 MB, about a forward's
  intermediates at B=64);
- ``matmul``: 20 rounds of ``[4559, 32] @ [32, 128]``, relu, ``@ [128, 32]`` (the micro
  model's MLP shapes at B=64's token count);
- ``sdpa``: one ``scaled_dot_product_attention`` over ``[64, 2, 200, 16]``;

and, for reference, the live run's host time less every call of the model ("live"). Each round
runs every kind once, interleaved; the table gives the median over ``--rounds``. A replay's
outputs must equal the recording's, or the script fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead

from foretell.bench.report import machine_info, write_json

TOKENS, WIDTH, INNER = 4559, 32, 128  # the mix at B=64: tokens a pass, micro widths


def kinds() -> dict[str, Callable[[], object] | None]:
    """Each kind of work, on inputs made once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, WIDTH, generator=gen)
    w1 = torch.randn(WIDTH, INNER, generator=gen) / WIDTH**0.5
    w2 = torch.randn(INNER, WIDTH, generator=gen) / INNER**0.5
    q = torch.randn(64, 2, 200, 16, generator=gen)
    array = np.ones(2 * 2**20)  # 16 MB of float64
    block = torch.empty(4 * 2**20)  # 16 MB of float32

    def matmul() -> torch.Tensor:
        h = x
        for _ in range(20):
            h = (h @ w1).relu() @ w2
        return h

    return {
        "none": None,
        "read": array.sum,
        "write": lambda: block.fill_(1.0),
        "alloc": lambda: [torch.empty(TOKENS, INNER).fill_(1.0) for _ in range(6)],
        "matmul": matmul,
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q),
    }


def measure(batch_size: int, rounds: int, warmup_steps: int, steps: int) -> dict:
    loaded = host_overhead.micro_model(0, "llada")
    kw = {"warmup_steps": warmup_steps, "steps": steps, "backend": "sdpa_buckets"}
    tape = host_overhead.ForwardTape()
    recorded = host_overhead.run_mix(loaded, batch_size, count=False, tape=tape, **kw)
    work = kinds()
    runs: dict[str, list[float]] = {kind: [] for kind in ("live", *work)}
    for _ in range(rounds):
        live = host_overhead.run_mix(loaded, batch_size, count=False, **kw)
        runs["live"].append(live.host_us_less_model_calls)
        for kind, fn in work.items():
            tape.after_forward = fn
            run = host_overhead.run_mix(
                loaded, batch_size, count=False, tape=tape, replay=True, **kw
            )
            tape.after_forward = None
            if run.outputs != recorded.outputs or run.canvases != recorded.canvases:
                raise RuntimeError(f"{kind}: the replayed run's outputs differ from the recorded")
            runs[kind].append(run.host_us_less_model_calls)
    return {
        "batch_size": batch_size,
        "host_us_per_request_step": {kind: statistics.median(v) for kind, v in runs.items()},
        "host_us_per_request_step_runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    p.add_argument("--warmup-steps", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.batch_size < 1:
        p.error("--rounds and --batch-size: must be >= 1")
    torch.set_num_threads(args.threads)
    result = measure(args.batch_size, args.rounds, args.warmup_steps, args.steps)
    medians = result["host_us_per_request_step"]
    print(f"B={args.batch_size}, issue's mix, median of {args.rounds} interleaved rounds")
    print(f"{'in the forward place':>22} {'host us/request-step':>21} {'vs none':>8}")
    for kind, value in medians.items():
        print(f"{kind:>22} {value:>21.1f} {value / medians['none']:>7.2f}x")
    if args.out:
        write_json(args.out, {"machine": machine_info(), "rounds": args.rounds, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
