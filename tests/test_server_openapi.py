"""The published OpenAPI schema tells the truth: its shape here, and schemathesis (every check)
against a live ``foretell serve`` on loopback, with and without an API key (issue 26)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from server_process import foretell_serve
from serving import MODEL, serve

HERE = Path(__file__).resolve().parent / "schemathesis"
STATUSES = {"400", "403", "404", "408", "413", "415", "429", "500", "503", "504"}


def test_the_schema_describes_bodies_statuses_limits_and_security(llada64) -> None:
    app = {"api_key": "k", "max_prompts_per_request": 5}
    with serve(llada64, app, max_gen_length=24, max_num_batched_tokens=2048) as (base, engine):
        doc = httpx.get(base + "/openapi.json").json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    for path, name in (
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
    ):
        op = paths[path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"} and op["requestBody"]["required"]
        assert set(op["responses"]) == {"200", "401", *STATUSES}
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        error = op["responses"]["429"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/Error"}
        assert op["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the server's --api-key, as 'Authorization: Bearer KEY'",
    }
    assert "security" not in paths["/health"]["get"] and "security" not in paths["/metrics"]["get"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [
        "text/plain; version=0.0.4"
    ]
    completion = schemas["CompletionRequest"]
    assert completion["required"] == ["model", "prompt"]
    assert completion["additionalProperties"] is False
    fields = completion["properties"]
    assert fields["model"]["enum"] == [MODEL]
    assert fields["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 24}
    assert fields["prompt"]["anyOf"][1]["maxItems"] == 5
    token = fields["prompt"]["anyOf"][2]["items"]
    assert token["maximum"] == engine.engine.model.vocab_size - 1
    assert token["not"] == {"const": engine.engine.mask_token_id}
    assert "origin" not in fields["remasking"]["anyOf"][0]["enum"]  # a LLaDA model
    assert fields["max_tokens"]["x-cross-field"] and "x-cross-field" not in fields["top_p"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["top_logprobs"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 0}
    assert schemas["Error"]["properties"]["error"]["required"] == [
        "message",
        "type",
        "param",
        "code",
    ]
    with serve(llada64) as (base, _):  # no key: no scheme, no 401
        doc = httpx.get(base + "/openapi.json").json()
    assert "securitySchemes" not in doc["components"]
    assert "401" not in doc["paths"]["/v1/completions"]["post"]["responses"]
    assert "security" not in doc["paths"]["/v1/completions"]["post"]


def test_schemathesis_finds_no_failure_with_and_without_a_key(tiny_checkpoint, tmp_path) -> None:
    """Every schemathesis check, bounded examples, a fixed seed; both servers and both runs at
    once (about a minute on 2 cores). A failure prints schemathesis' report."""
    serve_args = [
        "--model",
        str(tiny_checkpoint),
        "--served-model-name",
        "tiny",
        "--max-gen-length",
        "8",
        "--max-model-len",
        "48",
        "--threads",
        "1",
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "foretell_hooks",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    with (
        foretell_serve(serve_args) as open_server,
        foretell_serve([*serve_args, "--api-key", "s3cret"]) as keyed_server,
    ):
        runs = []
        for served, headers in (
            (open_server, []),
            (keyed_server, ["-H", "Authorization: Bearer s3cret"]),
        ):
            command = [
                *(sys.executable, "-m", "schemathesis.cli"),
                *("--config-file", str(HERE / "schemathesis.toml"), "run"),
                served.base + "/openapi.json",
                *headers,
                *("--checks", "all", "--max-examples", "15", "--seed", "26", "--workers", "1"),
                *("--request-timeout", "30", "--generation-database", "none", "--no-color"),
            ]
            runs.append(
                subprocess.Popen(
                    command,
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [run.communicate(timeout=400)[0] for run in runs]
        logs = [open_server.log_text(), keyed_server.log_text()]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output
        assert "No issues found" in output, output
        assert "Operations:       5 selected / 5 total" in output, output
    for log in logs:
        assert "Traceback" not in log, log[-5000:]
