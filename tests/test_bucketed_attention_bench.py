"""benchmarks/bucketed_attention.py: the sdpa_buckets call alone, timed and its ops counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import script_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    with script_module("bucketed_attention") as module:
        yield module


def test_it_times_counts_and_compares_against_another_revision(bench, tmp_path) -> None:
    """Against this revision's own file it finds the outputs bitwise equal; the JSON holds
    what the table prints, and every shape's ops per group."""
    out = tmp_path / "bucketed.json"
    against = str(ROOT / "foretell" / "models" / "attention.py")
    args = ["--shapes", "2x8x3,4x8x5", "--calls", "1", "--repeats", "2", "--against", against]
    records = bench.main([*args, "--out", str(out)])
    saved = json.loads(out.read_text())["records"]
    assert [r["sequences"] for r in records] == [3, 5]
    assert saved == records
    for rec in records:
        assert rec["bitwise_equal"] and rec["ms_per_call"] > 0 and rec["ratio"] > 0
        assert rec["ops_per_group"] * rec["groups"] == rec["ops_per_call"]
