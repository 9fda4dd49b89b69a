"""Where an engine step's host time goes, part by part (issue #24).

    OMP_NUM_THREADS=1 python benchmarks/step_phases.py --batch-sizes 16,64 \
        --out benchmarks/results/step_phases.json

``host_overhead.py`` measures a step's host time (wall less the model's forward) and its ops
and reads; this script splits that time among the step's parts, on the same micro model and
request mixes: the scheduler, the packer, the batched step's construction, the pass's row
statistics, the batched step's planning (Prophet's gaps, the ranking) and the rest of its
advance, and the outputs. Each part is timed by wrapping its method for the run (a few tenths
of a microsecond a call), so the step runs in one process with no profiler: the numbers are
close to the uninstrumented ones, and two revisions can be compared part by part by running
this script with each one first on ``PYTHONPATH``. A part missing from a revision is reported
as such.

With ``--replay`` each run is made twice with the same steps: live, recording the model's
outputs, then with the model's outputs replayed from that recording (``host_overhead.py``'s
tape: no forward pass, so no gap between one step's host work and the next), which must give
the same outputs. Each part is then shown both ways: what a forward in the step does to each
part of the host work, those before it in the step as well as those after.

Times are inclusive: a part holds the parts it calls (``run`` holds ``pack``,
``BatchedStep.__init__`` and ``RowStats.of``, less the model's forward; ``advance`` holds
``_plan``, which holds ``_gaps`` and ``_reveal``). Only steps whose batch was full count.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead

from foretell.bench.report import machine_info, model_info, write_json

# (name, module, class, method): the step's parts, outermost first.
PHASES = (
    ("step", "foretell.engine.engine", "Engine", "step"),
    ("schedule", "foretell.scheduler.scheduler", "Scheduler", "schedule"),
    ("run (less forward)", "foretell.engine.runner", "ModelRunner", "run"),
    ("pack", "foretell.engine.packing", "Packer", "pack"),
    ("BatchedStep.__init__", "foretell.decoding.batched", "BatchedStep", "__init__"),
    ("RowStats.of", "foretell.decoding.unmask", "RowStats", "of"),
    ("advance", "foretell.decoding.batched", "BatchedStep", "advance"),
    ("_plan", "foretell.decoding.batched", "BatchedStep", "_plan"),
    ("_gaps", "foretell.decoding.batched", "BatchedStep", "_gaps"),
    ("_reveal", "foretell.decoding.batched", "BatchedStep", "_reveal"),
    ("update", "foretell.scheduler.scheduler", "Scheduler", "update"),
    ("output", "foretell.engine.engine", "Engine", "output"),
)
FORWARD_PHASE = "run (less forward)"


def _timed(func: Callable, name: str, seconds: Counter) -> Callable:
    @functools.wraps(func)
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start

    return call


@contextmanager
def timed_phases(seconds: Counter) -> Iterator[list[str]]:
    """Wrap every part of ``PHASES`` that this revision has (plain, class and static methods
    alike) for the duration; yields the names of the parts it lacks."""
    missing, restore = [], []
    for name, module_name, class_name, method in PHASES:
        cls = getattr(importlib.import_module(module_name), class_name, None)
        raw = None if cls is None else inspect.getattr_static(cls, method, None)
        if raw is None:
            missing.append(name)
            continue
        if isinstance(raw, classmethod | staticmethod):
            wrapped = type(raw)(_timed(raw.__func__, name, seconds))
        else:
            wrapped = _timed(raw, name, seconds)
        setattr(cls, method, wrapped)
        restore.append((cls, method, raw))
    try:
        yield missing
    finally:
        for cls, method, raw in reversed(restore):
            setattr(cls, method, raw)


def measure(
    batch_size: int,
    *,
    mix: str,
    backend: str,
    warmup_steps: int,
    steps: int,
    seed: int,
    tape: host_overhead.ForwardTape | None = None,
    replay: bool = False,
) -> dict:
    """One run of ``mix`` at ``batch_size``: each part's milliseconds per measured step.

    With a ``tape``, the model's outputs are recorded on it (an empty tape), or with
    ``replay`` answered from it. A replay must give the recording's outputs and canvases after
    every step, so that its times are known to be of the same steps; any request ending in an
    error fails the run (the engine would otherwise retry its pass and carry on). The host
    time takes out the forward pass only: model calls outside it (a cached commit's read-only
    rows, in the every-kind mixes) stay in the parts that make them, live or replayed."""
    if replay and tape is None:
        raise ValueError("measure: a replay needs a tape recorded by a live run")
    loaded = host_overhead.micro_model(seed, host_overhead.mix_family(mix))
    engine = host_overhead.make_engine(loaded, batch_size, backend)
    stream = host_overhead.mix_stream(loaded, seed, mix)
    seconds: Counter[str] = Counter()
    measured, forward, live = 0, 0.0, 0
    finished: list[tuple[str, tuple[int, ...], str | None]] = []
    canvases: list[int] = []
    taped = (
        contextlib.nullcontext()
        if tape is None
        else host_overhead.taped_model_calls(loaded.model, tape, replay)
    )
    with taped, timed_phases(seconds) as missing:
        for index in range(warmup_steps + steps):
            while live < 2 * batch_size:
                prompt, params = next(stream)
                engine.add_request(prompt, params)
                live += 1
            before = dict(seconds)
            forward0, steps0, seqs0 = host_overhead.engine_counters(engine)
            outputs = engine.step()
            forward1, steps1, seqs1 = host_overhead.engine_counters(engine)
            live -= len(outputs)
            done, canvas = host_overhead.step_results(engine, outputs)  # outside the parts
            finished += done
            canvases.append(canvas)
            full = steps1 - steps0 == 1 and seqs1 - seqs0 == batch_size
            if index < warmup_steps or not full:  # not counted: take its times back out
                seconds.clear()
                seconds.update(before)
                continue
            measured += 1
            forward += forward1 - forward0
    if not measured:
        raise RuntimeError(f"B={batch_size}: no measured step ran a full batch")
    if tape is not None:
        tape.settle(replay, batch_size, finished, canvases)
    ms = {name: 1e3 * seconds[name] / measured for name, *_ in PHASES if name not in missing}
    forward_ms = 1e3 * forward / measured
    if FORWARD_PHASE in ms:
        ms[FORWARD_PHASE] -= forward_ms
    host_ms = ms.get("step", float("nan")) - forward_ms
    return {
        "batch_size": batch_size,
        "measured_steps": measured,
        "host_ms_per_step": host_ms,
        "host_us_per_request_step": 1e3 * host_ms / batch_size,
        "forward_ms_per_step": forward_ms,
        "phase_ms_per_step": ms,
        "missing_phases": missing,
    }


def format_report(records: list[dict]) -> str:
    lines = []
    for r in records:
        b, host = r["batch_size"], r["host_ms_per_step"]
        lines.append(
            f"B={b}: host {host:.3f} ms a step = {r['host_us_per_request_step']:.1f} us a "
            f"request-step (forward {r['forward_ms_per_step']:.2f} ms, "
            f"{r['measured_steps']} steps)"
        )
        replayed = r.get("replayed")
        if replayed is not None:
            lines.append(
                f"  replayed: host {replayed['host_ms_per_step']:.3f} ms a step = "
                f"{replayed['host_us_per_request_step']:.1f} us a request-step "
                f"(live/replayed {r['live_over_replayed']:.2f}x)"
            )
            ratios = r.get("live_over_replayed_runs", [r["live_over_replayed"]])
            if len(ratios) > 1:
                shown = ", ".join(f"{x:.2f}x" for x in ratios)
                lines.append(f"  live/replayed of each run: {shown} (the median one below)")
        head = f"  {'part (inclusive)':<24} {'ms/step':>9} {'us/req-step':>12} {'of host':>8}"
        if replayed is not None:
            head += f" {'replayed ms':>12} {'live/replayed':>14}"
        lines.append(head)
        for name, value in r["phase_ms_per_step"].items():
            if name == "step":
                continue
            share = value / host if host > 0 else float("nan")
            line = f"  {name:<24} {value:>9.3f} {1e3 * value / b:>12.1f} {share:>8.0%}"
            if replayed is not None:
                again = replayed["phase_ms_per_step"][name]
                ratio = value / again if again > 0 else float("nan")
                line += f" {again:>12.3f} {ratio:>13.2f}x"
            lines.append(line)
        for name in r["missing_phases"]:
            lines.append(f"  {name:<24} {'(not in this revision)':>31}")
    return "\n".join(lines)


def measure_replayed(batch_size: int, **kw: Any) -> dict:
    """A live run (recorded) and the same steps replayed right after it: the live record with
    the replay's times under ``replayed`` and their ratio, so that a pair measured in the same
    minute stays together however many runs are made (the machine's speed drifts between
    runs more than within one)."""
    tape = host_overhead.ForwardTape()
    live = measure(batch_size, tape=tape, **kw)
    again = measure(batch_size, tape=tape, replay=True, **kw)
    keys = (
        "host_ms_per_step",
        "host_us_per_request_step",
        "phase_ms_per_step",
        "forward_ms_per_step",
        "measured_steps",
    )
    live["replayed"] = {key: again[key] for key in keys}
    live["live_over_replayed"] = live["host_ms_per_step"] / again["host_ms_per_step"]
    return live


def pick_record(runs: list[dict], replayed: bool) -> dict:
    """The run a table shows: the median one by host time, or with replays by the ratio of
    live to replayed host time (each run's pair); the record lists every run's times."""
    key = "live_over_replayed" if replayed else "host_ms_per_step"
    median = statistics.median(run[key] for run in runs)
    record = min(runs, key=lambda run: abs(run[key] - median))
    record["host_ms_per_step_runs"] = [run["host_ms_per_step"] for run in runs]
    if replayed:
        record["live_over_replayed_runs"] = [run["live_over_replayed"] for run in runs]
        record["runs"] = [
            {
                "host_ms_per_step": run["host_ms_per_step"],
                "phase_ms_per_step": run["phase_ms_per_step"],
                "replayed": run["replayed"],
            }
            for run in runs
        ]
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="16,64", help="comma-separated max_num_seqs values")
    p.add_argument("--warmup-steps", type=int, default=64, help="unmeasured steps first")
    p.add_argument("--steps", type=int, default=128, help="measured steps per run")
    p.add_argument("--repeats", type=int, default=1, help="runs per batch size (median kept)")
    p.add_argument("--seed", type=int, default=0, help="the mix's seed (and the model's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--attention-backend", default="sdpa_buckets", help="the engine's backend")
    p.add_argument("--mix", default="issue", choices=host_overhead.MIXES, help="the request mix")
    p.add_argument(
        "--replay",
        action="store_true",
        help="also replay each run's steps with the model's outputs recorded (no forward)",
    )
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []
    for size in (int(b) for b in args.batch_sizes.split(",")):
        measure_one = measure_replayed if args.replay else measure
        runs = [
            measure_one(
                size,
                mix=args.mix,
                backend=args.attention_backend,
                warmup_steps=args.warmup_steps,
                steps=args.steps,
                seed=args.seed,
            )
            for _ in range(args.repeats)
        ]
        records.append(pick_record(runs, args.replay))
    print(format_report(records))
    if args.out:
        loaded = host_overhead.micro_model(args.seed, host_overhead.mix_family(args.mix))
        write_json(
            args.out,
            {
                "records": records,
                "mix": args.mix,
                "attention_backend": args.attention_backend,
                "machine": machine_info(),
                "model": model_info(loaded.model, loaded.path),
                "command": "python benchmarks/step_phases.py " + " ".join(sys.argv[1:]),
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
