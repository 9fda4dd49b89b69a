"""The server on a block-causal model (SDAR): chat template, stop ids, streaming block by
block, and a schema that says what these models read differently."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from serving import MODEL, serve

from foretell import DecodeParams, Engine
from tests.block_checkpoints import sdar_checkpoint

MESSAGES = [{"role": "user", "content": "abc 12"}]


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory):
    return str(sdar_checkpoint(tmp_path_factory.mktemp("sdar-server"), seed=5)[0])


@pytest.fixture(scope="module")
def server(sdar_dir) -> Iterator[tuple[str, object]]:
    with serve(sdar_dir, max_num_seqs=4, max_num_batched_tokens=512) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(sdar_dir) -> Engine:
    return Engine(sdar_dir, dtype="float64")


def test_chat_equals_offline_and_stops_at_a_stop_id(client, offline) -> None:
    full = offline.generate([MESSAGES], DecodeParams(gen_length=24, ignore_eos=True))[0]
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, extra_body={"ignore_eos": True}
    )
    assert answer.choices[0].message.content == full.text
    stop = full.token_ids[9]
    params = DecodeParams(gen_length=24, ignore_eos=True, stop_token_ids=[stop])
    cut = offline.generate([MESSAGES], params)[0]
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop) + 1]
    answer = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=24,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop]},
    )
    assert answer.choices[0].message.content == cut.text
    assert answer.choices[0].finish_reason == "stop"


def test_streaming_comes_block_by_block(client, offline) -> None:
    full = offline.generate([MESSAGES], DecodeParams(gen_length=24, ignore_eos=True))[0]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=24,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    deltas = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta]
    pieces = [d for d in deltas if d]
    assert "".join(pieces) == full.text
    assert len(pieces) >= 3  # the stable text grows as blocks finish, not all at the end


def test_schema_describes_block_decoding_and_refusals_name_the_field(server) -> None:
    base, _ = server
    schema = httpx.get(base + "/openapi.json").json()
    fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "per block" in fields["steps"]["description"]
    assert fields["cfg_scale"]["anyOf"][0]["maximum"] == 0
    assert fields["kv_cache"]["type"] == "null"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
    for extra, param in (
        ({"cfg_scale": 0.5}, "cfg_scale"),
        ({"block_length": 4, "steps": 6}, "steps"),
        ({"remasking": "random"}, "remasking"),
    ):
        response = httpx.post(base + "/v1/chat/completions", json={**body, **extra})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
