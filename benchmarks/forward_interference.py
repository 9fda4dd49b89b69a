"""What the forward does to the host work after it, on this CPU (issue #24).

    OMP_NUM_THREADS=1 python benchmarks/forward_interference.py \
        --out benchmarks/results/forward_interference.json

``host_overhead.py`` times a step's host work twice: as the issue defines it (wall less the
model's forward) and with the model's outputs replayed from a recording, the model not run
("replayed"). On this CPU the first is well above the second. This script replays the same
steps with something else in the forward's place, before each replayed forward pass's output
is handed back and on the model's clock (so its own time is not host time), to tell what in
the gap slows the host work that follows: the work, its length, or the core waiting:

- ``none``: nothing (the replayed figure);
- ``read16``, ``read64``: a sum over a 16 MB or a 64 MB array (this machine's L2 is 1 MB a
  core, its L3 32 MB);
- ``write16``: 16 MB filled;
- ``alloc``: six ``[4559, 128]`` float32 tensors allocated and filled (14 MB);
- ``mlp``: the micro model's MLP once over a pass's 4,559 tokens (SwiGLU, width 32, inner 64:
  what one forward runs of it);
- ``mlp20``: the same 20 times;
- ``sdpa``: one ``scaled_dot_product_attention`` over ``[64, 2, 72, 16]`` (64 sequences of a
  pass's mean length, the micro model's heads);
- ``spin1``, ``spin``: a Python loop that reads the clock until 1.1 ms (about ``mlp``'s time)
  or ``--gap-ms`` (default 13, about the live forward at B=64) have passed: time on the core
  with almost no data touched;
- ``sleep``: ``time.sleep`` for ``--gap-ms``: the core idle for as long;

and, for reference, live runs (the model run; their host time less every call of the model):

- ``live``: as the engine runs it;
- ``worker``: each call of the model's methods on a worker thread of its own, the host's
  thread waiting for it (so the host's core waits through the forward);
- ``worker-pinned``: the same, the worker pinned to one core and the host's thread to another
  (where the process may use two cores).

A live run's outputs and canvases must equal the recording's too. Each round
runs every kind once, in an order shuffled per round (seeded); the table gives the median over
``--rounds`` and each kind's own time a step (model time less the replay's). A replay's outputs
must equal the recording's, or the script fails.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead

from foretell.bench.report import machine_info, write_json

TOKENS, WIDTH, INNER = 4559, 32, 64  # the mix at B=64: tokens a pass; micro widths
HEADS, HEAD_DIM, SEQS, SEQ_LEN = 2, 16, 64, 72  # 64 sequences of 72 tokens: about a pass
ALLOC_WIDTH = 128
GAP_MS = 13.0  # about the live forward's time a step at B=64 (the mix)
SPIN1_MS = 1.1  # about ``mlp``'s


def _spin(ms: float) -> Callable[[], None]:
    """Busy for ``ms`` milliseconds, touching next to no memory: what time alone does."""

    def run() -> None:
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            pass

    return run


def kinds(gap_ms: float = GAP_MS) -> dict[str, Callable[[], object] | None]:
    """Each kind of work, on inputs made once; ``gap_ms``: how long ``spin`` and ``sleep``
    last."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, WIDTH, generator=gen)
    gate, up = (torch.randn(WIDTH, INNER, generator=gen) / WIDTH**0.5 for _ in range(2))
    down = torch.randn(INNER, WIDTH, generator=gen) / INNER**0.5
    q = torch.randn(SEQS, HEADS, SEQ_LEN, HEAD_DIM, generator=gen)
    array16, array64 = np.ones(2 * 2**20), np.ones(8 * 2**20)  # float64: 16 and 64 MB
    block = torch.empty(4 * 2**20)  # float32: 16 MB

    def mlp(times: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            h = x
            for _ in range(times):
                h = (torch.nn.functional.silu(h @ gate) * (h @ up)) @ down
            return h

        return run

    return {
        "none": None,
        "read16": array16.sum,
        "read64": array64.sum,
        "write16": lambda: block.fill_(1.0),
        "alloc": lambda: [torch.empty(TOKENS, ALLOC_WIDTH).fill_(1.0) for _ in range(6)],
        "mlp": mlp(1),
        "mlp20": mlp(20),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q),
        "spin1": _spin(SPIN1_MS),
        "spin": _spin(gap_ms),
        "sleep": lambda: time.sleep(gap_ms / 1e3),
    }


def live_kinds() -> list[str]:
    """The live runs this process can make (``worker-pinned`` needs two cores to pin to)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    return ["live", "worker"] + (["worker-pinned"] if len(cores) >= 2 else [])


@contextlib.contextmanager
def model_on_worker(model: torch.nn.Module, pinned: bool) -> Iterator[None]:
    """Every call of the model's methods runs on a worker thread of its own while the calling
    thread waits for it; with ``pinned``, the worker on the first core this process may use
    and the calling thread on the second, for the duration. It tells whether the forward
    slows the host work after it by running on the host's own core. The hand-over to the
    worker and back is on the model's clock (``run_mix`` times the calls from outside)."""
    cores = sorted(os.sched_getaffinity(0)) if pinned else []
    allowed = set(cores)

    def start() -> None:
        if pinned:
            os.sched_setaffinity(0, {cores[0]})  # this thread's own affinity

    def wrap(method: Callable) -> Callable:
        def run(*args, **kwargs):
            with torch.inference_mode():  # per thread: the runner's does not reach the worker
                return method(*args, **kwargs)

        @functools.wraps(method)
        def call(*args, **kwargs):
            return worker.submit(run, *args, **kwargs).result()

        return call

    with ThreadPoolExecutor(1, initializer=start) as worker:
        worker.submit(int).result()  # started (and pinned) before the first call
        if pinned:
            os.sched_setaffinity(0, {cores[1]})
        try:
            with host_overhead.model_methods_wrapped(model, wrap):
                yield
        finally:
            if pinned:
                os.sched_setaffinity(0, allowed)


def measure(
    batch_size: int,
    rounds: int,
    warmup_steps: int,
    steps: int,
    seed: int = 0,
    gap_ms: float = GAP_MS,
) -> dict:
    """``rounds`` rounds at ``batch_size`` on the issue's mix, each running every kind once in
    a shuffled order (seeded by ``seed``): the median host time of each kind, the model's
    time a step of each (whatever stood in its place), and each replayed kind's own time.
    ``gap_ms``: how long ``spin`` and ``sleep`` last."""
    loaded = host_overhead.micro_model(0, "llada")
    kw = {"warmup_steps": warmup_steps, "steps": steps, "backend": "sdpa_buckets"}
    tape = host_overhead.ForwardTape()
    host_overhead.run_mix(loaded, batch_size, count=False, tape=tape, **kw)
    work = kinds(gap_ms)
    live = live_kinds()
    names = [*live, *work]
    runs: dict[str, list[float]] = {kind: [] for kind in names}
    model_ms: dict[str, list[float]] = {kind: [] for kind in names}  # model clock, a step
    orders = []
    shuffle = random.Random(seed)
    for _ in range(rounds):
        order = shuffle.sample(names, len(names))
        orders.append(order)
        for kind in order:
            if kind in live:
                on_worker = contextlib.nullcontext()
                if kind != "live":
                    on_worker = model_on_worker(loaded.model, pinned=kind == "worker-pinned")
                with on_worker:
                    run = host_overhead.run_mix(
                        loaded, batch_size, count=False, expect=tape.recorded, **kw
                    )
            else:
                tape.after_forward = work[kind]
                try:
                    run = host_overhead.run_mix(
                        loaded, batch_size, count=False, tape=tape, replay=True, **kw
                    )
                finally:  # run_mix checked the replay against the recording
                    tape.after_forward = None
            runs[kind].append(run.host_us_less_model_calls)
            model_ms[kind].append(1e3 * run.model_s / run.steps)
    medians = {kind: statistics.median(v) for kind, v in model_ms.items()}
    return {
        "batch_size": batch_size,
        "host_us_per_request_step": {kind: statistics.median(v) for kind, v in runs.items()},
        "host_us_per_request_step_runs": runs,
        # What each kind adds to a step's model time (its own time), against the plain replay.
        "work_ms_per_step": {k: v - medians["none"] for k, v in medians.items() if k in work},
        "model_ms_per_step": medians,
        "orders": orders,
        "gap_ms": gap_ms,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    host_overhead.add_run_arguments(p, rounds=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--gap-ms", type=float, default=GAP_MS, help="how long spin and sleep last (ms)")
    args = p.parse_args(argv)
    host_overhead.check_run_arguments(p, args)
    if not args.gap_ms > 0:
        p.error("--gap-ms: must be > 0")
    torch.set_num_threads(args.threads)
    result = measure(
        args.batch_size, args.rounds, args.warmup_steps, args.steps, gap_ms=args.gap_ms
    )
    medians = result["host_us_per_request_step"]
    print(f"B={args.batch_size}, issue's mix, median of {args.rounds} interleaved rounds")
    work, model = result["work_ms_per_step"], result["model_ms_per_step"]
    print(
        f"{'in the forward place':>22} {'host us/request-step':>21} {'vs none':>8} "
        f"{'its ms':>7} {'model ms':>9}"
    )
    for kind, value in medians.items():
        own = f"{work[kind]:>7.2f}" if kind in work else f"{'':>7}"
        print(
            f"{kind:>22} {value:>21.1f} {value / medians['none']:>7.2f}x {own} {model[kind]:>9.2f}"
        )
    print("its ms: the work's own time a step (model time less the plain replay's); model ms:")
    print("the time a step in the model's calls, whatever stood in them (the replay's copies,")
    print("the work, the forward and its hand-over to a worker); live, worker, worker-pinned:")
    print("the model's own forward (inline; on a worker thread; that thread pinned to another")
    print("core), host time less every call of the model")
    if args.out:
        write_json(args.out, {"machine": machine_info(), "rounds": args.rounds, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
