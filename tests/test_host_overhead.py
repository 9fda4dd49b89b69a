"""Host work per engine step must not grow with the batch (issue #24).

On a GPU every dispatched op is a kernel launch and every read of a tensor's value is a sync,
so a step whose ops and reads grow with its batch pays per request in host time. These tests
run benchmarks/host_overhead.py's counters and realistic mix on a micro model.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import os
import threading
import time

import pytest
import torch

from tests.benchmark_scripts import script_module

SMALL, LARGE = 4, 16
SMALL_GROWTH, LARGE_GROWTH = 16, 64  # issue #24's batch sizes
WARMUP_STEPS, STEPS = 24, 12
MIXES = ("issue", "every-kind-llada", "every-kind-dream", "every-kind-block")  # the script's


@pytest.fixture(scope="module")
def bench():
    with script_module("host_overhead") as module:
        yield module


@pytest.fixture(scope="module")
def micro(bench):
    return bench.micro_model(seed=0)


def test_counters_count_ops_reads_and_transfers(bench) -> None:
    """The counters see what they claim to, and only that: they are the test's instrument."""
    t = torch.arange(4)
    ops, reads = bench.OpCounter(), bench.HostReadCounter()
    with reads, ops:
        u = (t + 1).sum()  # two ops, no read
        assert bool(u > 0)  # one op (gt), one read
        _ = [u.item(), int(u), float(u), t.tolist(), t.cpu(), t.numpy(), [0, 1, 2, 3][t[1]]]
        t.to("cpu")  # same device: not a transfer
        t.to(torch.float64)  # a dtype, not a device
    assert reads.reads == 8
    assert dict(reads.by_kind) == {
        "bool": 1,
        "item": 1,
        "int": 1,
        "float": 1,
        "tolist": 1,
        "cpu": 1,
        "numpy": 1,
        "index": 1,
    }
    assert reads.transfers == 0
    assert ops.count >= 4 and ops.by_op["aten.add"] == 1 and ops.by_op["aten.sum"] == 1


def test_the_gc_watch_counts_collections_only_while_active(bench) -> None:
    """The collector's work is counted inside measured steps only, unreachable objects with it."""

    def make_cycle() -> None:
        a: list = []
        a.append(a)

    with bench.GcWatch() as watch:
        make_cycle()
        gc.collect()  # not active: not counted
        assert (watch.collections, watch.unreachable) == (0, 0)
        watch.active = True
        make_cycle()
        gc.collect()
        watch.active = False
    assert watch.collections == 1 and watch.unreachable >= 1 and watch.seconds > 0
    collections, seconds, unreachable = watch.take()
    assert collections == 1 and unreachable >= 1 and seconds > 0
    assert (watch.collections, watch.seconds, watch.unreachable) == (0, 0.0, 0)
    assert watch not in gc.callbacks


def test_mix_is_seeded_and_valid(bench, micro) -> None:
    """Two streams from one seed give the same requests; the mix covers what the issue lists."""
    a, b = bench.mix_stream(micro, seed=3), bench.mix_stream(micro, seed=3)
    first = [next(a) for _ in range(60)]
    assert first == [next(b) for _ in range(60)]
    params = [p for _, p in first]
    assert {p.kv_cache for p in params} == {None, "prefix", "dual"}
    assert {p.remasking for p in params} == set(bench.REMASKINGS)
    assert {p.block_length for p in params} == set(bench.BLOCK_LENGTHS)
    assert sum(p.early_commit is not None for p in params) == 30
    assert all(4 <= len(prompt) <= 200 for prompt, _ in first)


def test_the_block_mix_covers_the_block_kinds_and_runs_full_batches(bench) -> None:
    """``--mix every-kind-block``: an SDAR micro model, both schedules, sampled and greedy,
    Prophet on half; its batches are full, as the other mixes'."""
    loaded = bench.micro_model(0, bench.mix_family("every-kind-block"))
    assert loaded.model.family == "sdar"
    stream = bench.mix_stream(loaded, seed=3, mix="every-kind-block")
    params = [p for _, p in (next(stream) for _ in range(60))]
    assert {p.remasking for p in params} == {"low_confidence", "confidence_threshold"}
    assert {p.temperature > 0 for p in params} == {True, False}
    assert sum(p.early_commit is not None for p in params) == 30
    run = bench.run_mix(
        loaded,
        SMALL,
        warmup_steps=4,
        steps=6,
        count=False,
        mix="every-kind-block",
        backend="sdpa_buckets",
    )
    assert run.steps == 6 and run.skipped_steps == 0 and run.request_steps == 6 * SMALL


def test_every_measured_step_runs_a_full_batch(bench, micro) -> None:
    run = bench.run_mix(micro, SMALL, warmup_steps=4, steps=6, count=False)
    assert run.steps == 6 and run.skipped_steps == 0
    assert run.request_steps == 6 * SMALL and run.forward_s > 0


def test_profiled_calls_are_the_engines_own(bench, micro) -> None:
    """The Python-call count leaves the model's methods out (their calls are not the engine's
    per-request Python), and a profiled run counts every measured step's calls."""
    model = micro.model
    args = (torch.zeros(3, model.embed.weight.shape[1]), torch.arange(3), torch.arange(3))

    def profiled_files(paused: bool) -> set[str]:
        profiler = cProfile.Profile()
        paused_model = bench.model_calls_unprofiled(model, profiler)
        with paused_model if paused else contextlib.nullcontext():
            profiler.enable()
            model.logits_at(*args)
            profiler.disable()
        profiler.create_stats()
        return {filename for filename, _, _ in profiler.stats}

    assert any(f.endswith("transformer.py") for f in profiled_files(paused=False))
    assert not any(f.endswith("transformer.py") for f in profiled_files(paused=True))
    run = bench.run_mix(micro, SMALL, warmup_steps=4, steps=3, count=False, profile=True)
    assert run.steps == 3 and run.python_calls > 0 and run.c_calls > 0


def test_ops_and_reads_per_step_do_not_grow_with_the_batch(bench, micro) -> None:
    """The issue's batch sizes (B=16 and B=64) with the constant-call attention backend
    (``sdpa_buckets``, what flash-attn's varlen call is on a GPU): the exact ``sdpa`` backend
    makes one call per distinct sequence shape by design (docs/design.md)."""
    runs = {
        size: bench.run_mix(
            micro,
            size,
            warmup_steps=WARMUP_STEPS,
            steps=STEPS,
            count=True,
            backend="sdpa_buckets",
        )
        for size in (SMALL_GROWTH, LARGE_GROWTH)
    }
    small, large = runs[SMALL_GROWTH], runs[LARGE_GROWTH]
    assert small.skipped_steps == large.skipped_steps == 0
    ops = large.ops_per_step / small.ops_per_step
    reads = large.reads_per_step / max(small.reads_per_step, 1.0)
    detail = (
        f"ops per step grew {ops:.2f}x, host reads {reads:.2f}x (goal <= "
        f"{bench.OPS_GROWTH_GOAL}): B={SMALL_GROWTH}: {small.ops_per_step:.0f} ops, "
        f"{small.reads_per_step:.1f} reads per step; B={LARGE_GROWTH}: "
        f"{large.ops_per_step:.0f} ops, "
        f"{large.reads_per_step:.1f} reads per step"
    )
    assert ops <= bench.OPS_GROWTH_GOAL and reads <= bench.OPS_GROWTH_GOAL, detail
    # What the step reads is its pass's one transfer (``.cpu()``, then ``.numpy()`` of the
    # host copy), and rarely an event's: the arrays it builds on the host stay arrays, never
    # wrapped in a tensor and read back (before, seven such reads a step: ids, positions,
    # gathered rows, ...).
    for run in (small, large):
        assert run.reads_per_step <= 2.1, (run.reads_by_kind, detail)


def test_ops_per_step_do_not_depend_on_distinct_sampling_values(bench, micro) -> None:
    """Sampled requests are filtered, drawn and guided in one call for the batch whatever their
    temperatures, top-p, top-k and guidance scales (a server's users pick their own), so a
    batch in which every request has values of its own dispatches the ops, step by step, of
    one in which all share them (before, one group of ops per distinct set of values). Random
    remasking: its float32 draws do not tie, so both batches rank with the same ops."""
    from foretell import DecodeParams

    def ops_per_step(distinct: bool) -> list[int]:
        engine = bench.make_engine(micro, 16, "sdpa_buckets")
        for i in range(16):
            own = i if distinct else 0
            params = DecodeParams(
                gen_length=16,
                block_length=16,
                steps=8,
                seed=None,
                temperature=0.7 + own * 1e-2,
                top_p=0.9 - own * 1e-2,
                top_k=5 + own,
                cfg_scale=1.0 + own * 1e-2 if i % 2 else 0.0,
                remasking="random",
            )
            engine.add_request("1+2=3" * (1 + i % 3), params)
        counts = []
        while engine.has_unfinished_requests():
            ops = bench.OpCounter()
            with ops:
                engine.step()
            counts.append(ops.count)
        return counts

    ops_per_step(distinct=False)  # the model's first pass builds its rotary tables
    shared, distinct = ops_per_step(distinct=False), ops_per_step(distinct=True)
    assert len(shared) == 8 and shared == distinct


def test_a_replayed_forward_gives_the_recorded_run_back(bench, micro) -> None:
    """The replayed host time is only meaningful if the replay runs the recorded steps: every
    model call is answered from the tape, in order, and the outputs and canvases come out the
    same. The every-kind mix writes some requests' logits in place (guidance, suppressed
    ids; at this size and length, in 16 of the recorded tensors): the tape must hand out
    copies. A tape of other steps must not pass for it."""
    kw = {"warmup_steps": 4, "steps": 12, "count": False, "mix": "every-kind-llada"}
    tape = bench.ForwardTape()
    recorded = bench.run_mix(micro, LARGE, tape=tape, **kw)
    assert tape.outputs and len(recorded.canvases) == 16 and recorded.model_s > 0
    as_recorded = [t.clone() for t in tape.outputs]
    replayed = bench.run_mix(micro, LARGE, tape=tape, replay=True, **kw)
    assert tape.played == len(tape.outputs)
    assert replayed.outputs == recorded.outputs and replayed.canvases == recorded.canvases
    assert all(torch.equal(a, b) for a, b in zip(as_recorded, tape.outputs, strict=True))
    assert bench.run_mix(micro, LARGE, tape=tape, replay=True, **kw).canvases == recorded.canvases
    with pytest.raises(ValueError, match="empty tape"):
        bench.run_mix(micro, LARGE, tape=tape, **kw)
    with pytest.raises(ValueError, match="timed runs"):
        bench.run_mix(micro, LARGE, tape=tape, replay=True, **{**kw, "count": True})
    as_expected = bench.run_mix(micro, LARGE, expect=tape.recorded, **kw)  # live, the same steps
    assert as_expected.canvases == recorded.canvases
    with pytest.raises(RuntimeError, match="differ from the recorded"):  # live, other steps
        bench.run_mix(micro, LARGE, seed=1, expect=tape.recorded, **kw)
    other = bench.ForwardTape()
    bench.run_mix(micro, LARGE, tape=other, seed=1, **kw)
    with pytest.raises((RuntimeError, ValueError, IndexError)):
        different = bench.run_mix(micro, LARGE, tape=other, replay=True, **kw)
        assert different.canvases == recorded.canvases, "another run's tape replayed silently"


@pytest.mark.parametrize("mix", MIXES)
def test_a_step_leaves_no_reference_cycles(bench, mix: str) -> None:
    """Everything a step makes is freed by reference counting as soon as it is done with: the
    pass's output, its callbacks and the finished requests. A cycle among them (the output
    holding callbacks that hold the output) kept each step's hidden states and gathered logits
    alive until the garbage collector ran (every 11-21 steps here): on a GPU, that much device
    memory the allocator cannot reuse, and here collections that cost host time. The
    every-kind mixes cover the per-request path (cfg, sampling); the block-causal one, whose
    outputs hold no callbacks, guards the block step."""
    assert bench.MIXES == MIXES
    loaded = bench.micro_model(0, bench.mix_family(mix))
    engine = bench.make_engine(loaded, SMALL, "sdpa_buckets")
    stream = bench.mix_stream(loaded, seed=1, mix=mix)
    live = finished = 0
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(70):  # requests take 16-64 steps
            while live < 2 * SMALL:
                engine.add_request(*next(stream))
                live += 1
            outputs = engine.step()
            assert all(out.finish_reason != "error" for out in outputs)
            live -= len(outputs)
            finished += len(outputs)
        unreachable = gc.collect()  # the engine and its live requests are still referenced
    finally:
        if was_enabled:
            gc.enable()
    assert finished > 0
    assert unreachable == 0


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_overlapped_timed_runs_keep_every_pass_full(bench, micro, mode) -> None:
    """``overlap``: two groups of B take turns, each pass still holds B requests, and the
    forward's time (on the worker: a thread, or the model's process) is counted; the
    counters, the profiler and a tape refuse it (they do not follow the worker)."""
    kw = {"warmup_steps": 6, "steps": 8, "count": False, "backend": "sdpa_buckets"}
    run = bench.run_mix(micro, SMALL, overlap=mode, **kw)
    assert run.steps == 8 and run.skipped_steps == 0 and run.request_steps == 8 * SMALL
    assert run.forward_s > 0 and run.wall_s > 0
    with pytest.raises(ValueError, match="overlap is for timed runs"):
        bench.run_mix(micro, SMALL, overlap=mode, **{**kw, "count": True})
    with pytest.raises(ValueError, match="overlap is for timed runs"):
        bench.run_mix(micro, SMALL, overlap=mode, tape=bench.ForwardTape(), **kw)
    record = bench.measure(micro, SMALL, warmup_steps=4, steps=4, seed=0, repeats=2, overlap=mode)
    assert len(record["host_us_per_request_step_overlapped_runs"]) == 2
    assert record["overlap"] == mode
    goals = bench.targets([record])
    assert [g["target"] for g in goals][-2:] == [
        f"host us per request-step at B={SMALL}",
        f"host us per request-step at B={SMALL}, overlapped (period less forward)",
    ]


def test_work_after_a_replayed_forward_runs_on_the_models_clock(bench, micro) -> None:
    """``ForwardTape.after_forward`` (benchmarks/forward_interference.py) runs after each
    replayed forward pass, its time on the model's clock, and the replay still gives the
    recording back."""
    kw = {"warmup_steps": 2, "steps": 3, "count": False, "backend": "sdpa_buckets"}
    calls = []

    def after() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.002)

    tape = bench.ForwardTape(after_forward=after)
    recorded = bench.run_mix(micro, SMALL, tape=tape, **kw)
    assert not calls  # never while recording
    run = bench.run_mix(micro, SMALL, tape=tape, replay=True, **kw)
    assert len(calls) >= 5  # a forward pass each step at least
    assert run.outputs == recorded.outputs and run.canvases == recorded.canvases
    assert run.steps == 3 and run.model_s >= run.steps * 0.002  # the work is the model's time


def test_forward_interference_runs_every_kind(bench, monkeypatch) -> None:
    gap_ms = 3.0
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with script_module("forward_interference") as script:
        on_worker, real = [], script.model_on_worker

        def spied(model, pinned: bool):
            on_worker.append(pinned)
            return real(model, pinned)

        monkeypatch.setattr(script, "model_on_worker", spied)
        result = script.measure(batch_size=SMALL, rounds=1, warmup_steps=2, steps=2, gap_ms=gap_ms)
        assert sorted(on_worker) == sorted(k == "worker-pinned" for k in script.live_kinds()[1:])
        medians = result["host_us_per_request_step"]
        assert set(medians) == {*script.live_kinds(), *script.kinds()}
        assert {"live", "worker"} <= set(medians)
        assert set(result["work_ms_per_step"]) == set(script.kinds())
    assert all(value > 0 for value in medians.values())
    assert sorted(result["orders"][0]) == sorted(medians)
    # A step runs a forward pass at least: the gap kinds last at least their time in each.
    work = result["work_ms_per_step"]
    assert work["spin"] >= 0.9 * gap_ms and work["sleep"] >= 0.9 * gap_ms
    assert result["gap_ms"] == gap_ms
    if affinity is not None:  # a pinned run gives the host's thread its cores back
        assert os.sched_getaffinity(0) == affinity


def test_shadowing_the_models_methods_nests(bench, micro) -> None:
    """A wrapper of the model's methods inside another (the interference script's worker
    inside ``run_mix``'s clock) leaves the outer one in place when it ends, and the model's
    own methods once both have."""
    outer_calls, inner_calls = [], []

    def counting(calls: list):
        def wrap(method):
            def call(*args, **kwargs):
                calls.append(method.__name__)
                return method(*args, **kwargs)

            call.__name__ = method.__name__
            return call

        return wrap

    with bench.model_methods_wrapped(micro.model, counting(outer_calls)):
        outer = {name: micro.model.__dict__[name] for name in bench.MODEL_METHODS}
        with bench.model_methods_wrapped(micro.model, counting(inner_calls)):
            bench.run_mix(micro, SMALL, warmup_steps=1, steps=1, count=False)
        assert {name: micro.model.__dict__[name] for name in bench.MODEL_METHODS} == outer
        assert inner_calls and outer_calls  # the inner wrapper called through the outer one
        seen = len(inner_calls)
        bench.run_mix(micro, SMALL, warmup_steps=1, steps=1, count=False)
        assert len(inner_calls) == seen and len(outer_calls) > seen
    assert not set(bench.MODEL_METHODS) & set(micro.model.__dict__)


def test_the_models_calls_run_on_the_worker_and_give_the_same_run(bench, micro) -> None:
    """``worker`` and ``worker-pinned`` (benchmarks/forward_interference.py) run every call of
    the model's methods on a thread of their own, with the same outputs; pinning is undone."""
    kw = {"warmup_steps": 2, "steps": 3, "count": False, "backend": "sdpa_buckets"}
    inline = bench.run_mix(micro, SMALL, **kw)
    threads = set()

    def where_run(method):
        def call(*args, **kwargs):
            threads.add(threading.get_ident())
            return method(*args, **kwargs)

        call.__name__ = method.__name__
        return call

    with script_module("forward_interference") as script:
        for pinned in (False, True) if "worker-pinned" in script.live_kinds() else (False,):
            affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
            threads.clear()
            with (
                bench.model_methods_wrapped(micro.model, where_run),
                script.model_on_worker(micro.model, pinned=pinned),
            ):
                run = bench.run_mix(micro, SMALL, **kw)
            assert run.outputs == inline.outputs and run.canvases == inline.canvases
            assert threads and threading.get_ident() not in threads
            if affinity is not None:
                assert os.sched_getaffinity(0) == affinity
            assert not set(bench.MODEL_METHODS) & set(micro.model.__dict__)
