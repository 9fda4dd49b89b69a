"""``foretell bench --replicas 1,2``: generated tokens/s of the same workload on R engine
replicas under Ray Data, side by side in one run, next to one engine in this process.

Every replica count runs the whole workload from a fresh actor pool, so its wall time includes
starting the replicas (loading the model) and Ray's per-batch costs; the single-process engine
on the same requests gives what the work costs without Ray, and so Ray's overhead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence

from foretell.bench.workload import BenchRequest, params_dict
from foretell.params import Prophet


def replica_rows(requests: Sequence[BenchRequest], prophet: Prophet | None) -> list[dict]:
    """The workload as dataset rows: every params field as JSON text, the policy included."""
    rows = []
    for i, req in enumerate(requests):
        fields = params_dict(req.params)
        fields["early_commit"] = None if prophet is None else dataclasses.asdict(prophet)
        rows.append({"index": i, "prompt": json.dumps(req.prompt), "params": json.dumps(fields)})
    return rows


def run_replicas(
    requests: Sequence[BenchRequest],
    replica_counts: Sequence[int],
    *,
    model: str | None,
    prophet: Prophet | None,
    batch_size: int,
    max_num_seqs: int,
    threads: int,
    dtype: str,
    forward_chunk_tokens: int | str | None,
    engine_baseline: bool = True,
) -> dict:
    """Run the workload on each replica count (and on one engine here); returns the numbers."""
    import ray
    import ray.data

    from foretell.distributed import generate_dataset
    from foretell.engine import Engine

    engine_kwargs = {
        "max_num_seqs": max_num_seqs,
        "dtype": dtype,
        "forward_chunk_tokens": forward_chunk_tokens,
    }
    rows = replica_rows(requests, prophet)
    blocks = max(1, math.ceil(len(rows) / batch_size))
    result: dict = {"runs": {}, "batch_size": batch_size, "blocks": blocks}

    expected = None
    if engine_baseline:
        engine = Engine(model, **engine_kwargs)
        plist = [
            req.params.replace(early_commit=prophet) for req in requests
        ]  # the same params the rows carry
        engine.generate([requests[0].prompt], [plist[0]], use_tqdm=False)  # warm-up
        cpu0, t0 = time.process_time(), time.perf_counter()
        outputs = engine.generate([r.prompt for r in requests], plist, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outputs if o.finish_reason != "error")
        expected = [o.token_ids for o in outputs]
        result["runs"]["engine"] = {
            "replicas": 0,
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu0,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "forward_passes": sum(o.num_forward_passes for o in outputs),
        }
        print(f"  engine (this process): {tokens / seconds:,.0f} tok/s", file=sys.stderr)
        del engine

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    result["ray_init_seconds"] = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for count in replica_counts:
            ds = ray.data.from_items(rows, override_num_blocks=blocks)
            out = generate_dataset(
                ds,
                model=model,
                replicas=count,
                batch_size=batch_size,
                engine_kwargs=engine_kwargs,
                threads=threads,
                json_prompts=True,
            )
            t0 = time.perf_counter()
            first, tokens, passes, seen, errors, same = None, 0, 0, set(), 0, 0
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
                if first is None:
                    first = time.perf_counter() - t0
                for row in batch.select(
                    ["index", "token_ids", "finish_reason", "num_forward_passes"]
                ).to_pylist():
                    seen.add(row["index"])
                    if expected is not None:
                        same += row["token_ids"] == expected[row["index"]]
                    errors += row["finish_reason"] == "error"
                    passes += row["num_forward_passes"]
                    if row["finish_reason"] != "error":
                        tokens += len(row["token_ids"])
            seconds = time.perf_counter() - t0
            if len(seen) != len(rows) or errors:
                raise RuntimeError(f"replicas={count}: {len(seen)} rows back, {errors} errors")
            result["runs"][f"ray-{count}"] = {
                "replicas": count,
                "seconds": seconds,
                "first_batch_seconds": first,
                "generated_tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "forward_passes": passes,
                # Up to float rounding between batch compositions (float32): a sanity check
                # that the replicas ran the same requests, not a parity test.
                "same_tokens_as_engine": None if expected is None else same,
            }
            print(f"  {count} replica(s): {tokens / seconds:,.0f} tok/s", file=sys.stderr)
    finally:
        ray.shutdown()
    return result


def format_replicas(result: dict) -> str:
    """The table: tokens/s per run, and each against one replica and against the engine."""
    runs = result["runs"]
    one = next((r for r in runs.values() if r["replicas"] == 1), None)
    engine = runs.get("engine")
    lines = [
        f"{'run':<10} {'replicas':>8} {'seconds':>8} {'first batch s':>13} {'tok/s':>9} "
        f"{'x 1 replica':>11} {'x engine':>9} {'same tokens':>11}"
    ]
    for name, r in runs.items():
        first = r.get("first_batch_seconds")
        vs_one = r["tokens_per_s"] / one["tokens_per_s"] if one else float("nan")
        vs_engine = r["tokens_per_s"] / engine["tokens_per_s"] if engine else float("nan")
        lines.append(
            f"{name:<10} {r['replicas']:>8} {r['seconds']:>8.1f} "
            f"{'-' if first is None else f'{first:.1f}':>13} {r['tokens_per_s']:>9,.0f} "
            f"{vs_one:>10.2f}x {vs_engine:>8.2f}x {r.get('same_tokens_as_engine', '-')!s:>11}"
        )
    lines.append(
        f"ray.init: {result['ray_init_seconds']:.1f}s; {result['blocks']} batches of "
        f"{result['batch_size']} rows"
    )
    return "\n".join(lines)
