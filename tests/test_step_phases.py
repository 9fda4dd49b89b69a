"""benchmarks/step_phases.py: a step's host time split among its parts (issue #24)."""

from __future__ import annotations

import json

import pytest

from tests.benchmark_scripts import script_module


@pytest.fixture(scope="module")
def phases():
    with script_module("step_phases") as module:
        yield module


def test_parts_nest_within_the_host_time_and_are_unwrapped_after(phases, tmp_path) -> None:
    """Every part of this revision is timed (none missing); nested parts never exceed the
    parts that call them, nor the step's host time; the methods are the engine's own again
    afterwards; the JSON holds what the table prints."""
    from foretell.decoding.batched import BatchedStep
    from foretell.decoding.unmask import RowStats

    own = (BatchedStep._plan, RowStats.__dict__["of"])
    out = tmp_path / "phases.json"
    argv = ["--batch-sizes", "4", "--warmup-steps", "6", "--steps", "8", "--out", str(out)]
    assert phases.main(argv) == 0
    (record,) = json.loads(out.read_text())["records"]
    assert record["missing_phases"] == [] and record["measured_steps"] > 0
    ms = record["phase_ms_per_step"]
    assert set(ms) == {name for name, *_ in phases.PHASES}
    host = record["host_ms_per_step"]
    assert 0 < host < ms["step"]
    assert ms["pack"] + ms["BatchedStep.__init__"] + ms["RowStats.of"] <= ms["run (less forward)"]
    assert ms["_gaps"] + ms["_reveal"] <= ms["_plan"] <= ms["advance"]
    parts = ms["schedule"] + ms["run (less forward)"] + ms["advance"] + ms["update"]
    assert parts <= host
    assert (BatchedStep._plan, RowStats.__dict__["of"]) == own


def test_a_part_missing_from_a_revision_is_reported(phases, monkeypatch) -> None:
    """Comparing revisions: a part an older revision lacks is listed, not a failure."""
    monkeypatch.setattr(
        phases, "PHASES", (*phases.PHASES, ("gone", "foretell.engine.engine", "Engine", "gone"))
    )
    record = phases.measure(4, mix="issue", backend="sdpa", warmup_steps=4, steps=6, seed=0)
    assert record["missing_phases"] == ["gone"]
    assert "gone" in phases.format_report([record])
