"""``foretell bench`` on a tiny random model and a tiny workload: the JSON has every field the
docs promise, and every mode ran exactly the same requests. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from foretell.bench.run import MODES, check_same_requests
from foretell.bench.workload import (
    load_workload,
    make_workload,
    request_hash,
    save_workload,
)
from foretell.cli import main
from foretell.params import DecodeParams

MODE_FIELDS = {
    "tokens_per_s",
    "requests_per_s",
    "mean_forward_passes",
    "accuracy",
    "latency_mean_s",
    "latency_p50_s",
    "latency_p99_s",
    "mean_batch_occupancy",
    "overhead_share",
    "request_hash",
    "wall_s",
    "cpu_s",
}


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    plot = out.with_suffix(".png")
    code = main(
        [
            "bench",
            "--model",
            "tiny",
            "--n",
            "6",
            "--batch-size",
            "3",
            "--gen-lengths",
            "16",
            "--block-lengths",
            "8,16",
            "--step-budgets",
            "8,16",
            "--remaskings",
            "low_confidence,random",
            "--no-warmup",
            "--save-workload",
            str(out.with_suffix(".jsonl")),
            "--out",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    assert plot.stat().st_size > 0
    result = json.loads(out.read_text())
    result["_dir"] = out.parent
    return result


def test_json_has_every_mode_and_field(bench_json: dict) -> None:
    assert list(bench_json["modes"]) == list(MODES)
    for name, rec in bench_json["modes"].items():
        assert set(rec) >= MODE_FIELDS, name
        assert rec["n"] == 6
        assert rec["finish_reasons"].get("error", 0) == 0
        assert 0.0 <= rec["accuracy"] <= 1.0
        assert rec["tokens_per_s"] > 0 and rec["mean_forward_passes"] > 0
    assert bench_json["modes"]["reference"]["mean_batch_occupancy"] == 1.0
    assert bench_json["ratios_vs_static"]["static"]["tokens_per_s"] == pytest.approx(1.0)
    assert bench_json["workload"]["n"] == 6
    assert {"torch", "cpu_count", "platform"} <= set(bench_json["machine"])
    assert bench_json["targets"]


def test_per_setting_breakdown_adds_up(bench_json: dict) -> None:
    """Each mode splits its requests by decoding setting, and the parts make the whole."""
    for name, rec in bench_json["modes"].items():
        parts = rec["by_setting"]
        assert sum(cell["n"] for cell in parts.values()) == rec["n"], name
        passes = sum(cell["n"] * cell["mean_forward_passes"] for cell in parts.values())
        assert passes == pytest.approx(rec["n"] * rec["mean_forward_passes"]), name
        right = sum(cell["n"] * cell["accuracy"] for cell in parts.values())
        assert right == pytest.approx(rec["n"] * rec["accuracy"]), name
    labels = set(bench_json["modes"]["static"]["by_setting"])
    assert all(label.startswith("gen ") and " block " in label for label in labels)


def test_every_mode_saw_the_same_requests(bench_json: dict) -> None:
    hashes = {rec["request_hash"] for rec in bench_json["modes"].values()}
    assert hashes == {bench_json["request_hash"]} == {bench_json["workload"]["request_hash"]}
    assert len({rec["prompt_ids_hash"] for rec in bench_json["modes"].values()}) == 1
    # Full-steps modes spend the whole budget; Prophet modes never spend more.
    modes = bench_json["modes"]
    full = modes["static"]["mean_forward_passes"]
    assert modes["reference"]["mean_forward_passes"] == modes["engine"]["mean_forward_passes"]
    assert full == modes["static"]["mean_steps_budget"]
    assert modes["engine-prophet"]["mean_forward_passes"] <= full
    assert (
        modes["engine-prophet"]["mean_forward_passes"]
        == modes["static-prophet"]["mean_forward_passes"]
    )


def test_the_workload_mixes_the_remaskings_asked_for(bench_json: dict) -> None:
    assert set(bench_json["workload"]["remasking"]) == {"low_confidence", "random"}


def test_an_unknown_remasking_is_refused_by_name(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--model", "tiny", "--remaskings", "low_confidence,nope"])
    assert "nope" in capsys.readouterr().err


def test_a_mode_with_other_requests_is_caught() -> None:
    with pytest.raises(RuntimeError, match="different requests"):
        check_same_requests(
            {
                "a": {"request_hash": "1", "prompt_ids_hash": "x"},
                "b": {"request_hash": "2", "prompt_ids_hash": "x"},
            }
        )


def test_workload_is_seeded_prefix_stable_and_round_trips(tmp_path) -> None:
    base = DecodeParams(gen_length=32, block_length=8, steps=32, constraints={16: 5})
    kw = {
        "block_lengths": [8, 16, 32],
        "step_budgets": [32, 16],
        "remaskings": ["low_confidence", "random"],
    }
    small, big = make_workload(base, 10, seed=3, **kw), make_workload(base, 20, seed=3, **kw)
    assert small == big[:10]
    assert make_workload(base, 10, seed=4, **kw) != small
    assert all(r.params.early_commit is None for r in big)
    assert {r.params.block_length for r in big} == {8, 16, 32}
    assert {r.params.remasking for r in big} == {"low_confidence", "random"}
    # One choice draws nothing: the requests are those of a workload without the option.
    one = make_workload(base, 10, seed=3, **{**kw, "remaskings": ["low_confidence"]})
    plain = make_workload(base, 10, seed=3, block_lengths=[8, 16, 32], step_budgets=[32, 16])
    assert one == plain
    path = tmp_path / "w.jsonl"
    save_workload(big, path)
    again = load_workload(path, DecodeParams())
    pairs = [(r.prompt, r.params) for r in big]
    assert request_hash([(r.prompt, r.params) for r in again]) == request_hash(pairs)
    assert [r.task_prompt for r in again] == [r.task_prompt for r in big]


def test_workload_refuses_prompts_training_did_not_hold_out() -> None:
    base = DecodeParams(gen_length=32, block_length=8, steps=32)
    with pytest.raises(ValueError, match="n: 501"):
        make_workload(base, 501)
    assert len(make_workload(base, 3, heldout_seed=7)) == 3  # another stream: no limit


def test_workload_file_refuses_a_policy(tmp_path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "params": {"early_commit": "prophet"}}) + "\n")
    with pytest.raises(ValueError, match="early_commit"):
        load_workload(path, DecodeParams())


def test_a_saved_workload_file_replays_the_same_requests(bench_json: dict) -> None:
    out = bench_json["_dir"] / "replay.json"
    args = ["bench", "--model", "tiny", "--workload", str(bench_json["_dir"] / "bench.jsonl")]
    args += ["--modes", "static,engine-prophet", "--batch-size", "3", "--no-warmup"]
    assert main([*args, "--out", str(out)]) == 0
    replay = json.loads(out.read_text())
    assert replay["request_hash"] == bench_json["request_hash"]
    for mode in ("static", "engine-prophet"):
        assert replay["modes"][mode]["accuracy"] == bench_json["modes"][mode]["accuracy"]
        passes = replay["modes"][mode]["mean_forward_passes"]
        assert passes == bench_json["modes"][mode]["mean_forward_passes"]


def test_scaling_runs_on_prefixes(tmp_path) -> None:
    out = tmp_path / "scaling.json"
    args = ["bench", "--model", "tiny", "--n", "4", "--modes", "engine-prophet", "--no-warmup"]
    args += ["--gen-lengths", "16", "--step-budgets", "8", "--block-lengths", "8"]
    args += ["--scaling", "--scaling-n", "2,4", "--scaling-seqs", "1,2", "--out", str(out)]
    assert main(args) == 0
    scaling = json.loads(out.read_text())["scaling"]
    assert [r["n"] for r in scaling["by_n"]] == [2, 4]
    assert [r["max_num_seqs"] for r in scaling["by_max_num_seqs"]] == [1, 2]
    assert all(r["wall_s"] > 0 for r in scaling["by_n"] + scaling["by_max_num_seqs"])
