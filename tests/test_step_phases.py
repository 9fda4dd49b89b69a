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
    in the table and the JSON; the replay ran the same steps without the forward."""
    out = tmp_path / "phases.json"
    argv = ["--batch-sizes", "4", "--warmup-steps", "6", "--steps", "8", "--replay"]
    assert phases.main([*argv, "--out", str(out)]) == 0
    (record,) = json.loads(out.read_text())["records"]
    replayed = record["replayed"]
    assert set(replayed["phase_ms_per_step"]) == set(record["phase_ms_per_step"])
    assert replayed["measured_steps"] == record["measured_steps"]
    assert 0 < replayed["forward_ms_per_step"] < 0.5 * record["forward_ms_per_step"]
    assert 0 < replayed["host_ms_per_step"] != record["host_ms_per_step"]
    ratio = record["host_ms_per_step"] / replayed["host_ms_per_step"]
    assert record["live_over_replayed"] == pytest.approx(ratio)
    assert record["live_over_replayed_runs"] == [record["live_over_replayed"]]
    assert "live/replayed" in phases.format_report([record])


def test_the_table_shows_the_run_of_median_ratio_with_its_own_replay(phases) -> None:
    """With repeats, the run shown is the one whose live/replayed ratio is the median, with the
    replay made right after it; every run's times are kept."""

    def run(live: float, replayed: float) -> dict:
        return {
            "host_ms_per_step": live,
            "phase_ms_per_step": {"step": live},
            "replayed": {"host_ms_per_step": replayed},
            "live_over_replayed": live / replayed,
        }

    runs = [run(3.0, 2.0), run(4.0, 2.0), run(2.0, 1.9)]  # ratios 1.5, 2.0, 1.05
    record = phases.pick_record(runs, replayed=True)
    assert record["host_ms_per_step"] == 3.0 and record["replayed"]["host_ms_per_step"] == 2.0
    assert record["live_over_replayed_runs"] == [1.5, 2.0, 2.0 / 1.9]
    assert [r["replayed"]["host_ms_per_step"] for r in record["runs"]] == [2.0, 2.0, 1.9]
    plain = phases.pick_record([run(3.0, 2.0), run(4.0, 2.0), run(2.0, 1.9)], replayed=False)
    assert plain["host_ms_per_step"] == 3.0 and "runs" not in plain


def test_a_replay_must_give_the_recorded_outputs(phases) -> None:
    """A replay of other model outputs than recorded fails rather than report its times, as do
    a replay without a recording and recording on a tape that holds a run already."""
    import host_overhead

    kw = {"mix": "issue", "backend": "sdpa", "warmup_steps": 4, "steps": 6, "seed": 0}
    with pytest.raises(ValueError, match="recorded by a live run"):
        phases.measure(4, tape=host_overhead.ForwardTape(), replay=True, **kw)
    tape = host_overhead.ForwardTape()
    phases.measure(4, tape=tape, **kw)
    with pytest.raises(ValueError, match="empty tape"):
        phases.measure(4, tape=tape, **kw)
    assert phases.measure(4, tape=tape, replay=True, **kw)["measured_steps"] > 0
    # The last step's gathered logits changed (a pass's second call, ``logits_at``): it reveals
    # other tokens, and nothing after it asks the model for anything, so only the check of the
    # canvases after every step can tell.
    assert [t.shape[-1] for t in tape.outputs[1::2]] == [51] * (len(tape.outputs) // 2)
    last = tape.outputs[-1]
    tape.outputs[-1] = -last
    with pytest.raises(RuntimeError, match="differ from the recorded"):
        phases.measure(4, tape=tape, replay=True, **kw)
    # An earlier one: the run goes its own way and fails (the recorded outputs no longer fit).
    tape.outputs[-1] = last
    tape.outputs[3] = -tape.outputs[3]
    with pytest.raises(RuntimeError, match="failed"):
        phases.measure(4, tape=tape, replay=True, **kw)
