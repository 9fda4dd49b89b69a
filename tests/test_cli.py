"""The ``foretell`` command on a saved tiny checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from foretell.cli import main


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_generate_one_prompt(checkpoint, capsys) -> None:
    rc = main(
        [
            "generate",
            "12+34=",
            "--model",
            str(checkpoint),
            "--gen-length",
            "16",
            "--steps",
            "8",
            "--early-commit",
            "prophet",
            "--thresholds",
            "0,0,0",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "committed early: yes, at step 1" in captured.err
    assert captured.out.strip() != ""


def test_generate_on_a_block_causal_model(tmp_path, capsys) -> None:
    """An SDAR checkpoint: steps per block, a stop token id, the model's EOS ignored."""
    from foretell import DecodeParams, Engine
    from tests.block_checkpoints import sdar_checkpoint

    path = str(sdar_checkpoint(tmp_path / "sdar", seed=6)[0])
    base = ["generate", "abc", "--raw", "--model", path, "--gen-length", "12", "--ignore-eos"]
    assert main([*base, "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "(2 steps per block of 4)" in captured.err
    engine = Engine(path)
    full = engine.generate(["abc"], DecodeParams(gen_length=12, ignore_eos=True))[0]
    stop = full.token_ids[5]
    assert main([*base, "--stop-token-id", str(stop)]) == 0
    captured = capsys.readouterr()
    assert "finish: stop" in captured.err
    cut = full.token_ids[: full.token_ids.index(stop) + 1]
    assert captured.out.strip() == engine.tokenizer.decode(cut, skip_special_tokens=True).strip()


def test_generate_with_overlap_gives_the_same_text(checkpoint, tmp_path, monkeypatch) -> None:
    """``--overlap thread`` and ``--overlap process`` with its ``--forward-threads`` reach the
    engine (two groups take turns) and change no token."""
    from foretell.engine import Engine

    built = []
    init = Engine.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        process = self._forward_process
        built.append((self.overlap, None if process is None else process.threads))

    monkeypatch.setattr(Engine, "__init__", recorded)
    rows = [{"prompt": f"{a}+{b}=", "params": {"seed": a}} for a, b in ((12, 34), (5, 6), (7, 80))]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = ["generate", "--file", str(source), "--model", str(checkpoint), "--gen-length", "16"]
    base += ["--steps", "8", "--max-num-seqs", "2"]
    outputs = []
    for extra in ([], ["--overlap", "thread"], ["--overlap", "process", "--forward-threads", "1"]):
        out = tmp_path / f"out{len(extra)}.jsonl"
        assert main([*base, *extra, "--out", str(out)]) == 0
        outputs.append([json.loads(line)["text"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 3
    assert built == [(None, None), ("thread", None), ("process", 1)]


def test_generate_with_a_kv_cache(checkpoint, capsys) -> None:
    """``--kv-cache`` reaches DecodeParams: a cached request runs to the end, and a combination
    the cache does not support is refused naming the field."""
    args = ["generate", "12+34=", "--model", str(checkpoint), "--gen-length", "16"]
    args += ["--block-length", "8", "--steps", "16", "--remasking", "confidence_threshold"]
    assert main([*args, "--kv-cache", "dual"]) == 0
    assert "finish: steps" in capsys.readouterr().err
    assert main([*args, "--kv-cache", "dual", "--cfg-scale", "1"]) == 2
    assert "kv_cache:" in capsys.readouterr().err


def test_generate_jsonl_file(checkpoint, tmp_path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "1+1=", "id": 1})
        + "\n"
        + json.dumps({"prompt": "2+2=", "params": {"seed": 3, "steps": 4}})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    rc = main(
        [
            "generate",
            "--model",
            str(checkpoint),
            "--file",
            str(prompts),
            "--out",
            str(out),
            "--gen-length",
            "8",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["1+1=", "2+2="]
    assert rows[0]["id"] == 1
    assert [r["num_forward_passes"] for r in rows] == [8, 4]
    assert all(r["finish_reason"] == "steps" for r in rows)


def test_generate_file_params_as_json_text_and_unknown_fields(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1=", "params": '{"steps": 2}'}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(checkpoint), "--file", str(prompts), "--gen-length", "8"]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_forward_passes"] == 2
    prompts.write_text(json.dumps({"prompt": "1+1=", "params": {"stepz": 2}}) + "\n")
    assert main(argv) == 2
    assert "line 1: params.stepz: unknown decoding parameter" in capsys.readouterr().err


def test_bad_input_is_a_clear_error(checkpoint, capsys) -> None:
    assert (
        main(
            [
                "generate",
                "1+1=",
                "--model",
                str(checkpoint),
                "--gen-length",
                "10",
                "--block-length",
                "4",
            ]
        )
        == 2
    )
    assert "block_length" in capsys.readouterr().err
    assert main(["generate", "1+1=", "--model", "/no/such/dir"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_python_dash_m(checkpoint) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "foretell",
            "generate",
            "9+9=",
            "--model",
            str(checkpoint),
            "--gen-length",
            "8",
            "--raw",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "forward passes: 8/8" in run.stderr


def test_serve_command_answers_openai_requests(checkpoint) -> None:
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "foretell",
            "serve",
            "--model",
            str(checkpoint),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--max-gen-length",
            "8",
            "--disable-docs",
            "--shutdown-grace",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FORETELL_API_KEY": "k3y"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        body = {"model": "tiny", "prompt": "1+1=", "max_tokens": 8, "steps": 4}
        url, key = f"{base}/v1/completions", {"authorization": "Bearer k3y"}
        reply = httpx.post(url, json=body, headers=key, timeout=30).json()
        assert reply["choices"][0]["foretell"]["num_forward_passes"] == 4
        bad = httpx.post(url, json={**body, "steps": 9}, headers=key, timeout=30)
        assert bad.status_code == 400 and "steps" in bad.text
        long = httpx.post(url, json={**body, "max_tokens": 16}, headers=key, timeout=30)
        assert long.status_code == 400 and long.json()["error"]["param"] == "max_tokens"
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        models = httpx.get(f"{base}/v1/models", headers=key, timeout=5).json()
        assert models["data"][0]["id"] == "tiny"
        assert httpx.get(f"{base}/docs", timeout=5).status_code == 404
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        server.wait(timeout=30)
    log = server.stderr.read()
    assert "Traceback" not in log, log


def test_eval_on_a_small_n(tmp_path, capsys) -> None:
    out, plot = tmp_path / "eval.json", tmp_path / "curve.png"
    args = ["eval", "--n", "4", "--curve-n", "2", "--threads", "1"]
    assert main([*args, "--out", str(out), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    for name in ("Full", "Half", "Prophet", "One step"):
        assert f"{name} / low_confidence" in table and f"{name} / random" in table
    report = json.loads(out.read_text())
    assert report["n"] == 4
    (task,) = report["tasks"].values()
    assert plot.stat().st_size > 0
    assert json.dumps(task)  # the per-configuration table and the curve are plain JSON


def test_eval_of_the_block_diffusion_default(tmp_path, capsys) -> None:
    """The shipped SDAR model on its task: its configurations, its accuracy (the same as the
    batch-1 decoder's in docs/training.md on these prompts), fewer passes with Prophet."""
    out = tmp_path / "eval.json"
    args = ["eval", "--block-default", "--n", "24", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "permute (n=24)" in table
    report = json.loads(out.read_text())
    rows = report["tasks"]["permute"]["table"]
    full, prophet = rows["Full / low_confidence"], rows["Prophet / low_confidence"]
    assert full["accuracy"] >= 0.9 and rows["One step / low_confidence"]["accuracy"] < 0.2
    assert prophet["mean_forward_passes"] < full["mean_forward_passes"]
    assert report["tasks"]["permute"]["convergence"] == {}
    assert main(["eval", "--block-default", "--kv-cache", "dual"]) == 2


def test_eval_refuses_prompts_training_did_not_hold_out(capsys) -> None:
    assert main(["eval", "--n", "501"]) == 2
    assert "n: 501" in capsys.readouterr().err
