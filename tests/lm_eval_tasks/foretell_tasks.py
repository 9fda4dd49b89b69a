"""Local data and scoring for the harness tasks in this folder (no download, no network).

The prompts are the shipped model's held-out ``arrange`` prompts, the ones ``foretell eval``
reads; the score is foretell's own checker, so both tools judge an answer alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from foretell.tasks import get_task

HERE = Path(__file__).resolve().parent
DATA = HERE / "arrange_heldout.jsonl"


def read_docs() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def load_docs(**_: object) -> datasets.DatasetDict:
    """The JSONL as the harness's ``test`` split (``custom_dataset``; extra kwargs are the
    run's metadata, unused)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_docs())})


def exact_match(doc: dict, results: list[str]) -> dict:
    """1 if the text after ``answer:`` is exactly the given letters in some order (every order
    is a right answer of ``arrange``), as ``foretell eval`` scores it."""
    return {"exact_match": float(get_task("arrange").check(doc["prompt"], results[0]))}


def choices(doc: dict) -> list[str]:
    """One right generation (the held-out answer) and three wrong ones: a letter repeated, a
    letter not given, and the letters with one missing."""
    letters, answer = doc["prompt"].split()[1], doc["answer"]
    other = next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in letters)
    wrong = [answer[0] * 2 + answer[1], answer[:2] + other, answer[:2]]
    return [_generation(w) for w in (answer, *wrong)]


def _generation(answer: str) -> str:
    from foretell.tasks.base import render_generation

    return render_generation(answer, answer)
