"""The shipped default model: it loads through the real checkpoint path and solves held-out
prompts of every shipped task (numbers for the full held-out sets are in docs/training.md)."""

from __future__ import annotations

import json

import pytest

from foretell.models import LLaDAModelLM, load_model
from foretell.models.default import (
    ANSWER_START,
    BLOCK_LENGTH,
    DEFAULT_MODEL_DIR,
    HELDOUT_SEED,
    HELDOUT_SIZE,
    MARKER_POSITION,
    STEPS,
    TASK_NAMES,
    answer_constraints,
    chat_prompt,
)
from foretell.models.default.data import accuracy
from foretell.tasks import get_task, parse_answer

# Six of the first ten held-out prompts (HELDOUT_SEED, never trained on) that the shipped
# checkpoint solves with full decoding and with the dual cache alike (32 steps, blocks of 8), and
# its greedy answers; docs/results.md has the full held-out numbers (2.4% of prompts fail with
# full decoding, 3.2% with the dual cache).
SOLVED = {
    "arrange": {
        "arrange wsp": "pws",
        "arrange uot": "uot",
        "arrange ctx": "txc",
        "arrange rsi": "ris",
        "arrange rxk": "rkx",
        "arrange dca": "adc",
    },
}


@pytest.fixture(scope="module")
def loaded():
    return load_model(DEFAULT_MODEL_DIR)


def test_checkpoint_files_and_size() -> None:
    files = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert total < 25 * 1024**2
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"]


def test_loads_as_llada(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    assert isinstance(model, LLaDAModelLM)
    assert model.mask_token_id == tok.mask_token_id
    assert model.eos_token_ids == (tok.eos_token_id,)
    assert 500_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000


def test_tokenizer_round_trip(loaded) -> None:
    tok = loaded.tokenizer
    text = chat_prompt("3 5 7>38")
    messages = [{"role": "user", "content": "3 5 7>38"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.pad_token_id not in ids
    assert tok.decode(ids) == text
    marker = answer_constraints(tok)
    assert sorted(marker) == list(range(MARKER_POSITION, ANSWER_START - 1))
    assert tok.decode(list(marker.values())) == "answer:"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_solves_heldout_prompts(loaded, name: str) -> None:
    task = get_task(name)
    heldout = {ex.prompt: ex for ex in task.heldout(HELDOUT_SIZE, HELDOUT_SEED)}
    examples = [heldout[p] for p in SOLVED[name]]
    assert examples
    constraints = answer_constraints(loaded.tokenizer)
    model, tok = loaded.model, loaded.tokenizer
    acc, texts = accuracy(
        model, tok, task, examples, steps=STEPS, block_length=BLOCK_LENGTH, constraints=constraints
    )
    assert acc == 1.0, texts
    assert [parse_answer(t) for t in texts] == list(SOLVED[name].values())
    # The same prompts in one step: every position takes its own argmax, and letters repeat.
    one, texts = accuracy(
        model, tok, task, examples, steps=1, block_length=STEPS, constraints=constraints
    )
    assert one == 0.0, texts


@pytest.mark.parametrize("name", TASK_NAMES)
def test_solves_heldout_prompts_with_the_dual_cache(loaded, name: str) -> None:
    """The shipped checkpoint was fine-tuned on views of cached decoding (docs/training.md):
    with Fast-dLLM's dual cache it writes the same answers as with full recomputation."""
    task = get_task(name)
    heldout = {ex.prompt: ex for ex in task.heldout(HELDOUT_SIZE, HELDOUT_SEED)}
    examples = [heldout[p] for p in SOLVED[name]]
    constraints = answer_constraints(loaded.tokenizer)
    acc, texts = accuracy(
        loaded.model,
        loaded.tokenizer,
        task,
        examples,
        steps=STEPS,
        block_length=BLOCK_LENGTH,
        constraints=constraints,
        kv_cache="dual",
    )
    assert acc == 1.0, texts
    assert [parse_answer(t) for t in texts] == list(SOLVED[name].values())
