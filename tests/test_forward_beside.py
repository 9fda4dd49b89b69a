"""benchmarks/forward_beside.py: a step's host work with a model pass beside it (issue #24)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.benchmark_scripts import script_module

SMALL = 4


@pytest.fixture(scope="module")
def beside():
    with script_module("forward_beside") as module:
        yield module


@pytest.fixture(scope="module")
def micro(beside):
    return beside.host_overhead.micro_model(0, "llada")


@pytest.fixture(scope="module")
def work(beside, micro):
    return beside.model_pass(micro)


def test_every_kind_runs_beside_the_recorded_steps(beside, tmp_path) -> None:
    """Each kind replays the recorded steps (``run_mix`` fails a replay that does not give
    the recording back) with one pass a step where it runs one; the JSON holds the table's
    medians and every run."""
    out = tmp_path / "beside.json"
    argv = ["--batch-size", str(SMALL), "--rounds", "1", "--warmup-steps", "2", "--steps", "3"]
    assert beside.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    medians = result["medians"]
    assert set(medians) == set(beside.KINDS) and result["batch_size"] == SMALL
    assert sorted(result["orders"][0]) == sorted(beside.KINDS)
    assert medians["none"]["pass_ms"] == 0 and medians["none"]["pass_alone_ms"] == 0
    for kind in ("serial", "thread", "process"):
        assert medians[kind]["pass_ms"] > 0 and medians[kind]["pass_alone_ms"] > 0
    for m in medians.values():
        assert m["wall_ms_per_step"] > 0 and m["host_us_per_request_step"] > 0
    # Serially, the wall is the host work and the pass: wall less pass is the host work.
    serial = medians["serial"]
    assert serial["wall_less_pass_us_per_request_step"] == pytest.approx(
        1e3 * (serial["wall_ms_per_step"] - serial["pass_ms"]) / SMALL
    )
    assert all(len(runs) == 1 for runs in result["runs"].values())


def test_one_pass_starts_at_each_steps_first_forward(beside, micro) -> None:
    """A pass starts at a step's first forward and finishes at the next step's, one a step
    whatever the forwards of a commit's read-only rows; the step flag is the engine's own
    method again afterwards."""
    from foretell.engine.engine import Engine

    tape = beside.host_overhead.ForwardTape()
    beside.host_overhead.run_mix(
        micro, SMALL, warmup_steps=2, steps=3, count=False, tape=tape, backend=beside.BACKEND
    )
    forwards = []
    calls = []

    def counted() -> None:
        calls.append(len(forwards))
        time.sleep(0.001)

    original_after = tape.after_forward
    step = Engine.step
    inline = beside.PassInline(counted)
    # Every forward_packed of the replay, the step's first and a commit's others alike.
    tape.after_forward = lambda: forwards.append(1)
    run = beside.host_overhead.run_mix(
        micro, SMALL, warmup_steps=2, steps=3, count=False, tape=tape, replay=True
    )
    tape.after_forward = original_after
    result = beside.replay_beside(micro, tape, SMALL, inline, warmup_steps=2, steps=3)
    assert Engine.step is step
    assert len(calls) == 5 + 1 + beside.ALONE_CALLS  # a pass a step, and the timed alone ones
    assert len(forwards) >= 5 and run.steps == 3
    assert result["pass_ms"] >= 1.0  # each measured step's pass slept 1 ms


def test_step_starts_raises_a_flag_at_each_step(micro, beside) -> None:
    """The flag is up at each step's first forward and only there (a commit's read-only
    forwards find it lowered), and the engine's own method is back afterwards."""
    from foretell.engine.engine import Engine

    original = Engine.step
    tape = beside.host_overhead.ForwardTape()
    kw = {"warmup_steps": 1, "steps": 4, "count": False, "backend": beside.BACKEND}
    beside.host_overhead.run_mix(micro, SMALL, tape=tape, **kw)
    seen = []
    with beside.step_starts() as flag:
        assert Engine.step is not original

        def at_forward() -> None:
            seen.append(flag[0])
            flag[0] = False

        tape.after_forward = at_forward
        try:
            beside.host_overhead.run_mix(micro, SMALL, tape=tape, replay=True, **kw)
        finally:
            tape.after_forward = None
    assert Engine.step is original
    assert sum(seen) == 5 and seen[0]  # one a step


def test_a_pass_on_a_thread_runs_off_the_callers_thread_and_raises_its_failure(
    beside, work
) -> None:
    where = []

    def traced() -> None:
        where.append(threading.get_ident())
        work()

    pass_thread = beside.PassThread(traced)
    try:
        pass_thread.start()
        assert pass_thread.finish() > 0
        assert where and threading.get_ident() not in where
    finally:
        pass_thread.close()

    def broken() -> None:
        raise ValueError("no pass")

    pass_thread = beside.PassThread(broken)
    try:
        pass_thread.start()
        with pytest.raises(ValueError, match="no pass"):
            pass_thread.finish()
    finally:
        pass_thread.close()


def test_a_pass_in_a_process_of_its_own_gives_this_processs_logits(beside, work) -> None:
    """The other process runs the same pass (its logits' checksum is this process's), times
    it alone and once when told, and ends by itself when its input ends."""
    expect = beside.checksum(work())
    pass_process = beside.PassProcess(expect, threads=1)
    try:
        assert pass_process.alone(calls=2) > 0
        pass_process.start()
        assert pass_process.finish() > 0
    finally:
        pass_process.close()
    assert pass_process.process.returncode == 0  # it ended with its input, not killed
    with pytest.raises(RuntimeError, match=r"checksum is [0-9a-f]{8}, not 00000000"):
        beside.PassProcess("00000000", threads=1)


def test_a_pass_process_that_fails_or_stalls_raises_with_its_error(beside, work) -> None:
    expect = beside.checksum(work())
    with pytest.raises(RuntimeError, match="set_num_threads expects a positive integer"):
        beside.PassProcess(expect, threads=0)  # it fails before it is ready
    pass_process = beside.PassProcess(expect, threads=1)
    try:
        pass_process._send("explode")
        with pytest.raises(RuntimeError, match="unknown command 'explode'"):
            pass_process.finish()
        assert pass_process.process.returncode is not None
    finally:
        pass_process.close()
    pass_process = beside.PassProcess(expect, threads=1)
    try:
        pass_process.timeout_s = 0.5
        pass_process._send("alone 100000")  # minutes of passes
        with pytest.raises(RuntimeError, match=r"no answer in 0\.5 s"):
            pass_process.finish()
        assert pass_process.process.returncode is not None  # killed
    finally:
        pass_process.close()
