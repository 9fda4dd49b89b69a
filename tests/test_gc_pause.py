"""``benchmarks/gc_pause.py``: a loaded server's full collection before and after its startup
heap is frozen (``run_server`` freezes it; the process test checks that it does)."""

from __future__ import annotations

import gc

from tests.benchmark_scripts import script_module


def test_freezing_the_startup_heap_leaves_full_collections_little_to_walk(tiny_checkpoint) -> None:
    with script_module("gc_pause") as bench:
        result = bench.measure(str(tiny_checkpoint), repeats=1)
    assert result["frozen_objects"] > 10_000  # the libraries, the model, the tokenizer
    assert result["tracked_after_freeze"] < result["tracked_objects"] // 100
    assert gc.get_freeze_count() == 0  # the script leaves this process's collector as it was
