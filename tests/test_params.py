"""DecodeParams and Prophet refuse bad values with a ValueError naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from foretell import DecodeParams, Prophet


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gen_length": 0}, "gen_length"),
        ({"block_length": 0}, "block_length"),
        ({"steps": 0}, "steps"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": "7"}, "stop_token_ids"),
        ({"minimal_topk": 0}, "minimal_topk"),
        ({"eos_early_stop": 1}, "eos_early_stop"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"temperature": -0.1}, "temperature"),
        ({"remasking": "lowest_confidence"}, "remasking"),
        ({"threshold": 0.0, "remasking": "confidence_threshold"}, "threshold"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
        ({"gen_length": 32, "constraints": {32: 5}}, "constraints"),
        ({"constraints": {-1: 5}}, "constraints"),
        ({"constraints": {3: ""}}, "constraints"),
        ({"early_commit": "oracle"}, "early_commit"),
        ({"early_commit": {"thresholds": (2.0, 5.0, 7.5)}}, "early_commit.thresholds"),
        ({"gen_length": 32, "early_commit": Prophet(answer_start=40)}, "answer_start"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"eps": 1.0}, "eps"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DecodeParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gen_length": 64, "block_length": 24}, "block_length"),
        ({"gen_length": 64, "block_length": 16, "steps": 30}, "steps"),
        ({"gen_length": 16, "steps": 32}, "steps"),
    ],
)
def test_canvas_block_rules_are_checked_for_llada_and_dream(kwargs: dict, field: str) -> None:
    """Blocks tiling the generation is LLaDA's and Dream's rule (checked when the engine
    builds their requests); a block-causal model counts steps per block instead."""
    params = DecodeParams(**kwargs)
    with pytest.raises(ValueError, match=field):
        params.check_canvas_blocks()


def test_block_models_read_steps_per_block_and_keep_unset_defaults() -> None:
    p = DecodeParams(gen_length=20)
    assert p.unset_fields == {"steps", "block_length"}
    assert (p.steps, p.block_length) == (20, 20)  # LLaDA's defaults
    block = p.for_block_model(4)
    assert (block.block_length, block.steps, block.unset_fields) == (4, 4, frozenset())
    assert p.replace(seed=1).for_block_model(8).steps == 8  # still unset after a replace
    assert p.override(gen_length=40).for_block_model(8).block_length == 8
    assert DecodeParams(gen_length=20, steps=2).for_block_model(4).steps == 2
    with pytest.raises(ValueError, match="steps"):
        DecodeParams(gen_length=20, steps=6, block_length=4).for_block_model(32)
    assert DecodeParams(stop_token_ids=[3, 5]).stop_token_ids == (3, 5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"thresholds": (3.0, 5.0, 1.0)}, "thresholds"),
        ({"thresholds": (3.0, float("nan"), 1.0)}, "thresholds"),
        ({"thresholds": (3.0, 2.0)}, "thresholds"),
        ({"bounds": (0.7, 0.3)}, "bounds"),
        ({"bounds": (0.0, 0.5)}, "bounds"),
        ({"answer_length": 0}, "answer_length"),
        ({"answer_start": -2}, "answer_start"),
        ({"statistic": "median"}, "statistic"),
    ],
)
def test_invalid_prophet_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Prophet(**kwargs)


def test_defaults_follow_the_references() -> None:
    p = DecodeParams(gen_length=256, block_length=32, steps=256, early_commit="prophet")
    assert p.steps_per_block == 32 and p.num_blocks == 8
    assert p.early_commit == Prophet(thresholds=(7.5, 5.0, 2.5), bounds=(0.33, 0.67))
    assert DecodeParams(gen_length=48).steps == 48
    assert DecodeParams(gen_length=48).block_length == 48
    assert DecodeParams(remasking="maskgit_plus").remasking == "low_confidence"
    assert DecodeParams(remasking="topk_margin").remasking == "margin"
    assert DecodeParams(stop="\n").stop == ("\n",)


def test_prophet_phases_by_progress() -> None:
    policy = Prophet()
    steps = 30
    phases = [policy.threshold(step, steps) for step in range(1, steps + 1)]
    # p = step / steps: < 0.33 -> 7.5 (steps 1-9), < 0.67 -> 5.0 (10-20), else 2.5 (21-30).
    assert phases == [7.5] * 9 + [5.0] * 11 + [2.5] * 10


def test_prophet_thresholds_over_a_batch_are_its_thresholds() -> None:
    """``Prophet.thresholds_at`` (the batched step's array form) gives every policy's own
    ``threshold`` at every step of its budget, at the bounds' edges too."""
    policies = [
        Prophet(),
        Prophet((9.0, 4.0, 1.0), bounds=(0.25, 0.5)),
        Prophet((3.0, 3.0, 2.0), bounds=(0.5, 0.5), statistic="min"),
        Prophet((6.0, 2.0, 0.5), bounds=(0.1, 1.0)),
    ]
    for steps in (1, 3, 7, 30, 64):
        for step in range(1, steps + 1):
            columns = np.array([p.columns() for p in policies])
            batch = Prophet.thresholds_at(columns, np.full(4, step), np.full(4, steps))
            assert batch.tolist() == [p.threshold(step, steps) for p in policies]
    assert [p.columns()[5] for p in policies] == [1.0, 1.0, 0.0, 1.0]


def test_override_of_the_length_keeps_defaults_as_defaults() -> None:
    """Unset steps / block_length follow a new gen_length, as a fresh DecodeParams would;
    given ones are capped (steps) or replaced by one block (block_length), as before."""
    grown = DecodeParams(gen_length=64).override(gen_length=128)
    assert (grown.steps, grown.block_length) == (128, 128)
    assert grown == DecodeParams(gen_length=128)
    given = DecodeParams(gen_length=64, steps=32, block_length=16).override(gen_length=128)
    assert (given.steps, given.block_length) == (32, 128)
    shrunk = DecodeParams(gen_length=64, steps=64).override(gen_length=16)
    assert shrunk.steps == 16
