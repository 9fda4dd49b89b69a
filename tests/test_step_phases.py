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


def test_replay_times_every_part_both_ways(phases, tmp_path) -> None:
    """``--replay``: each part's time live and with the model's outputs replayed, side by side
    in the table and the JSON; the replay ran the same steps (it checks its outputs)."""
    out = tmp_path / "phases.json"
    argv = ["--batch-sizes", "4", "--warmup-steps", "6", "--steps", "8", "--replay"]
    assert phases.main([*argv, "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    replayed = record["replayed"]
    assert set(replayed["phase_ms_per_step"]) == set(record["phase_ms_per_step"])
    assert 0 < replayed["host_ms_per_step"] < replayed["phase_ms_per_step"]["step"]
    assert len(replayed["host_ms_per_step_runs"]) == 1
    assert "live/replayed" in phases.format_report([record])


def test_a_replay_must_give_the_recorded_outputs(phases) -> None:
    """A replay whose outputs are not the recording's fails rather than report its times; so
    does recording on a tape that holds a run already."""
    import host_overhead

    kw = {"mix": "issue", "backend": "sdpa", "warmup_steps": 4, "steps": 6, "seed": 0}
    tape = host_overhead.ForwardTape()
    phases.measure(4, tape=tape, **kw)
    with pytest.raises(ValueError, match="empty tape"):
        phases.measure(4, tape=tape, **kw)
    assert phases.measure(4, tape=tape, replay=True, **kw)["measured_steps"] > 0
    finished, canvases = tape.recorded
    tape.recorded = ([*finished, ("never-finished", (), "steps")], canvases)
    with pytest.raises(RuntimeError, match="differ from the live"):
        phases.measure(4, tape=tape, replay=True, **kw)
