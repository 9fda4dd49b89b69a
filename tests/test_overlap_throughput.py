"""benchmarks/overlap_throughput.py: overlap's throughput against the serial engine on one and
two torch threads (issue #24)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.benchmark_scripts import script_module


@pytest.fixture(scope="module")
def throughput():
    with script_module("overlap_throughput") as module:
        yield module


def test_every_kind_runs_the_mix_in_its_setup_and_is_compared_round_by_round(
    throughput, tmp_path, monkeypatch
) -> None:
    """Each kind's engine is built in its own setup (overlap mode, torch threads here and in
    the model's process), which is undone after; every run holds B requests a pass; the JSON
    holds every run and each round's ratio against the serial engines of the same round."""
    built = []
    make_engine = throughput.host_overhead.make_engine

    def recorded(loaded, batch_size, backend="auto", overlap=None, forward_threads=None):
        engine = make_engine(loaded, batch_size, backend, overlap, forward_threads)
        process = engine._forward_process
        threads = None if process is None else process.process_threads
        built.append((engine.overlap, torch.get_num_threads(), threads))
        return engine

    monkeypatch.setattr(throughput.host_overhead, "make_engine", recorded)
    before = torch.get_num_threads()
    out = tmp_path / "throughput.json"
    argv = ["--model", "micro", "--batch-size", "4", "--rounds", "2"]
    argv += ["--warmup-steps", "3", "--steps", "4", "--out", str(out)]
    assert throughput.main(argv) == 0
    assert torch.get_num_threads() == before
    assert set(built) == {
        (None, 1, None),
        (None, 2, None),
        ("thread", 1, None),
        ("process", 1, 1),
        ("process", 1, 2),
    }
    result = json.loads(out.read_text())
    summary = result["results"]["micro"]["summary"]
    assert set(summary) == set(throughput.KINDS)
    for s in summary.values():
        assert len(s["period_ms_per_step_runs"]) == 2 and s["request_steps_per_s"] > 0
        assert s["forward_ms_per_step"] > 0
    # A round's ratio is that round's throughput against each serial engine's in the same
    # round (every run holds B requests a pass for the same steps: the inverse of its
    # period's ratio).
    for s in summary.values():
        for serial, key in (("serial-1", "vs_serial_1_runs"), ("serial-2", "vs_serial_2_runs")):
            periods = summary[serial]["period_ms_per_step_runs"]
            expected = [p / q for p, q in zip(periods, s["period_ms_per_step_runs"], strict=True)]
            assert s[key] == pytest.approx(expected)


def test_an_unknown_model_is_refused(throughput) -> None:
    with pytest.raises(SystemExit):
        throughput.main(["--model", "large"])
    with pytest.raises(ValueError, match="model: choose from"):
        throughput.load("large")
