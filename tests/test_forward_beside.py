"""benchmarks/forward_beside.py: a step's host work with a model pass beside it (issue #24)."""

from __future__ import annotations

import json
import threading

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
    medians, every run and each overlapped kind's saving against ``serial``, round by round."""
    out = tmp_path / "beside.json"
    argv = ["--batch-size", str(SMALL), "--rounds", "2", "--warmup-steps", "2", "--steps", "3"]
    assert beside.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    medians = result["medians"]
    assert set(medians) == set(beside.KINDS) and result["batch_size"] == SMALL
    assert all(sorted(order) == sorted(beside.KINDS) for order in result["orders"])
    assert medians["none"]["pass_ms"] == 0 and medians["none"]["pass_alone_ms"] == 0
    for kind in ("serial", "thread", "process"):
        assert medians[kind]["pass_ms"] > 0 and medians[kind]["pass_alone_ms"] > 0
    for run in (run for runs in result["runs"].values() for run in runs):
        # A step's period takes in its wall time and the caller's work after it.
        assert run["period_ms_per_step"] > 0 and run["wall_ms_per_step"] > 0
        assert run["host_us_per_request_step"] > 0
    for serial in result["runs"]["serial"]:
        # Serially the pass is in the model's calls, which the host work leaves out.
        assert serial["wall_less_pass_us_per_request_step"] >= serial["host_us_per_request_step"]
    saved = result["period_saved_ms_per_step_runs"]
    assert set(saved) == {"thread", "process"} and all(len(v) == 2 for v in saved.values())
    for kind, values in saved.items():
        pairs = zip(result["runs"]["serial"], result["runs"][kind], strict=True)
        expect = [s["period_ms_per_step"] - k["period_ms_per_step"] for s, k in pairs]
        assert values == pytest.approx(expect)


class CountingPass:
    """A stand-in pass whose "seconds" are the index of the step that started it."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.started: list[int] = []
        self.fail_at: int | None = None

    def alone(self, calls: int = 5) -> float:
        return 1.0

    def start(self) -> None:
        if self.fail_at == len(self.started):
            raise ValueError("pass broke")
        self.started.append(len(self.clock.starts) - 1)

    def finish(self) -> float:
        return float(self.started[-1])

    def close(self) -> None:
        pass


def test_a_pass_starts_at_each_steps_first_forward_only(beside) -> None:
    """``PassSchedule``: a step's first forward finishes the pass started at the previous
    step's and starts one; a commit's read-only forwards in the same step start none; a
    pass's failure is kept, stops the passes, and is raised when the run settles."""
    clock = beside.StepClock()
    counting = CountingPass(clock)
    schedule = beside.PassSchedule(counting, clock)
    for step in range(4):
        clock.starts.append(float(step))
        clock.new_step = True
        schedule.at_forward()
        schedule.at_forward()  # a read-only forward of the same step
    schedule.settle()
    assert counting.started == [0, 1, 2, 3] and schedule.seconds == [0.0, 1.0, 2.0, 3.0]

    clock = beside.StepClock()
    counting = CountingPass(clock)
    counting.fail_at = 2
    schedule = beside.PassSchedule(counting, clock)
    for step in range(4):
        clock.starts.append(float(step))
        clock.new_step = True
        schedule.at_forward()  # the failure is not raised into the engine's forward
    assert counting.started == [0, 1] and schedule.seconds == [0.0, 1.0]
    with pytest.raises(RuntimeError, match="pass beside the steps failed") as info:
        schedule.settle()
    assert isinstance(info.value.__cause__, ValueError)


def test_the_step_clock_marks_each_step_and_is_undone(micro, beside) -> None:
    """Each ``Engine.step`` raises the flag and records its start, the flag is down at a
    step's later forwards once lowered, and the engine's own method is back afterwards."""
    from foretell.engine.engine import Engine

    original = Engine.step
    tape = beside.host_overhead.ForwardTape()
    kw = {"warmup_steps": 1, "steps": 4, "count": False, "backend": beside.BACKEND}
    beside.host_overhead.run_mix(micro, SMALL, tape=tape, **kw)
    seen = []
    clock = beside.StepClock()
    with clock.installed():
        assert Engine.step is not original

        def at_forward() -> None:
            seen.append(clock.new_step)
            clock.new_step = False

        tape.after_forward = at_forward
        try:
            beside.host_overhead.run_mix(micro, SMALL, tape=tape, replay=True, **kw)
        finally:
            tape.after_forward = None
    assert Engine.step is original
    assert sum(seen) == 5 and len(clock.starts) == 5
    assert clock.starts == sorted(clock.starts)


def test_a_replay_beside_a_pass_that_fails_raises_its_error(beside, micro, work) -> None:
    """A pass that fails does not pass for a failed forward (the engine would retry the
    step and the replay would run off its tape): the run raises the pass's own error."""
    tape = beside.host_overhead.ForwardTape()
    kw = {"warmup_steps": 1, "steps": 3}
    beside.host_overhead.run_mix(micro, SMALL, count=False, tape=tape, backend=beside.BACKEND, **kw)
    calls = []

    def breaks_at_third() -> None:
        calls.append(1)
        if len(calls) == 3 + 1 + beside.ALONE_CALLS:  # after the timed alone ones
            raise ValueError("pass broke")
        work()

    pass_thread = beside.PassThread(breaks_at_third)
    try:
        with pytest.raises(RuntimeError, match="pass beside the steps failed") as info:
            beside.replay_beside(micro, tape, SMALL, pass_thread, **kw)
        assert "pass broke" in str(info.value)
    finally:
        pass_thread.close()


def test_a_pass_on_a_thread_runs_off_the_callers_thread_and_raises_its_failure(
    beside, work
) -> None:
    where = []

    def traced() -> None:
        where.append(threading.get_ident())
        work()

    pass_thread = beside.PassThread(traced)
    try:
        with pytest.raises(RuntimeError, match="no pass to finish"):
            pass_thread.finish()
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
