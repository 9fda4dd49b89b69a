"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1, the official openai client."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serving import MODEL, metrics, serve

from foretell import AsyncEngine, DecodeParams, Engine

# max_tokens=16 + this extra body = DecodeParams(gen_length=16, block_length=8), 16 steps.
EXTRA = {"block_length": 8}
PARAMS = DecodeParams(gen_length=16, block_length=8)
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(llada64) -> Iterator[tuple[str, AsyncEngine]]:
    with serve(llada64, max_num_seqs=8, max_num_batched_tokens=2048) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(llada64):
    """Offline outputs for any list of prompts (chat prompts as message lists)."""
    engine = Engine(llada64, dtype="float64")

    def generate(prompts, params=PARAMS):
        return engine.generate(prompts, params, use_tqdm=False)

    return generate


def test_models_health_metrics(server, client) -> None:
    base, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    response = httpx.get(base + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    values = metrics(base)
    for name in (
        'foretell_requests_finished_total{reason="steps"}',
        'foretell_requests_finished_total{reason="early_commit"}',
        'foretell_requests_finished_total{reason="aborted"}',
        "foretell_forward_passes_total",
        "foretell_early_commits_total",
        "foretell_requests_running",
        "foretell_requests_waiting",
        "foretell_batch_occupancy",
        "foretell_mean_batch_occupancy",
    ):
        assert name in values


def test_completion_equals_offline(client, reference) -> None:
    ref = reference(["12+34=", "what is 7*8?"])
    r = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=16, extra_body=EXTRA)
    (choice,) = r.choices
    assert choice.text == ref[0].text
    assert choice.finish_reason in ("stop", "length")
    assert choice.foretell["finish_reason"] == "steps"
    assert choice.foretell["num_forward_passes"] == 16
    assert r.usage.prompt_tokens == len(ref[0].prompt_token_ids)
    assert r.usage.completion_tokens == 16
    # Token-id prompts and OpenAI's batch form: one choice per prompt, in order.
    ids = ref[1].prompt_token_ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, extra_body=EXTRA)
    assert r.choices[0].text == ref[1].text
    r = client.completions.create(
        model=MODEL, prompt=["12+34=", "what is 7*8?"], max_tokens=16, extra_body=EXTRA
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [o.text for o in ref]


def test_diffusion_fields_and_early_commit(client, reference) -> None:
    early = {"thresholds": [3.0, 2.0, 1.0]}
    params = DecodeParams(gen_length=32, block_length=8, seed=7, early_commit=early)
    (ref,) = reference(["what is 7*8?"], params)
    assert ref.finish_reason == "early_commit"
    r = client.completions.create(
        model=MODEL,
        prompt="what is 7*8?",
        max_tokens=32,
        seed=7,
        extra_body={"block_length": 8, "early_commit": early},
    )
    assert r.choices[0].text == ref.text
    assert r.choices[0].foretell["finish_reason"] == "early_commit"
    assert r.choices[0].foretell["commit_step"] == ref.commit_step


def test_chat_equals_offline(client, reference) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 2+2?"},
    ]
    (ref,) = reference([messages])
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, extra_body=EXTRA
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_streaming_completion(client, reference) -> None:
    (ref,) = reference(["12+34="])
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="12+34=",
            max_tokens=16,
            extra_body=EXTRA,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == ref.text
    assert sum(bool(c.choices[0].text) for c in text_chunks) > 1  # it really streamed
    assert [c.choices[0].finish_reason is not None for c in text_chunks][-1]
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1


def test_stop_strings_and_batched_streams(client, reference) -> None:
    prompts = ["12+34=", "what is 7*8?"]
    full = [o.text for o in reference(prompts)]
    stop = full[0][6:8]
    cut = [t[: t.find(stop)] if stop in t else t for t in full]
    assert cut[0] == full[0][: full[0].find(stop)]
    r = client.completions.create(
        model=MODEL, prompt=prompts[0], max_tokens=16, stop=stop, extra_body=EXTRA
    )
    assert r.choices[0].text == cut[0] and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=16, stop=[stop], extra_body=EXTRA, stream=True
    )
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        reasons[choice.index] = reasons[choice.index] or choice.finish_reason
    assert texts == cut
    assert reasons[0] == "stop"


def test_streaming_canvas_shows_every_step(client, reference, server) -> None:
    (ref,) = reference(["12+34="])
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="12+34=",
            max_tokens=16,
            extra_body={**EXTRA, "stream_canvas": True},
            stream=True,
        )
    )
    infos = [(c.choices[0].model_extra or {}).get("foretell", {}) for c in chunks]
    steps = [info for info in infos if "canvas" in info]
    assert [s["step"] for s in steps] == list(range(1, 16))  # the 16th is the final chunk
    assert [s["num_masked"] for s in steps] == list(range(15, 0, -1))
    mask = server[1].mask_text
    assert all(s["canvas"].count(mask) == s["num_masked"] for s in steps)
    assert "".join(c.choices[0].text for c in chunks) == ref.text


def test_streaming_chat(client, reference) -> None:
    messages = [{"role": "user", "content": "hi there"}]
    (ref,) = reference([messages])
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, extra_body=EXTRA, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_32_concurrent_clients(server, reference) -> None:
    base, _ = server
    prompts = [f"{i} + {2 * i} =" for i in range(32)]
    refs = reference(prompts)
    before = metrics(base)["foretell_sequences_in_passes_total"]

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        if i % 2:  # half stream, half do not
            stream = await client.completions.create(
                model=MODEL, prompt=prompts[i], max_tokens=16, extra_body=EXTRA, stream=True
            )
            return "".join([c.choices[0].text async for c in stream])
        r = await client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=16, extra_body=EXTRA
        )
        return r.choices[0].text

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=base + "/v1", api_key="unused", max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    texts = asyncio.run(main())
    assert texts == [r.text for r in refs]
    after = metrics(base)
    assert after["foretell_sequences_in_passes_total"] - before == 32 * 16
    assert after["foretell_requests_running"] == after["foretell_requests_waiting"] == 0


def _error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_bad_requests_get_400_and_the_server_keeps_serving(server, client, reference) -> None:
    base, _ = server
    url = base + "/v1/completions"
    good = {"model": MODEL, "prompt": "12+34=", "max_tokens": 16, **EXTRA}

    error = _error(httpx.post(url, content=b'{"model": "tiny-llada", "prompt": ', headers=JSON))
    assert error["type"] == "invalid_request_error" and "malformed JSON" in error["message"]
    assert _error(httpx.post(url, content=b"[1, 2]", headers=JSON))["message"].startswith("body:")
    cases = {
        "remasking": {"remasking": "sideways"},
        "n": {"n": 2},
        "max_tokens": {"max_tokens": 0},
        "steps": {"steps": 5},  # does not divide into the 2 blocks
        "early_commit.thresholds": {"early_commit": {"thresholds": [1.0, 2.0, 3.0]}},
        "early_commit": {"early_commit": "oracle"},
        "temperature": {"temperature": -1},
        "stepz": {"stepz": 4},  # a typo is an error, not silently ignored
        "prompt": {"prompt": "x" * 3000},  # longer than max_num_batched_tokens
        "logprobs": {"logprobs": 2},
        "confidence_dtype": {"confidence_dtype": "float16"},
    }
    for param, change in cases.items():
        error = _error(httpx.post(url, json={**good, **change}))
        assert error["param"] == param, (param, error)
        assert error["message"].startswith(f"{param}: "), error
    error = _error(httpx.post(url, json={**good, "prompt": ["fine", ""]}))
    assert error["param"] == "prompt" and error["message"] == "prompt[1]: is empty"
    chat = {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}
    error = _error(httpx.post(base + "/v1/chat/completions", json=chat))
    assert error["param"] == "messages.0.role"
    missing = httpx.post(url, json={**good, "model": "gpt-9"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

    # Through the official client: a BadRequestError naming the field.
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", extra_body={"cfg_scale": -2})
    assert info.value.param == "cfg_scale"

    # Nothing refused was ever queued, and the next good request is served.
    assert metrics(base)['foretell_requests_finished_total{reason="aborted"}'] == 0
    (ref,) = reference(["12+34="])
    assert httpx.post(url, json=good).json()["choices"][0]["text"] == ref.text


def test_a_failing_request_answers_500_and_others_go_on(
    server, client, reference, fail_greedy_step
):
    """A fault injected into one request's decoding (the engine's own failure path; greedy
    requests are stepped by the batched step)."""
    fail_greedy_step(lambda req: req.prompt == "boom" and req.global_step == 3)
    # The client hears which stage failed, never the exception's text (the log has it).
    with pytest.raises(openai.InternalServerError, match="decoding failed") as info:
        client.completions.create(model=MODEL, prompt="boom", max_tokens=16, extra_body=EXTRA)
    assert "injected fault" not in str(info.value)
    stream = client.completions.create(
        model=MODEL, prompt="boom", max_tokens=16, extra_body=EXTRA, stream=True
    )
    with pytest.raises(openai.APIError, match="decoding failed"):
        list(stream)
    (ref,) = reference(["12+34="])
    r = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=16, extra_body=EXTRA)
    assert r.choices[0].text == ref.text


def test_a_client_that_leaves_frees_its_slot(llada64, reference) -> None:
    long = {"max_tokens": 256, "extra_body": {"stream_canvas": True}}  # 256 steps, seconds
    with serve(llada64, max_num_seqs=1) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

        def finished(reason: str) -> float:
            return metrics(base)[f'foretell_requests_finished_total{{reason="{reason}"}}']

        def wait_for(predicate) -> None:
            deadline = time.monotonic() + 10
            while not predicate():
                assert time.monotonic() < deadline, "timed out"
                time.sleep(0.01)

        # A stream closed after two steps is aborted and its only slot is free again.
        stream = client.completions.create(model=MODEL, prompt="hello", stream=True, **long)
        for _, _chunk in zip(range(2), stream, strict=False):
            pass
        stream.close()
        wait_for(lambda: finished("aborted") == 1)
        (ref,) = reference(["12+34="])
        start = time.monotonic()
        r = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=16, extra_body=EXTRA)
        assert r.choices[0].text == ref.text
        assert time.monotonic() - start < 3  # not queued behind the 256-step request
        assert metrics(base)["foretell_forward_passes_total"] < 16 + 30

        # A non-streaming client that gives up (times out) is aborted too.
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                base + "/v1/completions",
                json={"model": MODEL, "prompt": "hello", "max_tokens": 256},
                timeout=0.5,
            )
        wait_for(lambda: finished("aborted") == 2)
        values = metrics(base)
        assert values["foretell_requests_running"] == values["foretell_requests_waiting"] == 0
        assert finished("steps") == 1


def test_docs_example_runs(capsys) -> None:
    """The embedding example in docs/serving.md, run as written."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    match = re.search(r"<!-- example: embed -->\s*```python\n(.*?)```", doc, re.S)
    assert match, "docs/serving.md lost its embedding example"
    code = match.group(1)
    exec(compile(code, "docs/serving.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert "step 1: " in out and "step 15: " in out and "final: " in out
