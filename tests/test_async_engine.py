"""AsyncEngine: a real background step loop over a tiny model, checked against offline Engine."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time

import pytest

from foretell import AsyncEngine, DecodeParams, Engine, Prophet
from foretell.engine.async_engine import StreamUpdate

SHORT = DecodeParams(gen_length=16, block_length=8)
# A request that would take seconds to finish: only ever run to be aborted.
LONG = DecodeParams(gen_length=256, steps=256)
PROPHET = Prophet(thresholds=(5.0, 3.5, 1.6))
# Commits "what is 7*8?" at step 11 of 32 on this model.
COMMITS_MIDWAY = DecodeParams(gen_length=32, block_length=8, early_commit=Prophet((3.0, 2.0, 1.0)))


def offline(model, prompts, params) -> list:
    return Engine(model, dtype="float64").generate(prompts, params, use_tqdm=False)


def same_result(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.finish_reason == b.finish_reason
    assert a.num_forward_passes == b.num_forward_passes
    assert a.commit_step == b.commit_step


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_generate_equals_offline(llada64) -> None:
    prompts = ["12+34=", "what is 7*8?", "a"]
    params = [SHORT, COMMITS_MIDWAY, SHORT]

    async def main() -> list:
        async with AsyncEngine(llada64, dtype="float64", max_num_seqs=2) as engine:
            return [await engine.generate(p, q) for p, q in zip(prompts, params, strict=True)]

    outs = asyncio.run(main())
    for out, ref in zip(outs, offline(llada64, prompts, params), strict=True):
        same_result(out, ref)
    assert outs[1].finish_reason == "early_commit"  # the policy does fire here


@pytest.mark.parametrize("overlap", [True, "process"])
def test_overlap_serves_the_offline_results_and_aborts(llada64, overlap) -> None:
    """Over ``Engine(overlap=True)`` and ``"process"``: concurrent callers get the offline
    results, a request aborted while its passes run ends "aborted", and shutting down stops
    the forward worker (the thread, or the model's process)."""
    prompts = ["12+34=", "what is 7*8?", "a", "hello"]
    params = [SHORT, COMMITS_MIDWAY, SHORT, SHORT]

    async def main():
        async with AsyncEngine(llada64, dtype="float64", max_num_seqs=4, overlap=overlap) as engine:
            long = asyncio.ensure_future(engine.generate("hello", LONG, request_id="long"))
            outs = await asyncio.gather(
                *(engine.generate(p, q) for p, q in zip(prompts, params, strict=True))
            )
            await engine.abort("long")
            process = engine.engine._forward_process
            return outs, await long, engine, process and process._process

    outs, aborted, engine, process = asyncio.run(main())
    for out, ref in zip(outs, offline(llada64, prompts, params), strict=True):
        same_result(out, ref)
    assert aborted.finish_reason == "aborted" and aborted.num_forward_passes < 256
    assert engine.engine.overlap and engine.engine._forward_worker is None
    assert (process is None) == (overlap is True)  # the model's process, as it ran
    assert process is None or not process.is_alive()


def test_stream_updates_step_by_step(llada64) -> None:
    async def main() -> tuple[list[StreamUpdate], str]:
        async with AsyncEngine(llada64, dtype="float64") as engine:
            updates = [u async for u in engine.stream("12+34=", SHORT)]
            return updates, engine.mask_text

    updates, mask_text = asyncio.run(main())
    (ref,) = offline(llada64, ["12+34="], SHORT)
    assert [u.num_forward_passes for u in updates] == list(range(1, 17))
    assert [u.num_masked for u in updates] == list(range(15, -1, -1))  # one reveal per step
    prompt_len = len(ref.prompt_token_ids)
    for prev, cur in itertools.pairwise(updates):
        assert cur.stable_text.startswith(prev.stable_text)  # only ever grows
    for u in updates[:-1]:
        assert u.finish_reason is None
        assert u.text.count(mask_text) == u.num_masked
        assert len(u.revealed) == len(u.revealed_token_ids) == 1
        pos = u.revealed[0] - prompt_len
        assert u.token_ids[pos] == u.revealed_token_ids[0] == ref.token_ids[pos]
    final = updates[-1]
    same_result(final, ref)
    assert final.stable_text == final.text == ref.text
    assert mask_text not in final.text


def test_stream_ends_with_the_commit(llada64) -> None:
    params = COMMITS_MIDWAY

    async def main() -> list[StreamUpdate]:
        async with AsyncEngine(llada64, dtype="float64") as engine:
            return [u async for u in engine.stream("what is 7*8?", params)]

    updates = asyncio.run(main())
    (ref,) = offline(llada64, ["what is 7*8?"], params)
    final = updates[-1]
    same_result(final, ref)
    assert final.finish_reason == "early_commit" and len(updates) == ref.commit_step == 11
    assert len(final.revealed) == updates[-2].num_masked  # every mask left, filled at once


def test_abort_by_id(llada64) -> None:
    async def main():
        async with AsyncEngine(llada64, dtype="float64") as engine:
            task = asyncio.ensure_future(engine.generate("hello", LONG, request_id="long"))
            await until(lambda: engine.stats()["forward_passes"] >= 2)
            await engine.abort("long")
            await engine.abort("long")  # idempotent
            await engine.abort("no-such-request")
            return await task, engine.stats()

    out, stats = asyncio.run(main())
    assert out.finish_reason == "aborted" and 2 <= out.num_forward_passes < 256
    assert stats["finished"]["aborted"] == 1


@pytest.mark.parametrize("how", ["cancel", "break"])
def test_leaving_early_frees_the_slot(llada64, how: str) -> None:
    async def main():
        async with AsyncEngine(llada64, dtype="float64", max_num_seqs=1) as engine:
            if how == "cancel":
                task = asyncio.ensure_future(engine.generate("hello", LONG))
                await until(lambda: engine.stats()["forward_passes"] >= 2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                async with contextlib.aclosing(engine.stream("hello", LONG)) as updates:
                    async for update in updates:
                        if update.num_forward_passes == 2:
                            break
            # The only slot is free again: a new request runs at once, not after 256 steps.
            out = await engine.generate("12+34=", SHORT)
            return out, engine.stats()

    out, stats = asyncio.run(main())
    assert out.finish_reason == "steps" and out.num_forward_passes == 16
    assert stats["finished"]["aborted"] == 1
    assert stats["forward_passes"] < 16 + 20
    assert stats["running"] == stats["waiting"] == stats["in_flight"] == 0


def test_many_concurrent_callers(llada64) -> None:
    prompts = [f"{i}*{i + 3}=" for i in range(24)]
    params = [
        DecodeParams(gen_length=16, block_length=8, seed=i, early_commit=PROPHET if i % 3 else None)
        for i in range(24)
    ]

    async def main():
        async with AsyncEngine(llada64, dtype="float64", max_num_seqs=4) as engine:

            async def streamed(prompt, p):
                return [u async for u in engine.stream(prompt, p)][-1]

            calls = [
                (streamed if i % 2 else engine.generate)(prompt, p)
                for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))
            ]
            return await asyncio.gather(*calls), engine.stats()

    outs, stats = asyncio.run(main())
    for out, ref in zip(outs, offline(llada64, prompts, params), strict=True):
        same_result(out, ref)
    assert stats["mean_batch_size"] > 3  # they really shared batches
    assert stats["finished"]["early_commit"] > 0


def test_callers_on_several_event_loops(llada64) -> None:
    """Each thread runs its own event loop against the one engine thread."""
    engine = AsyncEngine(llada64, dtype="float64", max_num_seqs=4)
    prompts = [f"{i}+{i}=" for i in range(8)]
    results: dict[int, object] = {}

    def worker(k: int) -> None:
        async def run():
            return await asyncio.gather(*(engine.generate(p, SHORT) for p in prompts[k::2]))

        results[k] = asyncio.run(run())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    asyncio.run(engine.shutdown())
    refs = offline(llada64, prompts, SHORT)
    for k in range(2):
        for out, ref in zip(results[k], refs[k::2], strict=True):
            same_result(out, ref)


def test_invalid_requests_are_refused_before_queueing(llada64) -> None:
    async def main():
        async with AsyncEngine(llada64, dtype="float64") as engine:
            with pytest.raises(ValueError, match=r"^steps: "):
                await engine.generate("hello", {"gen_length": 16, "steps": 0})
            with pytest.raises(ValueError, match=r"^stepz: unknown decoding parameter"):
                await engine.generate("hello", {"stepz": 4})
            with pytest.raises(ValueError, match=r"^prompt: is empty"):
                await engine.generate("", SHORT)
            with pytest.raises(ValueError, match=r"^prompt: .*max_num_batched_tokens"):
                await engine.generate("x" * 20000, SHORT)
            with pytest.raises(ValueError, match=r"^prompts\[1\]: prompt: is empty"):
                await engine.add_requests(["fine", ""], SHORT)
            running = await engine.add_request("hello", LONG, request_id="dup")
            with pytest.raises(ValueError, match=r"^request_id: 'dup' is already running"):
                await engine.generate("hello", SHORT, request_id="dup")
            await running.abort()
            assert (await running.result()).finish_reason == "aborted"
            return engine.stats()

    stats = asyncio.run(main())
    # Nothing refused ever reached the engine: one aborted request, no other.
    assert stats["finished"] == {
        "steps": 0,
        "early_commit": 0,
        "stop": 0,
        "aborted": 1,
        "error": 0,
    }


def test_shutdown_aborts_or_drains(llada64) -> None:
    async def aborting():
        engine = AsyncEngine(llada64, dtype="float64")
        task = asyncio.ensure_future(engine.generate("hello", LONG))
        await until(lambda: engine.stats()["running"] == 1)
        await engine.shutdown()
        out = await task
        with pytest.raises(RuntimeError, match="shut down"):
            await engine.generate("hello", SHORT)
        await engine.shutdown()  # again: a no-op
        return engine, out

    engine, out = asyncio.run(aborting())
    assert out.finish_reason == "aborted"
    assert not engine._thread.is_alive()

    async def draining():
        engine = AsyncEngine(llada64, dtype="float64")
        task = asyncio.ensure_future(engine.generate("12+34=", SHORT))
        await until(lambda: engine.stats()["running"] == 1)
        await engine.shutdown(abort=False)
        return await task

    (ref,) = offline(llada64, ["12+34="], SHORT)
    same_result(asyncio.run(draining()), ref)


def test_idle_loop_does_not_spin(llada64) -> None:
    async def main() -> float:
        async with AsyncEngine(llada64, dtype="float64") as engine:
            await engine.generate("12+34=", SHORT)
            start = time.process_time()
            await asyncio.sleep(0.5)
            return time.process_time() - start

    assert asyncio.run(main()) < 0.1
