"""Throughput of two git revisions side by side, in one run (issue #24: "CPU throughput does not
regress").

    python benchmarks/compare_commits.py --a 0081468 --b 765c88f \\
        --out benchmarks/results/compare_commits_$(date +%F).json

Ratios between separate runs on this VM are not comparable (its speed drifts 10-30% from minute
to minute), so both revisions run here, alternating A B A B per workload, one process at a time,
one torch thread each; each row keeps its fastest run per revision. Each revision is checked out
as a detached worktree under ``--worktree-root`` (reused when already at that commit) and run
with ``PYTHONPATH=<worktree>`` and this script's Python: the dependencies are the same, only
foretell's code differs.

Workloads (``--workloads``):

- ``bench``: ``foretell bench --modes engine,engine-prophet`` on its default workload (the
  shipped model, 200 requests, B=32): the existing default engine modes.
- ``kv-cache``: the KV-cache workload of docs/benchmarks.md (``--model random --n 4
  --batch-size 4 --modes engine,engine-prophet --kv-cache none,prefix,dual --thresholds
  100,100,0.1``), with one thread instead of two.
- ``varied``: ``foretell bench --workload-preset varied`` (prompts 16-512 tokens, gen 64-256 in
  blocks of 32, a cache mode per request, Prophet on half), written once by *this* checkout and
  run in both revisions by a small driver (``drive`` below) over the engine's public API: the
  older revisions' workload files cannot carry a cache mode or Prophet per request.
- ``tight``: a cached workload (every request ``dual``; prompts 64-256, gen 256, blocks of 32)
  with room for 16 sequences but ``max_num_batched_tokens`` = 4 of its largest canvases: how
  many sequences a pass holds when cached steps are charged what they run, not their canvas.

Each revision's random model is built from the same seed; the driver reports a hash of its
weights and of every request's tokens, and the table says whether A and B agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("bench", "varied", "tight", "kv-cache")
# The KV-cache workload as docs/benchmarks.md runs it (its --threads 2 becomes --threads 1).
KV_CACHE_ARGS = [
    "--model",
    "random",
    "--n",
    "4",
    "--batch-size",
    "4",
    "--modes",
    "engine,engine-prophet",
    "--thresholds",
    "100,100,0.1",
]
BENCH_ARGS = ["--modes", "engine,engine-prophet"]
RANDOM_SHAPE = (256, 8)  # foretell bench's --model random default (the benchmark model)
VARIED_THRESHOLDS = (100.0, 100.0, 0.1)
VARIED_PROPHET_START = 32  # the start of the shortest generation's (64) last block
TIGHT_CANVASES = 4


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def checkout(rev: str, root: Path) -> tuple[str, Path]:
    """A detached worktree of ``rev`` under ``root`` (reused if it is already there and at
    ``rev``); returns the full commit hash and the path."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = root / commit[:12]
    if path.exists():
        if git("rev-parse", "HEAD", cwd=path) != commit:
            raise RuntimeError(f"{path} exists but is not at {commit}")
        if git("status", "--porcelain", "--untracked-files=no", cwd=path):
            raise RuntimeError(f"{path} has local changes")
        return commit, path
    root.mkdir(parents=True, exist_ok=True)
    git("worktree", "add", "--detach", str(path), commit)
    return commit, path


def run_process(tree: Path, argv: list[str], threads: int) -> tuple[float, str]:
    """Run ``argv`` with this Python and ``tree``'s foretell, one torch thread; returns its
    wall time and stderr (the benchmark's progress lines)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(
            f"{' '.join(argv)} in {tree} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return wall, proc.stderr


# --- one measurement, in the revision under test --------------------------------------------


def bench_rows(tree: Path, extra: list[str], threads: int, prefix: str) -> dict[str, dict]:
    """``foretell bench`` in ``tree``: one row per mode (and cache) of its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        argv = ["-m", "foretell", "bench", *extra, "--threads", str(threads), "--out", str(out)]
        run_process(tree, argv, threads)
        result = json.loads(out.read_text())
    rows = {}
    for name, rec in result["modes"].items():
        rows[f"{prefix}:{name}"] = {
            "tokens_per_s": rec["tokens_per_s"],
            "tokens_per_cpu_s": rec["tokens_per_cpu_s"],
            "wall_s": rec["wall_s"],
            "mean_batch_occupancy": rec["mean_batch_occupancy"],
            "mean_tokens_per_pass": rec["mean_tokens_per_pass"],
            "forward_passes_total": rec["forward_passes_total"],
            "generated_tokens": rec["generated_tokens"],
            "request_hash": rec["request_hash"],
            "load_average_after": rec.get("load_average_after"),
        }
    return rows


def driver_rows(tree: Path, spec: dict, threads: int, name: str) -> dict[str, dict]:
    """``drive`` in ``tree`` on ``spec``: one row."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({**spec, "threads": threads}))
        argv = [str(Path(__file__).resolve()), "drive", str(spec_path), str(out)]
        run_process(tree, argv, threads)
        rec = json.loads(out.read_text())
    if not Path(rec["foretell_file"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the driver imported {rec['foretell_file']}, not {tree}'s foretell")
    return {name: rec}


def drive(spec_path: str, out_path: str) -> None:
    """Run one workload file through the engine of whichever foretell is on PYTHONPATH, with
    only the public API both revisions share (Engine, DecodeParams, Prophet)."""
    import torch

    import foretell
    from foretell.bench.setup import random_llada
    from foretell.engine import Engine
    from foretell.models.registry import LoadedModel
    from foretell.params import DecodeParams, Prophet

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    loaded = random_llada(*spec["shape"], seed=0)
    weights = hashlib.sha256()
    for key, tensor in sorted(loaded.model.state_dict().items()):
        weights.update(key.encode() + tensor.detach().float().numpy().tobytes())
    prophet = Prophet(**spec["prophet"])
    prompts, params = [], []
    for line in Path(spec["workload"]).read_text().splitlines():
        rec = json.loads(line)
        fields = dict(rec["params"])
        fields["stop"] = tuple(fields["stop"])
        cache = rec.get("kv_cache")
        prompts.append(rec["prompt"])
        params.append(
            DecodeParams(
                **fields,
                kv_cache=None if cache in (None, "none") else cache,
                early_commit=prophet if rec.get("prophet") else None,
            )
        )

    def engine() -> Engine:
        model = LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, path=None)
        return Engine(
            model,
            max_num_seqs=spec["max_num_seqs"],
            max_num_batched_tokens=spec["max_num_batched_tokens"],
        )

    # Untimed warm-up, as foretell bench does: a few passes over the first batch, aborted.
    warm = engine()
    ids = [warm.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    for _ in range(3):
        warm.step()
    for rid in ids:
        warm.abort(rid)
    while warm.has_unfinished_requests():
        warm.step()

    timed = engine()
    start_cpu = time.process_time()
    start = time.perf_counter()
    outputs = timed.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    cpu = time.process_time() - start_cpu
    m = timed.metrics
    tokens = json.dumps([o.token_ids for o in outputs]).encode()
    result = {
        "tokens_per_s": m.generated_tokens / wall,
        "tokens_per_cpu_s": m.generated_tokens / cpu,
        "wall_s": wall,
        "mean_batch_occupancy": m.mean_batch_size,
        "mean_tokens_per_pass": m.tokens_in_passes / m.steps if m.steps else 0.0,
        "forward_passes_total": m.steps,
        "generated_tokens": m.generated_tokens,
        "finish_reasons": sorted({str(o.finish_reason) for o in outputs}),
        "committed_early": sum(bool(o.committed_early) for o in outputs),
        "tokens_sha256": hashlib.sha256(tokens).hexdigest(),
        "weights_sha256": weights.hexdigest(),
        "workload_sha256": hashlib.sha256(Path(spec["workload"]).read_bytes()).hexdigest(),
        "foretell_file": foretell.__file__,
        "load_average_after": os.getloadavg()[0],
    }
    Path(out_path).write_text(json.dumps(result))


# --- workloads -----------------------------------------------------------------------------


def write_varied(path: Path, n: int, seed: int) -> None:
    """The ``varied`` preset's requests, drawn by this checkout's foretell."""
    from foretell.bench.setup import load_for_bench
    from foretell.bench.workload import make_varied_workload, save_workload

    setup = load_for_bench("random", random_shape=(32, 1))  # only its tokenizer's ids are used
    save_workload(
        make_varied_workload(setup.base, n, seed=seed, prompt_vocab=setup.prompt_vocab), path
    )


def write_tight(path: Path, n: int, seed: int) -> int:
    """Every request dual-cached, the KV-cache workload's shape; returns its largest canvas."""
    import dataclasses

    from foretell.bench.setup import load_for_bench
    from foretell.bench.workload import make_workload, save_workload

    setup = load_for_bench("random", random_shape=(32, 1))
    requests = make_workload(
        setup.base,
        n,
        seed=seed,
        prompt_tokens=setup.prompt_tokens,
        prompt_vocab=setup.prompt_vocab,
    )
    save_workload([dataclasses.replace(r, kv_cache="dual") for r in requests], path)
    return max(len(r.prompt) + r.params.gen_length for r in requests)


def plan(args: argparse.Namespace, tmp: Path) -> list[tuple[str, dict]]:
    """(workload, how to run it) for each workload asked for."""
    out = []
    for name in args.workloads:
        if name == "bench":
            out.append((name, {"bench": BENCH_ARGS}))
        elif name == "kv-cache":
            out.append((name, {"bench": [*KV_CACHE_ARGS, "--kv-cache", args.kv_caches]}))
        elif name == "varied":
            path = tmp / "varied.jsonl"
            write_varied(path, args.varied_n, args.seed)
            prophet = {
                "answer_start": VARIED_PROPHET_START,
                "answer_length": 5,
                "thresholds": list(VARIED_THRESHOLDS),
            }
            spec = {
                "workload": str(path),
                "shape": list(args.random_shape),
                "prophet": prophet,
                "max_num_seqs": args.varied_max_num_seqs,
                "max_num_batched_tokens": 1 << 30,
            }
            out.append((name, {"drive": spec}))
        elif name == "tight":
            path = tmp / "tight.jsonl"
            canvas = write_tight(path, args.tight_n, args.seed)
            spec = {
                "workload": str(path),
                "shape": list(args.random_shape),
                "prophet": {},
                "max_num_seqs": args.tight_n,
                "max_num_batched_tokens": TIGHT_CANVASES * canvas,
            }
            out.append((name, {"drive": spec}))
    return out


def measure(tree: Path, how: dict, threads: int, name: str) -> dict[str, dict]:
    if "bench" in how:
        return bench_rows(tree, how["bench"], threads, name)
    return driver_rows(tree, how["drive"], threads, name)


def fastest(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per row, the run with the most tokens/s (background load only ever slows a run)."""
    best: dict[str, dict] = {}
    for rows in runs:
        for row, rec in rows.items():
            if row not in best or rec["tokens_per_s"] > best[row]["tokens_per_s"]:
                best[row] = dict(rec)
            best[row].setdefault("tokens_per_s_runs", [])
    for row in best:
        best[row]["tokens_per_s_runs"] = [r[row]["tokens_per_s"] for r in runs if row in r]
    return best


def format_table(rows: dict[str, dict]) -> str:
    head = (
        f"{'workload':<34}{'tok/s A':>10}{'tok/s B':>10}{'B/A':>7}{'B/A cpu':>8}"
        f"{'occup A':>9}{'occup B':>9}"
        f"{'tok/pass A':>11}{'tok/pass B':>11}  same tokens"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        a, b = r["a"], r["b"]
        same = r.get("same_tokens")
        lines.append(
            f"{name:<34}{a['tokens_per_s']:>10.1f}{b['tokens_per_s']:>10.1f}{r['ratio']:>7.3f}"
            f"{r.get('cpu_ratio', float('nan')):>8.3f}"
            f"{a['mean_batch_occupancy']:>9.2f}{b['mean_batch_occupancy']:>9.2f}"
            f"{a['mean_tokens_per_pass']:>11.1f}{b['mean_tokens_per_pass']:>11.1f}  "
            f"{'-' if same is None else ('yes' if same else 'no')}"
        )
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> dict:
    root = Path(args.worktree_root)
    args.harness_commit = git("rev-parse", "HEAD")  # the code that ran, not HEAD at the end
    (a_commit, a_tree), (b_commit, b_tree) = checkout(args.a, root), checkout(args.b, root)
    print(f"A {a_commit} {a_tree}\nB {b_commit} {b_tree}", file=sys.stderr, flush=True)
    rows: dict[str, dict] = {}
    log = []
    with tempfile.TemporaryDirectory() as tmp:
        workloads = plan(args, Path(tmp))
        for name, how in workloads:
            repeats = args.tight_repeats if name == "tight" else args.repeats
            runs: dict[str, list] = {"a": [], "b": []}
            for r in range(repeats):
                for side, tree in (("a", a_tree), ("b", b_tree)):
                    started = time.strftime("%H:%M:%S")
                    t0 = time.perf_counter()
                    got = measure(tree, how, args.threads, name)
                    runs[side].append(got)
                    took = time.perf_counter() - t0
                    log.append(
                        {
                            "workload": name,
                            "side": side,
                            "repeat": r,
                            "started": started,
                            "process_s": took,
                            "load_average": os.getloadavg()[0],
                        }
                    )
                    brief = ", ".join(f"{k} {v['tokens_per_s']:.1f}" for k, v in got.items())
                    print(
                        f"  {name} {side.upper()} run {r + 1}/{repeats} ({took:.0f} s): "
                        f"{brief} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
            best = {side: fastest(recs) for side, recs in runs.items()}
            for row in best["a"]:
                a, b = best["a"][row], best["b"][row]
                rec = {"a": a, "b": b, "ratio": b["tokens_per_s"] / a["tokens_per_s"]}
                if "tokens_per_cpu_s" in a:
                    # CPU time of the process: less moved by other load on a shared machine
                    # (each run's own best; kept next to the wall-time ratio, not instead).
                    cpu = {
                        side: max(got[row]["tokens_per_cpu_s"] for got in runs[side])
                        for side in ("a", "b")
                    }
                    rec["cpu_ratio"] = cpu["b"] / cpu["a"]
                if "tokens_sha256" in a:
                    rec["same_tokens"] = a["tokens_sha256"] == b["tokens_sha256"]
                    rec["same_weights"] = a["weights_sha256"] == b["weights_sha256"]
                    if a["workload_sha256"] != b["workload_sha256"]:
                        raise RuntimeError(f"{row}: A and B ran different workload files")
                    if not rec["same_weights"]:
                        raise RuntimeError(f"{row}: A and B built different random weights")
                elif a["request_hash"] != b["request_hash"]:
                    raise RuntimeError(f"{row}: A and B ran different requests")
                rows[row] = rec
            if args.out:  # what is measured so far, should a later workload fail
                partial = summary(args, (a_commit, b_commit), rows, dict(workloads), log)
                Path(args.out).write_text(json.dumps({**partial, "complete": False}, indent=2))
        return summary(args, (a_commit, b_commit), rows, dict(workloads), log)


def summary(
    args: argparse.Namespace,
    commits: tuple[str, str],
    rows: dict[str, dict],
    workload_specs: dict[str, dict],
    log: list[dict],
) -> dict:
    """The run's JSON record."""
    a_commit, b_commit = commits
    return {
        "a": {
            "rev": args.a,
            "commit": a_commit,
            "subject": git("log", "-1", "--format=%s", a_commit),
        },
        "b": {
            "rev": args.b,
            "commit": b_commit,
            "subject": git("log", "-1", "--format=%s", b_commit),
        },
        "harness_commit": args.harness_commit,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
        "regressions_over_5pct": [n for n, r in rows.items() if r["ratio"] < 0.95],
        "workloads": workload_specs,
        "processes": log,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": True,
    }


def _pair(text: str) -> tuple[int, int]:
    a, b = (int(v) for v in text.split(","))
    return a, b


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["drive"]:
        drive(*argv[1:3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", default="HEAD~1", help="the older revision (default HEAD~1)")
    p.add_argument("--b", default="HEAD", help="the newer revision (default HEAD)")
    p.add_argument(
        "--workloads",
        type=lambda t: [w for w in t.split(",") if w],
        default=list(WORKLOADS),
        help=f"comma-separated, from {','.join(WORKLOADS)} (default all)",
    )
    p.add_argument("--repeats", type=int, default=2, help="A B rounds per workload; fastest kept")
    p.add_argument("--tight-repeats", type=int, default=1, help="rounds of the tight workload")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--kv-caches", default="none,prefix,dual", help="kv-cache workload's caches")
    p.add_argument("--random-shape", type=_pair, default=RANDOM_SHAPE, help="varied and tight")
    p.add_argument("--varied-n", type=int, default=16)
    p.add_argument("--varied-max-num-seqs", type=int, default=8)
    p.add_argument("--tight-n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--worktree-root", default="/tmp/foretell-compare")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    result = compare(args)
    print(format_table(result["rows"]))
    if result["regressions_over_5pct"]:
        print(f"\nmore than 5% slower in B: {', '.join(result['regressions_over_5pct'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
