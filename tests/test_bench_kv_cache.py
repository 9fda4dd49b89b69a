"""``foretell bench --kv-cache`` and ``foretell eval --kv-cache`` on tiny inputs: every (mode,
cache) run is in the JSON with its cache numbers, every run saw the same requests, the random
long-prompt workload is what it says, and bad values are refused by name. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from foretell.bench.run import parse_kv_caches, run_name
from foretell.bench.setup import random_llada
from foretell.bench.workload import load_workload, make_workload
from foretell.cli import main
from foretell.params import DecodeParams

RUNS = ["engine", "engine+prefix", "engine+dual"]
PROPHET_RUNS = ["engine-prophet", "engine-prophet+prefix", "engine-prophet+dual"]


@pytest.fixture(scope="module")
def cache_json(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_kv") / "bench.json"
    args = ["bench", "--model", "tiny", "--n", "4", "--batch-size", "2", "--no-warmup"]
    args += ["--gen-lengths", "32", "--block-lengths", "8", "--step-budgets", "32"]
    args += ["--modes", "engine,engine-prophet", "--kv-cache", "none,prefix,dual"]
    assert main([*args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _whole_pages(tokens: int, page: int) -> int:
    """Positions of the pages that hold ``tokens`` positions."""
    return -(-tokens // page) * page


def test_every_mode_runs_with_every_cache(cache_json: dict) -> None:
    runs = cache_json["modes"]
    assert list(runs) == RUNS + PROPHET_RUNS
    assert cache_json["config"]["kv_caches"] == ["none", "prefix", "dual"]
    for name, rec in runs.items():
        assert rec["name"] == name == run_name(rec["mode"], rec["kv_cache"])
        assert rec["finish_reasons"].get("error", 0) == 0, name
        assert rec["kv_cache_bytes_after"] == 0, name  # every cache freed
        assert rec["kv_cache_bytes_per_token"] > 0
        if rec["kv_cache"] is None:
            assert rec["kv_cache_peak_bytes"] == 0, name
        else:
            # At least one request's whole canvas of pages, at most B of them.
            per_token, page = rec["kv_cache_bytes_per_token"], rec["kv_page_size"]
            one = per_token * _whole_pages(rec["prompt_tokens"]["min"] + 32, page)
            assert one <= rec["kv_cache_peak_bytes"], name
            big = per_token * _whole_pages(rec["prompt_tokens"]["max"] + 32, page)
            assert rec["kv_cache_peak_bytes"] <= 2 * big, name
    # Same requests (the hash leaves out what the mode sets: policy and cache).
    assert {rec["request_hash"] for rec in runs.values()} == {cache_json["request_hash"]}


def test_a_cache_runs_fewer_tokens_per_request_pass(cache_json: dict) -> None:
    """Full canvas > block to the end (prefix) > the block alone (dual), per request per pass,
    and the totals the ratios are made of agree with the records."""
    runs = cache_json["modes"]
    tokens = [runs[name]["forward_tokens_per_sequence_pass"] for name in RUNS]
    assert tokens[0] > tokens[1] > tokens[2]
    full = runs["engine"]
    assert full["forward_tokens_per_sequence_pass"] == pytest.approx(
        full["prompt_tokens"]["mean"] + 32
    )
    ratios = cache_json["ratios_vs_uncached"]
    assert set(ratios) == {"engine+prefix", "engine+dual", *PROPHET_RUNS[1:]}
    for name, rel in ratios.items():
        base = runs[runs[name]["mode"]]
        assert rel["tokens_in_passes"] == pytest.approx(
            runs[name]["tokens_in_passes"] / base["tokens_in_passes"]
        )
        assert rel["tokens_per_s"] == pytest.approx(
            runs[name]["tokens_per_s"] / base["tokens_per_s"]
        )


def test_cache_targets_are_reported(cache_json: dict) -> None:
    targets = {t["target"]: t for t in cache_json["targets"]}
    for name in ("engine+prefix", "engine+dual", "engine-prophet+prefix", "engine-prophet+dual"):
        mode = name.split("+")[0]
        t = targets[f"{name} / {mode}, generated tokens/s"]
        assert t["goal"] == (">= 4.0" if name.endswith("dual") else ">= 2.0")
        rel = cache_json["ratios_vs_uncached"][name]["tokens_per_s"]
        assert t["value"] == pytest.approx(rel)
        assert t["met"] == (t["value"] >= float(t["goal"].split()[-1]))


def test_random_model_long_prompt_workload(tmp_path) -> None:
    """``--model random``: the shipped architecture at a given shape, random token prompts in
    the asked range, full steps, Prophet's span at the start of the last block."""
    out, saved = tmp_path / "random.json", tmp_path / "random.jsonl"
    args = ["bench", "--model", "random", "--random-shape", "64,1", "--n", "3", "--no-warmup"]
    args += ["--prompt-tokens", "10,20", "--gen-lengths", "16", "--block-lengths", "8"]
    args += ["--modes", "engine-prophet", "--kv-cache", "dual", "--batch-size", "2"]
    assert main([*args, "--save-workload", str(saved), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rec = result["modes"]["engine-prophet+dual"]
    assert rec["accuracy"] is None and rec["finish_reasons"].get("error", 0) == 0
    assert 10 <= rec["prompt_tokens"]["min"] <= rec["prompt_tokens"]["max"] <= 20
    assert rec["mean_steps_budget"] == 16  # full steps
    assert rec["early_commit"]["answer_start"] == 8
    assert result["model"]["hidden_size"] == 64 and result["model"]["num_layers"] == 1
    assert result["workload"]["drawn"]["prompts"] == "random token ids, 10-20 tokens"
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert all(isinstance(r["prompt"], list) and r["task"] is None for r in lines)


def test_random_prompts_are_seeded_and_prefix_stable() -> None:
    base = DecodeParams(gen_length=16, block_length=8, steps=16)
    vocab = [5, 6, 7]
    kw = {"prompt_tokens": (4, 9), "prompt_vocab": vocab}
    small, big = make_workload(base, 5, seed=1, **kw), make_workload(base, 9, seed=1, **kw)
    assert small == big[:5]
    assert make_workload(base, 5, seed=2, **kw) != small
    assert all(4 <= len(r.prompt) <= 9 and set(r.prompt) <= set(vocab) for r in big)
    assert all(r.task is None for r in big)
    with pytest.raises(ValueError, match="prompt_tokens"):
        make_workload(base, 2, prompt_tokens=(9, 4), prompt_vocab=vocab)


def test_random_llada_has_the_shipped_architecture() -> None:
    loaded = random_llada(96, 2)
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.intermediate_size) == (96, 2, 288)
    assert cfg.num_heads == cfg.num_kv_heads == 3  # heads of 32, as the shipped model's
    assert loaded.model.family == "llada"
    with pytest.raises(ValueError, match="random_shape"):
        random_llada(100, 2)


def test_bad_cache_names_are_refused_by_name(capsys, tmp_path) -> None:
    with pytest.raises(ValueError, match="kv_cache: unknown \\['bogus'\\]"):
        parse_kv_caches("none,bogus")
    assert parse_kv_caches("none,dual,dual") == [None, "dual"]
    assert main(["bench", "--model", "tiny", "--kv-cache", "bogus"]) == 2
    assert "kv_cache" in capsys.readouterr().err
    assert main(["eval", "--n", "2", "--kv-cache", "paged"]) == 2
    assert "kv_cache" in capsys.readouterr().err
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "params": {"kv_cache": "dual"}}) + "\n")
    with pytest.raises(ValueError, match=r"params\.kv_cache: set by the mode"):
        load_workload(path, DecodeParams())


def test_eval_with_a_cache(tmp_path, capsys) -> None:
    out = tmp_path / "eval.json"
    args = ["eval", "--n", "3", "--curve-n", "1", "--threads", "1", "--kv-cache", "none,dual"]
    assert main([*args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "cache minus uncached" in table
    report = json.loads(out.read_text())
    assert report["kv_caches"] == ["none", "dual"]
    (task,) = report["tasks"].values()
    labels = set(task["table"])
    for name in ("Full", "Half", "Prophet"):
        for remasking in ("low_confidence", "random"):
            assert f"{name} / {remasking} / dual cache" in labels
    assert not any(label.startswith("One step") and "cache" in label for label in labels)
    deltas = {d["configuration"]: d for d in report["cache_deltas"]}
    assert len(deltas) == 6
    d = deltas["Full / low_confidence / dual cache"]
    full, cached = task["table"]["Full / low_confidence"], task["table"][d["configuration"]]
    assert d["points"] == pytest.approx(100 * (cached["accuracy"] - full["accuracy"]))
    assert cached["kv_cache"] == "dual" and full["kv_cache"] is None


@pytest.mark.parametrize(("cached", "within"), [(0.956, True), (0.976, True), (0.954, False)])
def test_cache_deltas_count_exactly_one_point_as_within(cached, within) -> None:
    from foretell.evaluation import cache_deltas

    row = {"mean_forward_passes": 32.0}
    table = {
        "Full / low_confidence": {**row, "accuracy": 0.966, "kv_cache": None},
        "Full / low_confidence / dual cache": {**row, "accuracy": cached, "kv_cache": "dual"},
    }
    (delta,) = cache_deltas({"tasks": {"arrange": {"table": table}}})
    assert delta["within_1_point"] is within
    assert delta["points"] == pytest.approx(100 * (cached - 0.966))
