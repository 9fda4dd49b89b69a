"""benchmarks/kv_cache_accuracy.py: the other-orders prompt set and the paired counts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from foretell.models.default import HELDOUT_SEED
from foretell.tasks import get_task

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_cache_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kv_cache_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_other_orders_are_unseen_prompts_of_the_same_problems(bench) -> None:
    task = get_task("arrange")
    heldout = task.heldout(20, HELDOUT_SEED)
    orders = bench.other_orders(heldout, "arrange")
    assert len(orders) == 5 * len(heldout)
    assert not {ex.prompt for ex in orders} & {ex.prompt for ex in task.heldout(500, HELDOUT_SEED)}
    for i, ex in enumerate(heldout):
        mine = orders[5 * i : 5 * i + 5]
        assert len({o.prompt for o in mine}) == 5
        assert {task.key(o.prompt) for o in mine} == {task.key(ex.prompt)}


def test_other_orders_refuses_other_tasks(bench) -> None:
    with pytest.raises(ValueError, match="--prompts other-orders"):
        bench.other_orders(get_task("countdown").heldout(2, HELDOUT_SEED), "countdown")


def test_paired_gap_counts_only_discordant_prompts(bench) -> None:
    uncached = [True] * 6 + [False] * 4
    cached = [True, True, True, False, False, False, True, False, False, False]
    gap = bench.paired_gap(uncached, cached)
    assert gap["right_only_uncached"] == 3 and gap["right_only_cached"] == 1
    assert gap["points_vs_uncached"] == pytest.approx(-20.0)
    assert gap["points_standard_error"] == pytest.approx(20.0)  # sqrt(4) / 10
    assert bench.paired_gap(uncached, uncached)["points_standard_error"] == 0.0
    with pytest.raises(ValueError, match="same non-empty prompts"):
        bench.paired_gap(uncached, cached[:5])


def test_rows_per_rule_policy_and_cache(bench, tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    threads = torch.get_num_threads()
    args = ["--n", "2", "--block-lengths", "8", "--prompts", "other-orders", "--prophet"]
    args += ["--remasking", "low_confidence,random", "--threads", str(threads)]
    assert bench.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_prompts"] == 10 and result["model"]["weights_sha256"]
    rows = result["rows"]
    assert [(r["remasking"], r["policy"], r["kv_cache"]) for r in rows] == [
        (rule, policy, cache)
        for rule in ("low_confidence", "random")
        for policy in ("Full", "Prophet")
        for cache in (None, "prefix", "dual")
    ]
    for i, row in enumerate(rows):
        uncached = rows[i - i % 3]
        assert row["n_prompts"] == 10
        gap = 100 * (row["accuracy"] - uncached["accuracy"])
        assert row["points_vs_uncached"] == pytest.approx(gap)
    assert rows[3]["mean_forward_passes"] < rows[0]["mean_forward_passes"]  # Prophet stops early
