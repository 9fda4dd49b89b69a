"""A full garbage collection in a loaded server process, before and after the startup heap
is frozen (``foretell.server.app.freeze_startup_heap``, which ``run_server`` calls before it
serves, and undoes when it returns).

    OMP_NUM_THREADS=1 python benchmarks/gc_pause.py --out benchmarks/results/gc_pause.json

A full collection walks every object the process tracks, and the engine's step waits for it:
every request in flight stalls that long. This loads what ``run_server`` loads (an
``AsyncEngine`` over the model, its FastAPI app), times ``--repeats`` full collections, freezes
the startup heap, and times them again. The engine's thread is started, idle, as in a server;
it is shut down at the end. What a server makes after it starts serving (uvicorn's protocol
state, the event loop, each request's objects) stays tracked as usual: a full collection
costs more than the frozen figure once it has served.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time

import torch

from foretell.bench.report import machine_info, write_json


def full_collections_ms(repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def measure(model: str | None, repeats: int) -> dict:
    from foretell.engine.async_engine import AsyncEngine
    from foretell.server.app import create_app, freeze_startup_heap

    if gc.get_freeze_count():
        raise RuntimeError("gc_pause: this process has frozen objects already")
    engine = AsyncEngine(model)
    try:
        create_app(engine, "gc-pause")
        tracked = len(gc.get_objects())
        before = full_collections_ms(repeats)
        frozen = freeze_startup_heap()
        after = full_collections_ms(repeats)
        left = len(gc.get_objects())
    finally:
        gc.unfreeze()
        asyncio.run(engine.shutdown())
    return {
        "tracked_objects": tracked,
        "frozen_objects": frozen,
        "tracked_after_freeze": left,
        "full_collection_ms": statistics.median(before),
        "full_collection_ms_runs": before,
        "full_collection_ms_after_freeze": statistics.median(after),
        "full_collection_ms_after_freeze_runs": after,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--repeats", type=int, default=5, help="full collections timed each way")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats: must be >= 1")
    torch.set_num_threads(args.threads)
    result = measure(args.model, args.repeats)
    print(f"{'':>22} {'tracked objects':>16} {'full collection ms (median)':>28}")
    print(f"{'loaded':>22} {result['tracked_objects']:>16,} {result['full_collection_ms']:>28.1f}")
    print(
        f"{'startup heap frozen':>22} {result['tracked_after_freeze']:>16,} "
        f"{result['full_collection_ms_after_freeze']:>28.2f}"
    )
    if args.out:
        write_json(args.out, {"machine": machine_info(), "model": args.model, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
