"""The server under a stranger's requests: every bad input a JSON 4xx naming the field, nothing
kept of it, admission limits, a request timeout, authentication and origins (issue 14). A real
uvicorn on 127.0.0.1, bounded loops."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from serving import MODEL, metrics, serve

from foretell import AsyncEngine, DecodeParams, Engine
from foretell.scheduler import Request

EXTRA = {"block_length": 8}
PARAMS = DecodeParams(gen_length=16, block_length=8)
JSON = {"content-type": "application/json"}
GOOD = {"model": MODEL, "prompt": "12+34=", "max_tokens": 16, **EXTRA}
HUGE_PROMPT = "x" * 900_000  # under the 1 MiB body limit, far over any prompt


@pytest.fixture(scope="module")
def server(llada64) -> Iterator[tuple[str, AsyncEngine]]:
    with serve(llada64, max_num_seqs=8, max_num_batched_tokens=2048) as running:
        yield running


@pytest.fixture(scope="module")
def reference(llada64):
    engine = Engine(llada64, dtype="float64")
    return lambda prompts, params=PARAMS: engine.generate(prompts, params, use_tqdm=False)


def raw(**fields: str) -> bytes:
    """GOOD with some fields replaced by raw JSON text (what json.dumps cannot write)."""
    body = json.dumps(GOOD)[:-1]
    return (body + "".join(f', "{k}": {v}' for k, v in fields.items()) + "}").encode()


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def huge_requests() -> list[tuple[str, dict]]:
    """Requests each of which, before issue 14, allocated gigabytes, hung, or queued
    thousands of sequences."""
    return [
        ("/v1/completions", {"json": {**GOOD, "max_tokens": 100_000_000}}),
        ("/v1/completions", {"json": {**GOOD, "max_tokens": 10**9, "block_length": 10**9}}),
        ("/v1/completions", {"json": {**GOOD, "max_tokens": 10**10}}),
        ("/v1/completions", {"json": {**GOOD, "max_tokens": 16000, "steps": 16000}}),
        ("/v1/completions", {"json": {**GOOD, "prompt": HUGE_PROMPT}}),
        ("/v1/completions", {"json": {**GOOD, "prompt": ["12+34="] * 10_000}}),
        ("/v1/completions", {"json": {**GOOD, "prompt": [5] * 100_000}}),
    ]


def check_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "0x" not in error["message"]
    return error


def test_every_bad_input_gets_a_json_4xx_naming_the_field(server, reference) -> None:
    base, _ = server
    url = base + "/v1/completions"
    nested: list = [1]
    for _ in range(40):
        nested = [nested]
    deep = {"early_commit": {"thresholds": nested}}
    text = json.dumps(GOOD).encode()
    strings = {"early_commit": {"thresholds": ["7", "5", "2"]}}
    cases = [
        # (param, status, request)
        ("max_tokens", 400, {"json": {**GOOD, "max_tokens": 100_000_000}}),
        ("max_tokens", 400, {"json": {**GOOD, "max_tokens": 10**10}}),
        ("max_tokens", 400, {"content": raw(max_tokens="1e30")}),
        ("max_tokens", 400, {"json": {**GOOD, "max_tokens": "32"}}),
        ("max_tokens", 400, {"json": {**GOOD, "max_tokens": 16000, "steps": 16000}}),
        ("max_tokens", 400, {"json": {**GOOD, "max_tokens": 2048}}),  # no room for a prompt
        (
            "max_completion_tokens",
            400,
            {"json": chat(max_completion_tokens=10**9), "path": "/chat/completions"},
        ),
        ("prompt", 400, {"json": {**GOOD, "prompt": "x" * 100, "max_tokens": 2000}}),
        ("steps", 400, {"json": {**GOOD, "steps": 16000}}),
        ("stream", 400, {"json": {**GOOD, "stream": "yes"}}),
        ("n", 400, {"json": {**GOOD, "n": 1.5}}),
        ("temperature", 400, {"content": raw(temperature="Infinity")}),
        ("temperature", 400, {"content": raw(temperature="NaN")}),
        ("cfg_scale", 400, {"content": raw(cfg_scale="1e400")}),
        ("alg_temp", 400, {"content": raw(alg_temp="-Infinity")}),
        ("top_p", 400, {"content": raw(top_p="NaN")}),
        ("seed", 400, {"json": {**GOOD, "seed": 2**64}}),
        ("seed", 400, {"content": raw(seed="9" * 5000)}),
        ("early_commit.thresholds", 400, {"json": {**GOOD, **strings}}),
        ("early_commit.thresholds", 400, {"content": raw(early_commit='{"thresholds": [1e999]}')}),
        ("prompt", 400, {"content": raw(prompt='"\\ud800"')}),
        ("constraints", 400, {"content": raw(constraints='{"0": "\\udc00"}')}),
        ("constraints", 400, {"json": {**GOOD, "constraints": {"x": 1}}}),
        (
            "messages",
            400,
            {
                "json": chat(messages=[{"role": "user", "content": HUGE_PROMPT}]),
                "path": "/chat/completions",
            },
        ),
        ("prompt", 400, {"json": {**GOOD, "prompt": True}}),
        ("stop", 400, {"json": {**GOOD, "stop": ["x"] * 100_000}}),
        ("stop", 400, {"json": {**GOOD, "stop": "x" * 5000}}),
        ("prompt", 400, {"json": {**GOOD, "prompt": ["12+34="] * 10_000}}),
        ("prompt", 400, {"json": {**GOOD, "prompt": HUGE_PROMPT}}),
        ("prompt", 400, {"json": {**GOOD, "prompt": [5] * 100_000}}),
        (None, 400, {"content": b"[" * 100_000}),
        (None, 400, {"json": {**GOOD, **deep}}),
        (None, 415, {"content": text, "headers": {"content-type": "text/plain"}}),
        (None, 415, {"content": text, "headers": {}}),
        (None, 415, {"data": {"model": MODEL}, "headers": {}}),  # a form post
        (None, 413, {"content": b" " * (50 << 20)}),
        (None, 413, {"content": iter([b" " * (1 << 19)] * 4)}),  # chunked: no content-length
        (None, 403, {"json": GOOD, "headers": {"origin": "https://evil.example"}}),
    ]
    for param, status, request in cases:
        headers = request.pop("headers", JSON)
        path = request.pop("path", "/completions")
        response = httpx.post(base + "/v1" + path, headers=headers, timeout=30, **request)
        error = check_error(response, status, param)
        if param is not None:
            assert error["message"].startswith(f"{param}: "), error
    chat_url = base + "/v1/chat/completions"
    body = b'{"model": "tiny-llada", "messages": [{"role": "user", "content": "\\ud800"}]}'
    check_error(httpx.post(chat_url, content=body, headers=JSON), 400, "messages")
    check_error(httpx.get(base + "/v1/nothing"), 404, None)
    check_error(httpx.get(url), 405, None)

    # Nothing refused was ever queued or kept, and the server goes on serving.
    values = metrics(base)
    assert values['foretell_requests_finished_total{reason="aborted"}'] == 0
    assert values["foretell_requests_running"] == values["foretell_requests_waiting"] == 0
    (ref,) = reference(["12+34="])
    assert httpx.post(url, json=GOOD).json()["choices"][0]["text"] == ref.text


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_refused_huge_requests_leave_memory_flat(server) -> None:
    """The server runs in this process: its RSS is ours."""
    base, _ = server
    requests = huge_requests()
    with httpx.Client(base_url=base, timeout=30) as client:
        for path, request in requests[:3]:  # warm up allocator pools and code paths
            assert client.post(path, **request).status_code == 400
        gc.collect()
        before = rss_bytes()
        for i in range(20):
            path, request = requests[i % len(requests)]
            response = client.post(path, **request)
            assert response.status_code == 400, response.text
        gc.collect()
        after = rss_bytes()
    assert after - before < 50 << 20, (before >> 20, after >> 20)
    assert not [o for o in gc.get_objects() if type(o) is Request]


def small_latency(base: str, n: int = 5) -> float:
    times = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(n):
            start = time.perf_counter()
            assert client.post("/v1/completions", json=GOOD).status_code == 200
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_small_requests_are_not_slowed_by_refused_huge_ones(server) -> None:
    """Medians of small requests' latency, with a flood of refused huge requests in flight
    against idle before and after (the flood's bodies are encoded once: the client shares
    this process with the server)."""
    base, _ = server
    bodies = [(path, json.dumps(request["json"]).encode()) for path, request in huge_requests()]
    small_latency(base, 2)  # warm up
    idle = small_latency(base, 7)
    stop = threading.Event()
    refused = []

    def flood() -> None:
        with httpx.Client(base_url=base, timeout=30, headers=JSON) as client:
            for i in itertools.count():
                if stop.is_set():
                    return
                path, body = bodies[i % len(bodies)]
                refused.append(client.post(path, content=body).status_code)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        while len(refused) < 3:  # the flood is under way
            time.sleep(0.01)
        busy = small_latency(base, 7)
    finally:
        stop.set()
        thread.join(60)
    idle = max(idle, small_latency(base, 7))  # the machine's own load may have changed
    assert set(refused) == {400}
    assert busy < 2 * idle, (idle, busy, len(refused))


def test_a_full_queue_answers_429(llada64) -> None:
    long = {"model": MODEL, "prompt": "hello", "max_tokens": 512, "stream": True}
    limits = {"max_queued_requests": 1, "max_queued_tokens": 2000}
    with serve(llada64, max_num_seqs=1, **limits) as (base, _):
        url = base + "/v1/completions"
        # Batches that could never be admitted are a 400, not a 429 to retry.
        batch = {**long, "prompt": ["a", "b"], "max_tokens": 1024, "stream": False}
        error = check_error(httpx.post(url, json=batch), 400, "prompt")
        assert "exceed max_queued_tokens 2000" in error["message"]
        batch = {**GOOD, "prompt": ["a", "b", "c"]}
        error = check_error(httpx.post(url, json=batch), 400, "prompt")
        assert "exceed max_num_seqs + max_queued_requests 2" in error["message"]
        with (
            httpx.Client(timeout=30) as c1,
            httpx.Client(timeout=30) as c2,
            c1.stream("POST", url, json=long) as running,
            c2.stream("POST", url, json=long) as queued,
        ):
            assert running.status_code == queued.status_code == 200
            full = httpx.post(url, json=GOOD)
            error = check_error(full, 429, None)
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
            assert full.headers["retry-after"] == "1"
        deadline = time.monotonic() + 10  # both streams closed: aborted, slots free
        while metrics(base)['foretell_requests_finished_total{reason="aborted"}'] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert httpx.post(url, json=GOOD).status_code == 200


def test_a_request_timeout_aborts_and_frees_the_slot(llada64, reference) -> None:
    long = {"model": MODEL, "prompt": "hello", "max_tokens": 2048}  # 2048 steps: many seconds
    with serve(llada64, {"request_timeout": 1.5}, max_num_seqs=1) as (base, _):
        url = base + "/v1/completions"
        start = time.monotonic()
        error = check_error(httpx.post(url, json=long, timeout=30), 504, None)
        assert error["code"] == "timeout" and time.monotonic() - start < 10
        with httpx.stream("POST", url, json={**long, "stream": True}, timeout=30) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["code"] == "timeout"
        deadline = time.monotonic() + 10
        while metrics(base)['foretell_requests_finished_total{reason="aborted"}'] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        values = metrics(base)
        assert values["foretell_requests_running"] == values["foretell_requests_waiting"] == 0
        (ref,) = reference(["12+34="])
        assert httpx.post(url, json=GOOD).json()["choices"][0]["text"] == ref.text


def test_api_key_origins_and_docs(llada64) -> None:
    app = {"api_key": "s3cret", "allowed_origins": ["http://ok.example"], "enable_docs": False}
    with serve(llada64, app) as (base, _):
        url = base + "/v1/completions"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            response = httpx.post(url, json=GOOD, headers=headers)
            error = check_error(response, 401, None)
            assert error["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        check_error(httpx.get(base + "/v1/models"), 401, None)
        assert httpx.get(base + "/health").status_code == 200  # open, for load balancers
        assert httpx.get(base + "/docs").status_code == 404
        assert httpx.get(base + "/openapi.json").status_code == 404
        client = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()
        key = {"authorization": "Bearer s3cret"}
        ok = httpx.post(url, json=GOOD, headers={**key, "origin": "http://ok.example"})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "http://ok.example"
        preflight = httpx.options(
            url,
            headers={
                "origin": "http://ok.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        response = httpx.post(url, json=GOOD, headers={**key, "origin": "http://evil.example"})
        check_error(response, 403, None)
        # The server's own pages (same origin, by a loopback name) may call it; a DNS-rebinding
        # page is same-origin too, but under its own name.
        own = base.replace("127.0.0.1", "localhost")
        headers = {**key, "origin": own, "host": own.split("//")[1]}
        assert httpx.post(url, json=GOOD, headers=headers).status_code == 200
        rebound = {**key, "origin": "http://evil.example:80", "host": "evil.example:80"}
        check_error(httpx.post(url, json=GOOD, headers=rebound), 403, None)
    with serve(llada64) as (base, _):  # defaults: no key, docs on, no cross-origin calls
        assert httpx.get(base + "/docs").status_code == 200
        assert httpx.post(base + "/v1/completions", json=GOOD).status_code == 200
        preflight = httpx.options(
            base + "/v1/completions",
            headers={"origin": "http://ok.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


def test_a_poisoned_forward_pass_fails_only_its_request(server, reference, poison_forward):
    base, _ = server
    prompts = [f"{i} + {2 * i} =" for i in range(6)]
    refs = reference(prompts)
    seen = {t for out in refs for t in out.prompt_token_ids + out.token_ids}
    model = server[1].engine.model
    poison = next(t for t in range(model.vocab_size) if t not in seen and t != model.mask_token_id)
    poison_forward(model, poison)

    async def main() -> list:
        async with openai.AsyncOpenAI(
            base_url=base + "/v1", api_key="unused", max_retries=0
        ) as client:

            async def one(prompt):
                try:
                    r = await client.completions.create(
                        model=MODEL, prompt=prompt, max_tokens=16, extra_body=EXTRA
                    )
                except openai.InternalServerError as err:
                    return err
                return r.choices[0].text

            bad = [poison, *refs[0].prompt_token_ids]
            return await asyncio.gather(*(one(p) for p in [*prompts[:3], bad, *prompts[3:]]))

    results = asyncio.run(main())
    error = results.pop(3)
    assert isinstance(error, openai.InternalServerError)
    assert "forward pass failed" in str(error) and "injected" not in str(error)
    assert results == [r.text for r in refs]
