"""Throughput benchmarking: what continuous batching with early commit buys, side by side.

``foretell bench`` runs one seeded workload under five scheduling modes (batch-1 reference,
static batches with and without Prophet, the continuous-batching engine with and without
Prophet) through the same Engine code, so that only scheduling differs. See docs/benchmarks.md.

The submodules are imported lazily so that ``foretell --help`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MODES": "foretell.bench.run",
    "run_mode": "foretell.bench.run",
    "run_modes": "foretell.bench.run",
    "BenchRequest": "foretell.bench.workload",
    "make_workload": "foretell.bench.workload",
    "load_workload": "foretell.bench.workload",
    "save_workload": "foretell.bench.workload",
    "request_hash": "foretell.bench.workload",
    "run_scaling": "foretell.bench.scaling",
    "load_for_bench": "foretell.bench.setup",
}


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'foretell.bench' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
