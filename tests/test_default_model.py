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
    MARKER_POSITION,
    STEPS,
    TASK_NAMES,
    answer_constraints,
    chat_prompt,
)
from foretell.models.default.data import accuracy
from foretell.tasks import get_task

# Held-out prompts (from HELDOUT_SEED, never trained on) that full decoding solves. The
# shipped checkpoint is weak (about 16% held-out accuracy, docs/training.md): these were picked
# among the first 60 held-out prompts as ones it solves, to pin the loading and decoding path.
SOLVED = {
    "twosum": ["3 6 9 1 2+4", "6 7 1 5 8+7", "3 9 7 2 8+12", "2 5 1 9 7+6"],
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
    heldout = {ex.prompt: ex for ex in task.heldout(250, HELDOUT_SEED)}
    examples = [heldout[p] for p in SOLVED[name]]
    assert examples
    acc, texts = accuracy(
        loaded.model,
        loaded.tokenizer,
        task,
        examples,
        steps=STEPS,
        block_length=BLOCK_LENGTH,
        constraints=answer_constraints(loaded.tokenizer),
    )
    assert acc == 1.0, texts
