"""Engine and scheduler behaviour: backfill, abort, budgets, failures, offline generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import foretell.decoding.batched as batched_module
import foretell.engine.engine as engine_module
from foretell import DecodeParams, Engine, Prophet


def _commits_at(step: int, steps: int = 10) -> DecodeParams:
    """Params whose Prophet test fires exactly at ``step``: the late phase starts there and its
    threshold is below any possible gap."""
    bound = step / steps
    policy = Prophet(thresholds=(1e9, 1e9, -1.0), bounds=(bound, bound))
    return DecodeParams(gen_length=20, block_length=10, steps=steps, early_commit=policy)


def test_backfill_step_by_step(llada64) -> None:
    engine = Engine(llada64, dtype="float64", max_num_seqs=4)
    commit_steps = [2, 5, 3, 7, 4, 6, 2, 3, 1, 4]
    ids = [engine.add_request("12+34=", _commits_at(k)) for k in commit_steps]

    # Expected FCFS schedule with 4 slots, a finished request leaving in its own step.
    expected_batches, expected_done = [], []
    waiting, running, t = list(range(len(ids))), {}, 0
    while waiting or running:
        t += 1
        while waiting and len(running) < 4:
            running[waiting.pop(0)] = t
        expected_batches.append({ids[i] for i in running})
        done = {i for i, start in running.items() if t - start + 1 == commit_steps[i]}
        expected_done.append({ids[i] for i in done})
        for i in done:
            del running[i]

    step = 0
    while engine.has_unfinished_requests():
        before = {r.request_id for r in engine.scheduler.running}
        before |= {r.request_id for r in list(engine.scheduler.waiting)[: 4 - len(before)]}
        finished = engine.step()
        assert before == expected_batches[step], f"step {step + 1}"
        assert {o.request_id for o in finished} == expected_done[step], f"step {step + 1}"
        for out in finished:
            assert out.finish_reason == "early_commit"
            assert (
                out.num_forward_passes == out.commit_step == commit_steps[ids.index(out.request_id)]
            )
        # Evicted at once: none of the finished is still running.
        assert not {o.request_id for o in finished} & {
            r.request_id for r in engine.scheduler.running
        }
        step += 1
    assert step == len(expected_batches)


def test_abort_frees_the_slot_and_is_idempotent(llada64) -> None:
    engine = Engine(llada64, dtype="float64", max_num_seqs=2)
    params = DecodeParams(gen_length=16, steps=16)
    a, b, c = (engine.add_request("1+1=", params) for _ in range(3))
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == [a, b]
    engine.abort(a)
    engine.abort(a)  # again: nothing happens
    engine.abort("no-such-request")
    outputs = engine.step()
    assert [o.request_id for o in outputs] == [a]
    assert outputs[0].finish_reason == "aborted" and outputs[0].num_forward_passes == 1
    assert [r.request_id for r in engine.scheduler.running] == [b, c]
    engine.abort(c)  # a waiting-or-running request mid-run
    rest = []
    while engine.has_unfinished_requests():
        rest += engine.step()
    assert {o.request_id: o.finish_reason for o in rest} == {b: "steps", c: "aborted"}


def test_request_too_large_for_the_budget_is_refused_at_add(llada64) -> None:
    engine = Engine(llada64, dtype="float64", max_num_batched_tokens=40)
    with pytest.raises(ValueError, match=r"prompt: .*exceeds max_num_batched_tokens 40"):
        engine.add_request("12+34=", DecodeParams(gen_length=36))
    # The canvas alone leaves no room for any prompt: gen_length is to blame.
    with pytest.raises(ValueError, match=r"^gen_length: 40 leaves no room .* 40$"):
        engine.add_request("12+34=", DecodeParams(gen_length=40))
    with pytest.raises(ValueError, match="cfg"):
        engine.add_request("12+34=", DecodeParams(gen_length=24, cfg_scale=1.0))
    assert not engine.has_unfinished_requests()


# Guidance with an explicit Prophet span (one that never commits): in the batched step, or
# in the per-request step where an engine runs that one alone (``runner.batched = False``).
PER_REQUEST = DecodeParams(
    gen_length=16,
    steps=8,
    cfg_scale=1.0,
    early_commit=Prophet((1e9,) * 3, answer_start=0, answer_length=4),
)


def _run_three(engine: Engine, params: DecodeParams) -> dict:
    engine.add_request("1+1=", params, request_id="good-1")
    engine.add_request("2+2=", params, request_id="bad")
    engine.add_request("3+3=", params, request_id="good-2")
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    return outs


@pytest.mark.parametrize("path", ["per-request", "batched"])
def test_a_failing_request_finishes_with_error_and_the_others_complete(
    llada64, monkeypatch, fail_greedy_step, path
):
    """A fault in one request's step (the per-request ``advance``, or its part of the greedy
    batch's step) ends that request only."""
    engine = Engine(llada64, dtype="float64", max_num_seqs=4)
    if path == "per-request":
        engine.runner.batched = False
        params = PER_REQUEST.replace(seed=3)
        real = engine_module.advance

        def failing(req, *args):
            if req.request_id == "bad" and req.global_step == 2:
                raise RuntimeError("injected fault")
            return real(req, *args)

        monkeypatch.setattr(engine_module, "advance", failing)
    else:
        params = DecodeParams(gen_length=16, steps=8)
        fail_greedy_step(lambda req: req.request_id == "bad" and req.global_step == 2)
    outs = _run_three(engine, params)
    assert outs["bad"].finish_reason == "error" and "injected fault" in outs["bad"].error
    assert outs["good-1"].finish_reason == outs["good-2"].finish_reason == "steps"
    monkeypatch.undo()
    alone = Engine(llada64, dtype="float64").generate(["1+1="], params, use_tqdm=False)[0]
    assert outs["good-1"].token_ids == alone.token_ids


def test_a_failing_batched_step_ends_its_members_and_the_engine_goes_on(llada64, monkeypatch):
    """A fault while planning the batched step (before any request changed) ends that pass's
    members with the error; a request added afterwards decodes as it does alone."""
    real, calls = batched_module.BatchedStep._plan, []

    def broken_once(self, *args):
        calls.append(len(self.reqs))
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(self, *args)

    monkeypatch.setattr(batched_module.BatchedStep, "_plan", broken_once)
    engine = Engine(llada64, dtype="float64", max_num_seqs=4)
    params = DecodeParams(gen_length=16, steps=8)
    first = [engine.add_request(p, params) for p in ("1+1=", "2+2=")]
    outs = {o.request_id: o for o in engine.step()}
    assert calls == [2] and sorted(outs) == sorted(first)
    assert all(o.finish_reason == "error" and "injected fault" in o.error for o in outs.values())
    later = engine.add_request("3+3=", params)
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    alone = Engine(llada64, dtype="float64").generate(["3+3="], params, use_tqdm=False)[0]
    assert outs[later].finish_reason == "steps" and outs[later].token_ids == alone.token_ids


def test_generate_keeps_input_order_and_is_all_or_nothing(llada64) -> None:
    engine = Engine(llada64, dtype="float64", max_num_seqs=3)
    prompts = ["1+1=", "22+22=", "333+333=", "4444+4444=", "a", "bb"]
    params = [DecodeParams(gen_length=8 * (1 + i % 3), steps=8, seed=i) for i in range(6)]
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.token_ids) for o in outs] == [p.gen_length for p in params]

    with pytest.raises(ValueError, match=r"prompts\[2\]: prompt: is empty"):
        engine.generate(["1+1=", "2+2=", ""], use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompts\[1\]: block_length"):
        engine.generate(
            ["1+1=", "2+2="], [DecodeParams(), {"gen_length": 3, "block_length": 2}], use_tqdm=False
        )
    with pytest.raises(ValueError, match="params: 1 params for 2 prompts"):
        engine.generate(["1+1=", "2+2="], [DecodeParams()], use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_generate_errors_return_runs_the_valid_prompts(llada64) -> None:
    engine = Engine(llada64, dtype="float64", max_num_seqs=3)
    params = DecodeParams(gen_length=8, steps=8)
    outs = engine.generate(["1+1=", "", "2+2="], params, use_tqdm=False, errors="return")
    assert [o.finish_reason for o in outs] == ["steps", "error", "steps"]
    assert outs[1].error == "prompt: is empty" and outs[1].token_ids == []
    (alone,) = engine.generate(["2+2="], params, use_tqdm=False)
    assert outs[2].token_ids == alone.token_ids
    with pytest.raises(ValueError, match="errors: expected"):
        engine.generate(["1+1="], params, use_tqdm=False, errors="ignore")
    assert not engine.has_unfinished_requests()


def test_prompt_forms_stop_strings_and_text_constraints(llada64) -> None:
    engine = Engine(llada64, dtype="float64")
    tok = engine.tokenizer
    params = DecodeParams(gen_length=24, steps=12, constraints={4: "ab c"})
    text_out, ids_out, chat_out = engine.generate(
        ["12+34=", tok("12+34=")["input_ids"], [{"role": "user", "content": "12+34="}]],
        params,
        use_tqdm=False,
    )
    assert text_out.token_ids == ids_out.token_ids
    templated = tok.apply_chat_template(
        [{"role": "user", "content": "12+34="}], add_generation_prompt=True, tokenize=False
    )
    assert templated == "user: 12+34=\nassistant: "
    assert tok.decode(chat_out.prompt_token_ids) == templated
    # " ab" then " c", each word with a leading space, from generation position 4 on.
    assert tok.decode(text_out.token_ids[4:9]) == " ab c"

    full = engine.generate(["9+9="], DecodeParams(gen_length=24, steps=24), use_tqdm=False)[0]
    stop = full.text[5:7]
    cut = engine.generate(
        ["9+9="], DecodeParams(gen_length=24, steps=24, stop=[stop]), use_tqdm=False
    )[0]
    assert cut.token_ids == full.token_ids
    assert cut.text == full.text[: full.text.find(stop)]


def test_bad_prompts_name_the_field(llada64, dream64) -> None:
    engine = Engine(llada64, dtype="float64")
    with pytest.raises(ValueError, match="prompt: is empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="prompt: token ids"):
        engine.add_request([1, 10_000])
    with pytest.raises(ValueError, match="prompt: contains the mask token"):
        engine.add_request([5, engine.mask_token_id])
    with pytest.raises(ValueError, match="remasking: 'origin'"):
        engine.add_request("1+1=", DecodeParams(remasking="origin"))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("1+1=", request_id="x")
        engine.add_request("1+1=", request_id="x")
    with pytest.raises(ValueError, match="block_length"):
        Engine(dream64, dtype="float64").add_request(
            "1", DecodeParams(gen_length=8, block_length=4)
        )
    with pytest.raises(ValueError, match="model"):
        Engine(object())


def test_confidence_threshold_reveals_in_parallel(llada64) -> None:
    engine = Engine(llada64, dtype="float64")
    strict, loose = engine.generate(
        ["12+34=", "12+34="],
        [
            DecodeParams(
                gen_length=32, block_length=8, remasking="confidence_threshold", threshold=1.0
            ),
            DecodeParams(
                gen_length=32, block_length=8, remasking="confidence_threshold", threshold=0.3
            ),
        ],
        use_tqdm=False,
    )
    # Nothing can exceed 1.0: one token (the most confident) per step.
    assert strict.num_forward_passes == 32
    assert loose.num_forward_passes < 32
    assert engine.mask_token_id not in loose.token_ids[:8]


def test_requests_do_not_depend_on_their_batch(llada64) -> None:
    params = DecodeParams(gen_length=16, steps=16, temperature=0.8, remasking="random", seed=9)
    alone = Engine(llada64, dtype="float64").generate(["5*5="], params, use_tqdm=False)[0]
    crowd = Engine(llada64, dtype="float64").generate(
        ["1", "5*5=", "22"],
        [params.replace(seed=1), params, params.replace(seed=2)],
        use_tqdm=False,
    )
    assert crowd[1].token_ids == alone.token_ids
    torch.testing.assert_close(torch.tensor(crowd[1].token_ids), torch.tensor(alone.token_ids))


def test_forward_chunks_split_whole_sequences_evenly() -> None:
    from foretell.engine.runner import chunk_bounds

    def sizes(lens, budget):
        return [sum(lens[i:j]) for i, j in chunk_bounds(lens, budget)]

    assert sizes([43] * 28, 640) == [602, 602]
    assert sizes([43] * 29, 640) == [430, 430, 387]  # three balanced, not 14 + 14 + 1
    assert sizes([43] * 8, 640) == [344]
    assert sizes([43] * 28, None) == [1204]
    assert sizes([700, 10, 10], 640) == [700, 20]  # a longer sequence is a chunk of its own
    bounds = chunk_bounds([5, 9, 3, 7, 11, 2, 8], 12)
    assert [i for i, _ in bounds][1:] == [j for _, j in bounds][:-1]  # consecutive, complete
    assert bounds[0][0] == 0 and bounds[-1][1] == 7
    assert all(sum([5, 9, 3, 7, 11, 2, 8][i:j]) <= 12 for i, j in bounds)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_forward_chunks_do_not_change_results(dtype) -> None:
    """A tiny chunk budget splits every pass (a cfg request's two sequences too) and gives the
    same tokens and passes as one piece, and gaps equal up to rounding (a matrix product's last
    bits can depend on how many rows it has, as with any other batch composition)."""
    from foretell.models.tiny import tiny_model

    loaded = tiny_model("llada", seed=3, dtype=dtype)
    prompts = ["1+1=", "22+22=", "333+333=", "a", "bb+c", "9", "77+8=", "x"]
    policy = Prophet(thresholds=(3.0, 2.0, 1.0))
    params = [
        DecodeParams(
            gen_length=8 * (1 + i % 3),
            steps=8,
            seed=i,
            cfg_scale=1.0 if i % 4 == 1 else 0.0,
            temperature=0.7 if i % 4 == 2 else 0.0,
            early_commit=policy if i % 2 else None,
        )
        for i in range(len(prompts))
    ]
    runs = []
    for budget in (None, 20):
        engine = Engine(loaded, dtype=dtype, max_num_seqs=8, forward_chunk_tokens=budget)
        outs = engine.generate(prompts, params, use_tqdm=False)
        runs.append(outs)
    one_piece, chunked = runs
    assert [o.token_ids for o in chunked] == [o.token_ids for o in one_piece]
    assert [o.num_forward_passes for o in chunked] == [o.num_forward_passes for o in one_piece]
    gaps = [(a.last_gap, b.last_gap) for a, b in zip(one_piece, chunked, strict=True)]
    assert all((a is None) == (b is None) for a, b in gaps)
    assert [b for _, b in gaps if b is not None] == pytest.approx(
        [a for a, _ in gaps if a is not None], rel=1e-6
    )
    assert any(a is not None for a, _ in gaps)


def test_forward_chunk_tokens_is_validated(llada64) -> None:
    for bad in (0, -5, "fast", 2.5, True):
        with pytest.raises(ValueError, match="forward_chunk_tokens"):
            Engine(llada64, dtype="float64", forward_chunk_tokens=bad)
    assert Engine(llada64, dtype="float64").runner.forward_chunk_tokens == 640  # CPU default
    assert (
        Engine(llada64, dtype="float64", forward_chunk_tokens=None).runner.forward_chunk_tokens
        is None
    )


def test_the_canvas_and_its_host_array_are_one_memory() -> None:
    """The batched step writes canvases through ``canvas_np`` (no tensor op per request); the
    per-request step through ``canvas``: each sees the other's writes, and the masked
    positions follow both."""
    from foretell.scheduler.request import Request

    req = Request(
        "r", "p", [1, 2, 3], DecodeParams(gen_length=8, block_length=4, steps=4), 0, "llada"
    )
    assert req.masked_count() == 8 and req.masked_np(5, 9).tolist() == [5, 6, 7, 8]
    req.write_np(np.array([3, 4]), np.array([7, 8]))
    assert req.canvas[3:5].tolist() == [7, 8] and req.masked_count(3, 7) == 2
    req.write(torch.tensor([5]), torch.tensor([9]))
    assert req.canvas_np[5] == 9 and req.masked_positions(0, 8).tolist() == [6, 7]
    req.set_masked(np.array([6, 7, 8, 9, 10]))  # what a batched step knows after its write
    assert req.masked_count(7) == 4
    assert req.generated_ids[:3] == [7, 8, 9]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "alone"])
def test_a_stalled_dream_threshold_request_ends_only_when_the_stall_would_repeat(batched) -> None:
    """Dream's uncached threshold rule runs one grid over the whole generation until no mask
    is left. A step whose every reveal is the mask token itself (a stall) would repeat forever
    with greedy candidates, so it ends the request there, with its masks left; drawn
    candidates may do better next step, so a sampled request draws again until its step
    budget is spent, and then a stall ends it. Before, such requests held their slots for
    good (the reviewers' reproductions)."""
    from foretell.models.tiny import tiny_model

    dream = tiny_model("dream", seed=7, dtype="float32")
    engine = Engine(dream, dtype="float32")
    engine.runner.batched = batched
    rule = dict(gen_length=16, remasking="confidence_threshold", threshold=0.1, cfg_scale=1.0)
    greedy = DecodeParams(steps=16, **rule)  # greedy: its argmax is the mask token
    spent = DecodeParams(steps=2, temperature=0.7, seed=42, **rule)  # stalls past its budget
    redraws = DecodeParams(steps=16, temperature=0.7, seed=42, **rule)  # within its budget
    engine.add_request([31, 41, 31, 44, 32], greedy, request_id="greedy")
    engine.add_request([31, 41, 31, 44], spent, request_id="spent")
    engine.add_request([31, 41, 31, 44], redraws, request_id="redraws")
    engine.add_request("1+1=", DecodeParams(gen_length=16, steps=16), request_id="other")
    done = {}
    for _ in range(60):
        done.update({o.request_id: o for o in engine.step()})
        if not engine.has_unfinished_requests():
            break
    assert set(done) == {"greedy", "spent", "redraws", "other"}
    assert all(o.finish_reason == "steps" for o in done.values())
    mask = dream.model.mask_token_id
    left = {rid: o.token_ids.count(mask) for rid, o in done.items()}
    assert left == {"greedy": 2, "spent": 1, "redraws": 1, "other": 0}
    passes = {rid: o.num_forward_passes for rid, o in done.items()}
    # The stalls: greedy's first ends it; the drawn one's go on to its budget's last step.
    assert passes == {"greedy": 3, "spent": 2, "redraws": 16, "other": passes["other"]}, passes
