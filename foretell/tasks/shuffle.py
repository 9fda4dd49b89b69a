"""Shuffle: write three given letters in a new order.

Prompt ``shuffle dca``; generation ``adc`` (the arrangement, worked out in the scratch region),
then ``answer: adc``. Any order except the given one is valid, so 5 answers are right and the
letters depend on each other: each position's marginal is spread over the three letters, and
one-step decoding, which takes every position's argmax independently, repeats letters. Step by
step decoding commits one letter and the next position excludes it. The model only needs
positional attention and exclusion, which a sub-million-parameter model learns in minutes
(docs/training.md), unlike the arithmetic search of ``twosum``.
"""

from __future__ import annotations

import random

from foretell.tasks.arrange import distinct_letters, parse_letters
from foretell.tasks.base import Example, Task


def sample(rng: random.Random) -> Example:
    """Distinct random letters; the shown answer is a uniform order other than the given one."""
    letters = distinct_letters(rng)
    order = letters[:]
    while order == letters:
        rng.shuffle(order)
    word = "".join(order)
    return Example(prompt="shuffle " + "".join(letters), answer=word, scratch=word)


def parse_prompt(prompt: str) -> str:
    return parse_letters(prompt, "shuffle")


def check_answer(prompt: str, answer: str) -> bool:
    """Valid iff the answer uses each given letter exactly once, in another order."""
    letters = parse_prompt(prompt)
    return answer != letters and sorted(answer) == sorted(letters)


def key(prompt: str) -> str:
    """The same letters in another order are the same problem."""
    return "".join(sorted(parse_prompt(prompt)))


TASK = Task(
    name="shuffle",
    sample=sample,
    check_answer=check_answer,
    key=key,
    description="write the three given letters in any other order",
)
