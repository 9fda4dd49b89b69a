"""Engine overhead: the share of wall time spent outside the model's forward pass, and where.

    python benchmarks/overhead.py --batch-size 32 --out benchmarks/results/overhead.json

Runs the ``engine`` and ``engine-prophet`` modes of ``foretell bench`` on the default model's
workload and splits each run's wall time into buckets by wrapping (at run time, not in the
source) the engine's own functions with timers: the scheduler, the runner's packing around the
forward pass, the per-request decoding step (``advance``), the batched step for all
greedy LLaDA requests at once (``BatchedStep.advance``), building the outputs (detokenising),
and the ``generate`` loop around ``step()``. ``--profile`` adds a cProfile of the engine-prophet
run: top functions by own time, then the engine's own Python (decoding, scheduler, runner,
engine) by cumulative time, so that the time outside the forward pass can be traced to lines.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import foretell.decoding.batched as batched_module
import foretell.engine.engine as engine_module
import foretell.engine.runner as runner_module
from foretell.bench.report import machine_info, model_info, write_json
from foretell.bench.run import mode_params, share_model, warm_up
from foretell.bench.setup import add_setup_args, setup_from_args


class Buckets:
    """Accumulated seconds per named bucket."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


@contextmanager
def instrumented(engine, buckets: Buckets):
    """Time the engine's parts without editing its source: instance attributes for the
    engine's and scheduler's methods, class attributes for the batched step's, module globals
    for the functions the engine and runner call by name."""
    saved = {
        "advance": engine_module.advance,
        "positions_needed": runner_module.positions_needed,
        "greedy": batched_module.BatchedStep.advance,
        "greedy_init": batched_module.BatchedStep.__init__,
    }
    batched_module.BatchedStep.__init__ = buckets.wrap(
        "runner: batched step geometry", saved["greedy_init"]
    )
    batched_module.BatchedStep.advance = buckets.wrap(
        "decode: batched step (all greedy requests at once)", saved["greedy"]
    )
    engine_module.advance = buckets.wrap("decode: advance (per request)", saved["advance"])
    runner_module.positions_needed = buckets.wrap(
        "runner: positions_needed (per request)", saved["positions_needed"]
    )
    sched = engine.scheduler
    sched.schedule = buckets.wrap("scheduler: schedule", sched.schedule)
    sched.update = buckets.wrap("scheduler: update (evict)", sched.update)
    engine.runner.run = buckets.wrap("runner: run (incl. forward)", engine.runner.run)
    engine.output = buckets.wrap("outputs: RequestOutput + detokenise", engine.output)
    engine.step = buckets.wrap("engine: step (total)", engine.step)
    try:
        yield
    finally:
        engine_module.advance = saved["advance"]
        runner_module.positions_needed = saved["positions_needed"]
        batched_module.BatchedStep.advance = saved["greedy"]
        batched_module.BatchedStep.__init__ = saved["greedy_init"]


def breakdown(engine, buckets: Buckets, wall: float) -> list[dict]:
    """Disjoint buckets that add up to the wall time."""
    s = buckets.seconds
    forward = engine.runner.forward_seconds
    run = s["runner: run (incl. forward)"]
    needed = s["runner: positions_needed (per request)"]
    geometry = s["runner: batched step geometry"]
    step = s["engine: step (total)"]
    rows = [
        ("model forward pass (forward_packed + logits_at)", forward),
        ("runner: packing, gathering, splitting", run - forward - needed - geometry),
        ("runner: positions_needed (per request)", needed),
        ("runner: batched step geometry", geometry),
        ("decode: advance (per request)", s["decode: advance (per request)"]),
        (
            "decode: batched step (all greedy requests at once)",
            s["decode: batched step (all greedy requests at once)"],
        ),
        ("scheduler: schedule", s["scheduler: schedule"]),
        ("scheduler: update (evict)", s["scheduler: update (evict)"]),
        ("outputs: RequestOutput + detokenise", s["outputs: RequestOutput + detokenise"]),
    ]
    inside = sum(v for _, v in rows)
    rows.append(("engine.step: the rest (metrics, loop)", step - inside))
    rows.append(("generate(): outside step (admission, tokenising, loop)", wall - step))
    return [
        {"bucket": name, "seconds": sec, "share": sec / wall, "calls": buckets.calls.get(name)}
        for name, sec in rows
    ]


def run_one(loaded, requests, mode: str, batch_size: int, prophet, profile: bool) -> dict:
    engine = share_model(loaded, batch_size, dtype="float32")
    params = mode_params(requests, mode, prophet)
    prompts = [r.prompt for r in requests]
    buckets = Buckets()
    profiler = cProfile.Profile() if profile else None
    with instrumented(engine, buckets):
        start = time.perf_counter()
        cpu = time.process_time()
        if profiler is not None:
            profiler.enable()
        outputs = engine.generate(prompts, params, use_tqdm=False)
        if profiler is not None:
            profiler.disable()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
    m = engine.metrics
    rec = {
        "mode": mode,
        "batch_size": batch_size,
        "n": len(outputs),
        "wall_s": wall,
        "cpu_s": cpu,
        "forward_s": engine.runner.forward_seconds,
        "overhead_share": 1 - engine.runner.forward_seconds / wall,
        "steps": m.steps,
        "mean_batch_occupancy": m.mean_batch_size,
        "request_steps": m.sequences_in_passes,
        "overhead_us_per_request_step": 1e6
        * (wall - engine.runner.forward_seconds)
        / max(1, m.sequences_in_passes),
        "forward_ms_per_pass": 1e3 * engine.runner.forward_seconds / max(1, m.steps),
        "breakdown": breakdown(engine, buckets, wall),
    }
    if profiler is not None:
        rec["profile"] = profile_text(profiler)
    return rec


def profile_text(profiler: cProfile.Profile, limit: int = 30) -> str:
    """Top functions by own time, then the engine's own code (not the model) by cumulative
    time: the model's forward is the work, the rest is the overhead to explain."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    out.write("=== all functions, by own time ===\n")
    stats.sort_stats("tottime").print_stats(limit)
    out.write("=== foretell's engine code (decoding, scheduler, runner, engine), cumulative ===\n")
    stats.sort_stats("cumulative").print_stats(r"foretell/(decoding|scheduler|engine)/", limit)
    return out.getvalue()


def format_report(records: list[dict]) -> str:
    lines = []
    for rec in records:
        lines.append(
            f"{rec['mode']} at max_num_seqs={rec['batch_size']}: {rec['n']} requests in "
            f"{rec['wall_s']:.1f} s, {rec['steps']} forward passes, occupancy "
            f"{rec['mean_batch_occupancy']:.1f}, forward {rec['forward_ms_per_pass']:.1f} ms/pass"
        )
        lines.append(
            f"  overhead (outside the forward pass): {100 * rec['overhead_share']:.1f}% of wall, "
            f"{rec['overhead_us_per_request_step']:.0f} us per request-step"
        )
        for row in rec["breakdown"]:
            lines.append(
                f"    {row['bucket']:<58} {row['seconds']:8.2f} s {100 * row['share']:6.1f}%"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_args(p)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default="engine,engine-prophet")
    p.add_argument("--profile", help="write the cProfile report (engine-prophet) here")
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    setup, prophet = setup_from_args(args)
    requests = setup.workload(args.n, args.seed)
    warm_up(setup.loaded, requests, args.batch_size)
    records = []
    for mode in args.modes.split(","):
        profile = bool(args.profile) and mode == "engine-prophet"
        records.append(run_one(setup.loaded, requests, mode, args.batch_size, prophet, False))
        if profile:  # a separate, profiled run: cProfile inflates Python time
            prof = run_one(setup.loaded, requests, mode, args.batch_size, prophet, True)
            Path(args.profile).write_text(prof.pop("profile"))
            records[-1]["profiled_run"] = prof
            print(f"wrote {args.profile}", file=sys.stderr)
    print(format_report(records))
    if args.out:
        result = {
            "records": records,
            "prophet": dataclasses.asdict(prophet),
            "machine": machine_info(),
            "model": {"name": setup.name, **model_info(setup.loaded.model, setup.loaded.path)},
            "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
        }
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
