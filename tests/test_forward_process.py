"""``Engine(overlap="process")``: the forward in a process of its own (issue #24).

The model's process maps the engine's weights and KV pool from shared memory and runs each
pass's forward; everything else stays here. So every seeded request must get the tokens it gets
without overlap, the forward must really run over there, and a forward that fails there, or a
process that dies, must cost no request but the one that fails alone.
"""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest
import torch

from foretell.engine.forward_process import MAX_DEATHS, ForwardProcess, ForwardProcessError
from foretell.models.llada import LLaDAModelLM
from tests.benchmark_scripts import script_module
from tests.test_overlap import (
    MIXES,
    engine_for,
    run_all,
    seeded_requests,
    step_outputs,
    tokens_of,
)


@pytest.fixture(scope="module")
def bench():
    with script_module("host_overhead") as module:
        yield module


# This process's forward calls of a HeldLLaDA (the model's process counts its own, unseen).
CALLS_HERE: list[int] = []


class HeldLLaDA(LLaDAModelLM):
    """The micro LLaDA model, whose forward waits while the file ``hold`` (an instance
    attribute) exists, at most a minute: a pass held in the model's process while the test
    kills it."""

    def forward_packed(self, *args, **kwargs):
        CALLS_HERE.append(1)
        deadline = time.monotonic() + 60
        while os.path.exists(self.hold) and time.monotonic() < deadline:
            time.sleep(0.01)
        return super().forward_packed(*args, **kwargs)


class FailingFarLLaDA(LLaDAModelLM):
    """The micro LLaDA model, whose forward fails on a pass that reaches position
    ``fail_from`` (an instance attribute, so that it crosses to the model's process)."""

    def forward_packed(self, input_ids, positions, *args, **kwargs):
        if bool((positions >= self.fail_from).any()):
            raise RuntimeError("injected")
        return super().forward_packed(input_ids, positions, *args, **kwargs)


@pytest.mark.parametrize("mix", MIXES)
def test_the_forward_in_its_own_process_gives_every_seeded_request_the_same_tokens(
    bench, mix
) -> None:
    """Every kind of request of the family's every-kind mix (caches whose pool grows while
    it runs, sampling, guidance, Prophet, block-causal blocks): the same finish and tokens as
    without overlap, and every page back."""
    loaded = bench.micro_model(0, bench.mix_family(mix))
    requests = seeded_requests(bench, loaded, mix, 24)
    expect = run_all(engine_for(loaded, overlap=False), requests)
    engine = engine_for(loaded, overlap="process")
    try:
        assert run_all(engine, requests) == expect
        assert engine.kv_pool.used_bytes == 0
        process = engine._forward_process
        # Every pass ran there; the pool's tensor was sent, and sent again where the pool
        # grew between cached passes (the LLaDA mix's does).
        assert process.starts == 1 and process.passes == engine.metrics.steps
        assert process.storages_sent >= (2 if mix == "every-kind-llada" else 1)
    finally:
        engine.close()


def test_the_forward_runs_in_the_other_process(bench, monkeypatch) -> None:
    """No pass's forward runs here (this process's model is never called for one: the
    uncached requests ask for no read-only rows), its time is counted all the same, and the
    process uses as many torch threads as the engine's."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 12)
    requests = [(p, q) for p, q in requests if q.kv_cache is None]
    calls = []
    original = type(loaded.model).forward_packed

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    engine = engine_for(loaded, overlap="process")
    try:
        monkeypatch.setattr(type(loaded.model), "forward_packed", counted)
        run_all(engine, requests)
        process = engine._forward_process
        assert process.alive and process.pid != os.getpid()
        assert process.process_threads == torch.get_num_threads()
        assert not calls
        assert engine.runner.forward_passes == engine.metrics.steps > 0
        assert engine.runner.forward_seconds > 0
    finally:
        engine.close()


def test_a_forward_that_fails_in_the_process_fails_only_its_request(bench) -> None:
    """A pass whose forward fails over there is run again here in halves, as without
    overlap: only the request that fails alone ends with an error."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 10)
    far = max(len(p) + q.gen_length for p, q in requests) + 16
    prompts = [p for p, _ in requests]
    prompts[3] = (prompts[3] * far)[:far]  # its canvas alone reaches position far
    params = [q for _, q in requests]
    model = loaded.model
    model.__class__, model.fail_from = FailingFarLLaDA, far
    alone = engine_for(loaded, overlap=False).generate(prompts, params, use_tqdm=False)
    engine = engine_for(loaded, overlap="process")
    try:
        outputs = engine.generate(prompts, params, use_tqdm=False)
        assert outputs[3].finish_reason == "error" and "forward pass failed" in outputs[3].error
        assert tokens_of(outputs) == tokens_of(alone)
        assert engine.kv_pool.used_bytes == 0 and engine._forward_process.starts == 1
    finally:
        engine.close()


def record_batches_run_here(engine) -> list[list[str]]:
    """The request ids of each batch ``engine`` steps in its own process from now on."""
    batches: list[list[str]] = []
    step_batch = engine._step_batch

    def recorded(batch):
        batches.append([req.request_id for req in batch])
        return step_batch(batch)

    engine._step_batch = recorded
    return batches


def test_a_process_that_dies_is_replaced_and_no_request_is_lost(bench, tmp_path) -> None:
    """The model's process killed while a pass is held there: that pass runs again here,
    the next one starts a new process, and every request gets its tokens."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 16)
    expect = run_all(engine_for(loaded, overlap=False), requests)
    hold = tmp_path / "hold"
    loaded.model.__class__, loaded.model.hold = HeldLLaDA, str(hold)
    engine = engine_for(loaded, overlap="process")
    try:
        ids = [engine.add_request(p, q) for p, q in requests]
        done: dict = {}
        step_outputs(engine, done, 3)
        engine._wait_in_flight()  # that pass is over: the next one starts held
        hold.touch()
        step_outputs(engine, done, 1)  # collects the pass before, starts a held one
        flight = engine._in_flight
        assert flight is not None and flight.future._result is None
        here = record_batches_run_here(engine)
        os.kill(engine._forward_process.pid, signal.SIGKILL)
        hold.unlink()
        step_outputs(engine, done)
        assert [done[i] for i in ids] == expect
        assert here[0] == [req.request_id for req in flight.batch]  # the held pass, here
        process = engine._forward_process
        assert process.starts == 2 and process.alive
        assert process.passes < engine.metrics.steps
    finally:
        engine.close()


class NoStartContext:
    """A spawn context whose processes fail to start (as with no room in /dev/shm)."""

    def __init__(self, context) -> None:
        self.context = context
        self.tries = 0

    def Pipe(self):
        return self.context.Pipe()

    def Process(self, *args, **kwargs):
        process = self.context.Process(*args, **kwargs)

        def fail() -> None:
            self.tries += 1
            raise OSError("injected: no room in /dev/shm")

        process.start = fail
        return process


def test_a_process_that_cannot_start_again_leaves_the_forward_on_a_thread(bench) -> None:
    """The model's process dies and a new one cannot start: the engine says so once and runs
    the forward on a thread from then on, and every request still gets its tokens."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 12)
    expect = run_all(engine_for(loaded, overlap=False), requests)
    engine = engine_for(loaded, overlap="process")
    process = engine._forward_process
    ids = [engine.add_request(p, q) for p, q in requests]
    done: dict = {}
    step_outputs(engine, done, 2)
    engine._wait_in_flight()
    process._context = context = NoStartContext(process._context)
    os.kill(process.pid, signal.SIGKILL)
    process._process.join()
    step_outputs(engine, done)
    assert [done[i] for i in ids] == expect
    assert context.tries == 1 and process.unusable and not process.alive
    assert engine.overlap == "thread" and engine._forward_process is None
    assert engine._forward_worker is not None  # the thread took over
    engine.close()


class DyingLLaDA(LLaDAModelLM):
    """The micro LLaDA model, whose forward ends its process anywhere but in ``home``."""

    def forward_packed(self, *args, **kwargs):
        if os.getpid() != self.home:
            os._exit(3)
        return super().forward_packed(*args, **kwargs)


def test_a_process_that_dies_at_every_pass_is_given_up(bench) -> None:
    """A model process that dies at every pass is replaced MAX_DEATHS - 1 times, then given
    up for a thread; every pass it held runs here, and no request is lost."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 12)
    expect = run_all(engine_for(loaded, overlap=False), requests)
    loaded.model.__class__, loaded.model.home = DyingLLaDA, os.getpid()
    engine = engine_for(loaded, overlap="process")
    process = engine._forward_process
    ids = [engine.add_request(p, q) for p, q in requests]
    done: dict = {}
    step_outputs(engine, done)
    assert [done[i] for i in ids] == expect
    assert process.starts == MAX_DEATHS and process.passes == 0 and process.unusable
    assert engine.overlap == "thread" and engine._forward_process is None
    engine.close()


def test_close_stops_the_process_and_a_dropped_engine_stops_it_too(bench) -> None:
    """``close()`` waits for the pass in flight and stops the process (stepping again starts
    a new one); an engine dropped without ``close()`` takes its process with it."""
    loaded = bench.micro_model(0, "llada")
    requests = seeded_requests(bench, loaded, "every-kind-llada", 6)
    expect = run_all(engine_for(loaded, overlap=False), requests)
    engine = engine_for(loaded, overlap="process")
    ids = [engine.add_request(p, q) for p, q in requests]
    engine.step()
    engine.step()
    first = engine._forward_process._process
    engine.close()
    first.join(timeout=10)
    assert not first.is_alive() and first.exitcode == 0 and engine._in_flight is None
    done: dict = {}
    step_outputs(engine, done)
    assert [done[i] for i in ids] == expect and engine._forward_process.starts == 2
    process = engine._forward_process._process
    del engine
    gc.collect()
    process.join(timeout=10)
    assert not process.is_alive()


def test_a_process_forward_refuses_bad_values(bench) -> None:
    loaded = bench.micro_model(0, "llada")
    with pytest.raises(ValueError, match="overlap: must be False, True, 'thread' or 'process'"):
        engine_for(loaded, overlap="yes")
    with pytest.raises(ValueError, match="overlap: 'process' runs the model in a CPU process"):
        engine_for(loaded, overlap="process", device="cuda")
    with pytest.raises(ValueError, match="overlap: needs max_num_seqs >= 2"):
        engine_for(loaded, overlap="process", max_num_seqs=1)


def test_a_model_that_cannot_reach_its_process_fails_the_engines_start(bench) -> None:
    """A model that cannot be sent to its process (here, a lambda among its attributes) fails
    the engine's construction with the reason and the way out, not a later pass."""
    loaded = bench.micro_model(0, "llada")
    loaded.model.unpicklable = lambda: None
    with pytest.raises(ForwardProcessError, match=r"could not start .*overlap='thread'"):
        engine_for(loaded, overlap="process")


def test_the_models_process_takes_forward_threads_and_a_crowded_machine_is_warned_of(
    bench, monkeypatch, caplog
) -> None:
    """``forward_threads`` sets the model's process's torch threads (default: the engine's).
    This process on more than one thread beside it, on too few cores, slows both many times
    over (docs/benchmarks.md): the engine says so, naming the settings; one thread here and
    the cores there is the setup docs/guide.md recommends, and is not warned of."""
    loaded = bench.micro_model(0, "llada")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for own, forward, warned in ((2, None, True), (1, 2, False), (1, None, False)):
        monkeypatch.setattr(torch, "get_num_threads", lambda own=own: own)
        caplog.clear()
        with caplog.at_level("WARNING", logger="foretell.engine.engine"):
            engine = engine_for(loaded, overlap="process", forward_threads=forward)
            engine.close()
        assert engine._forward_process.process_threads == (forward or own)
        message = f"this process's {own} torch threads and the model process's"
        assert (message in caplog.text) == warned, (own, forward, caplog.text)
        assert ("--forward-threads" in caplog.text) == warned


def test_forward_threads_is_refused_where_it_means_nothing(bench) -> None:
    loaded = bench.micro_model(0, "llada")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="forward_threads: must be an integer >= 1"):
            engine_for(loaded, overlap="process", forward_threads=bad)
    for overlap in (False, True):
        with pytest.raises(ValueError, match=r"forward_threads: .* only with overlap='process'"):
            engine_for(loaded, overlap=overlap, forward_threads=2)


def test_a_forward_process_answers_each_pass_once_and_in_order(bench) -> None:
    """A pass gives the forward's results here, bitwise, once (later calls give the same);
    a pass sent before the last was collected starts a new process, and the uncollected one
    then fails rather than take another pass's results; an error over there comes back as
    ForwardProcessError and the process serves the next pass from fresh buffers."""
    loaded = bench.micro_model(0, "llada")
    engine = engine_for(loaded, overlap=False)
    engine.add_request([5, 6, 7], seeded_requests(bench, loaded, "every-kind-llada", 1)[0][1])
    batch = engine.scheduler.schedule()
    phases = engine.runner.run_phases(batch)
    work = next(phases)
    expect = work()
    process = ForwardProcess(loaded.model, None, torch.get_num_threads())

    def same(result) -> bool:
        return all(torch.equal(a, b) for a, b in zip(result, expect, strict=True))

    try:
        pending = process.submit(work, None)
        assert same(pending.result())
        assert pending.result()[1] is pending.result()[1]  # once
        stale = process.submit(work, None)
        fresh = process.submit(work, None)  # the first was never collected
        assert process.starts == 2
        with pytest.raises(ForwardProcessError, match="stopped before this pass ended"):
            stale.result()
        assert same(fresh.result())
        lens = work.seq_lens
        work.seq_lens = [len(work.step.ids) + 1]  # lengths that do not add up
        with pytest.raises(ForwardProcessError, match="forward failed in the model's process"):
            process.submit(work, None).result()
        work.seq_lens = lens
        assert same(process.submit(work, None).result()) and process.starts == 2
    finally:
        process.close()
        phases.close()
