"""``--workload-preset varied`` draws what it claims (prompts of 16-512 tokens, gen 64-256 in
blocks of 32 at full steps, a cache mode per request, Prophet on half), keeps those per-request
choices through a saved workload file, and runs them in the engine. No timing is asserted."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from foretell.bench.run import mode_params
from foretell.bench.workload import (
    VARIED_KV_CACHES,
    load_workload,
    make_varied_workload,
    save_workload,
)
from foretell.cli import main
from foretell.params import DecodeParams, Prophet

VOCAB = list(range(4, 60))
BASE = DecodeParams(gen_length=256, block_length=32, steps=256)


def test_varied_preset_draws_what_it_claims() -> None:
    requests = make_varied_workload(BASE, 60, seed=0, prompt_vocab=VOCAB)
    lengths = [len(r.prompt) for r in requests]
    assert min(lengths) >= 16 and max(lengths) <= 512
    assert max(lengths) - min(lengths) > 250  # spread over the range, not one length
    gens = {r.params.gen_length for r in requests}
    assert gens <= set(range(64, 257, 32)) and {64, 256} <= gens
    assert {r.params.block_length for r in requests} == {32}
    assert all(r.params.steps == r.params.gen_length for r in requests)
    assert all(set(r.prompt) <= set(VOCAB) for r in requests)
    assert Counter(r.kv_cache for r in requests) == {c: 20 for c in VARIED_KV_CACHES}
    assert Counter(r.prophet for r in requests) == {True: 30, False: 30}
    # Mixed per request: every cache mode occurs both with and without Prophet.
    assert len({(r.kv_cache, r.prophet) for r in requests}) == 6


def test_varied_preset_is_seeded() -> None:
    a = make_varied_workload(BASE, 12, seed=3, prompt_vocab=VOCAB)
    assert a == make_varied_workload(BASE, 12, seed=3, prompt_vocab=VOCAB)
    assert a != make_varied_workload(BASE, 12, seed=4, prompt_vocab=VOCAB)


def test_per_request_choices_override_the_mode_and_round_trip(tmp_path) -> None:
    requests = make_varied_workload(BASE, 9, seed=0, prompt_vocab=VOCAB)
    path = tmp_path / "varied.jsonl"
    save_workload(requests, path)
    assert load_workload(path, BASE, chat_template=False) == requests
    prophet = Prophet(answer_start=32)
    for mode in ("engine", "engine-prophet"):
        params = mode_params(requests, mode, prophet, kv_cache="dual")
        for r, p in zip(requests, params, strict=True):
            assert p.kv_cache == (None if r.kv_cache == "none" else r.kv_cache)
            assert p.early_commit == (prophet if r.prophet else None)


def test_a_workload_file_refuses_a_bad_per_request_choice(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": [5, 6], "kv_cache": "paged"}) + "\n")
    with pytest.raises(ValueError, match="kv_cache"):
        load_workload(path, BASE, chat_template=False)
    path.write_text(json.dumps({"prompt": [5, 6], "prophet": 1}) + "\n")
    with pytest.raises(ValueError, match="prophet"):
        load_workload(path, BASE, chat_template=False)


def test_varied_preset_runs_in_the_engine(tmp_path) -> None:
    out = tmp_path / "varied.json"
    code = main(
        [
            "bench",
            "--model",
            "random",
            "--random-shape",
            "32,1",
            "--workload-preset",
            "varied",
            "--n",
            "4",
            "--batch-size",
            "4",
            "--no-warmup",
            "--save-workload",
            str(tmp_path / "varied.jsonl"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert list(result["modes"]) == ["engine"]
    run = result["modes"]["engine"]
    assert run["n"] == 4 and set(run["finish_reasons"]) <= {"steps", "early_commit"}
    assert result["workload"]["preset"] == "varied"
    assert result["config"]["prophet"]["thresholds"] == [100.0, 100.0, 0.1]
    assert result["config"]["prophet"]["answer_start"] == 32
    saved = [json.loads(line) for line in (tmp_path / "varied.jsonl").read_text().splitlines()]
    assert {r["kv_cache"] for r in saved} == set(VARIED_KV_CACHES)
    assert sorted(r["prophet"] for r in saved) == [False, False, True, True]
