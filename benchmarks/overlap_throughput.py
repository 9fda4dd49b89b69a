"""What overlap buys in throughput on this CPU, against the serial engine with one and with
two torch threads (issue #24).

    python benchmarks/overlap_throughput.py --out benchmarks/results/overlap_throughput.json

``host_overhead.py --overlap`` reads the issue's measure (a step's period less its forward)
with every engine on one torch thread. An overlapped engine in ``"process"`` mode keeps two
cores busy (the model's process and this one), so the fair question is also whether it beats
the serial engine given both cores for its forward. Each round runs host_overhead.py's mix
(every pass holding B requests, the queue kept full, the first steps not measured) once per
kind, interleaved:

- ``serial-1``: ``Engine()``, one torch thread;
- ``serial-2``: ``Engine()``, two torch threads (its forward on both cores);
- ``thread``: ``Engine(overlap="thread")``, one torch thread;
- ``process``: ``Engine(overlap="process")``, one torch thread in each process;
- ``process-2``: ``Engine(overlap="process", forward_threads=2)``, one torch thread here
  and two in the model's process (the setup docs/guide.md recommends on a CPU).

Per kind: milliseconds a step (its period: start to the next step's start) and request-steps
a second (each a refinement of one request's canvas: every kind runs B a pass), and each
round's ratio against ``serial-1`` and ``serial-2``. ``--model``: the issue's micro model
(the forward nearly free, so the host work weighs most) and the shipped model (4 layers of
width 128: a forward that weighs more).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead

from foretell.bench.report import machine_info, model_info, write_json
from foretell.models.default import DEFAULT_MODEL_DIR
from foretell.models.registry import LoadedModel, load_model

# kind -> (overlap mode, torch threads in this process, torch threads of the model's process)
KINDS = {
    "serial-1": (None, 1, None),
    "serial-2": (None, 2, None),
    "thread": ("thread", 1, None),
    "process": ("process", 1, None),
    "process-2": ("process", 1, 2),
}
MODELS = ("micro", "default")
BACKEND = "sdpa_buckets"  # host_overhead.py's recorded runs' backend


def load(name: str) -> LoadedModel:
    if name == "micro":
        return host_overhead.micro_model(0, "llada")
    if name == "default":
        return load_model(DEFAULT_MODEL_DIR)
    raise ValueError(f"model: choose from {MODELS}, got {name!r}")


def run_kind(
    loaded: LoadedModel, kind: str, batch_size: int, warmup_steps: int, steps: int, seed: int
) -> dict:
    """One timed run of the mix in ``kind``: its period and forward a step."""
    overlap, threads, forward_threads = KINDS[kind]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = host_overhead.run_mix(
            loaded,
            batch_size,
            warmup_steps=warmup_steps,
            steps=steps,
            seed=seed,
            count=False,
            backend=BACKEND,
            overlap=overlap,
            forward_threads=forward_threads,
        )
    finally:
        torch.set_num_threads(before)
    if run.skipped_steps:
        raise RuntimeError(f"{kind}: {run.skipped_steps} measured steps held fewer than B")
    return {
        "period_ms_per_step": 1e3 * run.period_s / run.steps,
        "forward_ms_per_step": 1e3 * run.forward_s / run.steps,
        "request_steps_per_s": run.request_steps / run.period_s,
    }


def measure(
    loaded: LoadedModel, rounds: int, batch_size: int, warmup_steps: int, steps: int, seed: int
) -> dict:
    """``rounds`` interleaved rounds of every kind (the order turned each round)."""
    kinds = list(KINDS)
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for index in range(rounds):
        order = kinds[index % len(kinds) :] + kinds[: index % len(kinds)]
        for kind in order:
            runs[kind].append(run_kind(loaded, kind, batch_size, warmup_steps, steps, seed))
    summary = {}
    for kind in kinds:
        periods = [r["period_ms_per_step"] for r in runs[kind]]
        summary[kind] = {
            "period_ms_per_step": statistics.median(periods),
            "period_ms_per_step_runs": periods,
            "forward_ms_per_step": statistics.median(r["forward_ms_per_step"] for r in runs[kind]),
            "request_steps_per_s": statistics.median(r["request_steps_per_s"] for r in runs[kind]),
            # Each round's throughput against the serial engine's in the same round.
            "vs_serial_1_runs": [
                r["request_steps_per_s"] / s["request_steps_per_s"]
                for r, s in zip(runs[kind], runs["serial-1"], strict=True)
            ],
            "vs_serial_2_runs": [
                r["request_steps_per_s"] / s["request_steps_per_s"]
                for r, s in zip(runs[kind], runs["serial-2"], strict=True)
            ],
        }
    return summary


def format_table(model: str, batch_size: int, summary: dict) -> str:
    lines = [
        f"{model} model, B={batch_size}: medians of the rounds (ratios: each round against "
        "the serial engine in the same round)",
        f"{'kind':>9} {'ms/step':>8} {'fwd ms':>7} {'req-steps/s':>11} "
        f"{'vs serial-1':>11} {'vs serial-2':>11}",
    ]
    for kind, s in summary.items():
        lines.append(
            f"{kind:>9} {s['period_ms_per_step']:8.2f} {s['forward_ms_per_step']:7.2f} "
            f"{s['request_steps_per_s']:11.0f} {statistics.median(s['vs_serial_1_runs']):10.2f}x "
            f"{statistics.median(s['vs_serial_2_runs']):10.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="micro,default", help=f"comma-separated, of {MODELS}")
    host_overhead.add_run_arguments(p, rounds=3, warmup_steps=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    host_overhead.check_run_arguments(p, args)
    names = args.model.split(",")
    for name in names:
        if name not in MODELS:
            p.error(f"--model: choose from {MODELS}, got {name!r}")
    results = {}
    for name in names:
        loaded = load(name)
        print(f"{name}: {args.rounds} rounds of {', '.join(KINDS)}", file=sys.stderr, flush=True)
        summary = measure(
            loaded, args.rounds, args.batch_size, args.warmup_steps, args.steps, args.seed
        )
        print(format_table(name, args.batch_size, summary), flush=True)
        results[name] = {"summary": summary, "model": model_info(loaded.model, loaded.path)}
    if args.out:
        write_json(
            args.out,
            {
                "results": results,
                "batch_size": args.batch_size,
                "rounds": args.rounds,
                "warmup_steps": args.warmup_steps,
                "steps": args.steps,
                "kinds": {
                    k: {"overlap": o, "threads": t, "forward_threads": f}
                    for k, (o, t, f) in KINDS.items()
                },
                "machine": machine_info(),
                "command": "python benchmarks/overlap_throughput.py " + " ".join(sys.argv[1:]),
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
