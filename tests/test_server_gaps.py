"""The validation gaps an outside test found (issue 26), each pinned: a negative alg_temp, chat
top_logprobs 0, --shutdown-grace's values, --threads below 1, the docs' parameter table."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serving import MODEL, serve

from foretell import AsyncEngine, DecodeParams
from foretell.cli import build_parser, main
from foretell.server.limits import shutdown_grace
from foretell.server.protocol import ChatCompletionRequest, CompletionRequest

GOOD = {"model": MODEL, "prompt": "12+34=", "max_tokens": 16, "block_length": 8}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


@pytest.fixture(scope="module")
def server(llada64) -> Iterator[tuple[str, AsyncEngine]]:
    with serve(llada64, max_num_seqs=4, max_num_batched_tokens=2048) as running:
        yield running


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_a_negative_alg_temp_is_refused(server) -> None:
    for value in (-1.0, -1e-9):
        with pytest.raises(ValueError, match=r"^alg_temp: must be >= 0"):
            DecodeParams(alg_temp=value)
        error = error_of(
            httpx.post(server[0] + "/v1/completions", json={**GOOD, "alg_temp": value})
        )
        assert error["param"] == "alg_temp" and error["message"].startswith("alg_temp: ")
    assert DecodeParams(alg_temp=0.0).alg_temp == 0.0
    with pytest.raises(ValueError, match=r"^alg_temp: must be a finite number"):
        DecodeParams(alg_temp=float("nan"))


def test_chat_top_logprobs_0_is_accepted_and_others_blame_top_logprobs(server) -> None:
    url = server[0] + "/v1/chat/completions"
    for neutral in ({"top_logprobs": 0}, {"top_logprobs": 0, "logprobs": False}):
        assert httpx.post(url, json={**CHAT, **neutral}, timeout=30).status_code == 200
    error = error_of(httpx.post(url, json={**CHAT, "top_logprobs": 2}))
    assert error["param"] == "top_logprobs" and error["message"].startswith("top_logprobs: ")
    error = error_of(httpx.post(url, json={**CHAT, "logprobs": True}))
    assert error["param"] == "logprobs"


def test_shutdown_grace_values_and_help() -> None:
    assert shutdown_grace("0") == 0.0  # abort at once
    assert shutdown_grace("2.5") == 2.5
    assert shutdown_grace("-1") is None and shutdown_grace("inf") is None  # no limit
    for bad in ("-2", "nan", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            shutdown_grace(bad)
    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = " ".join(serve_parser.format_help().split())
    assert "0 aborts them at once, -1 (or inf) waits without limit" in text
    args = build_parser().parse_args(["serve", "--shutdown-grace", "-1"])
    assert args.shutdown_grace is None
    assert build_parser().parse_args(["serve"]).shutdown_grace == 10.0


@pytest.mark.parametrize("command", ["serve", "generate", "eval"])
def test_threads_below_1_are_refused(command, capsys) -> None:
    argv = [command, "--threads", "0"] + (["1+1="] if command == "generate" else [])
    assert main(argv) == 2
    assert "threads: must be >= 1, got 0" in capsys.readouterr().err


def test_the_docs_list_every_body_field() -> None:
    """docs/serving.md's parameter tables name every field a body may carry (kv_cache was
    missing)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    section = doc[doc.index("### Parameters") : doc.index("### Responses")]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert "kv_cache" in fields
    assert fields <= documented, sorted(fields - documented)
