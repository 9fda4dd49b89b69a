"""Arrange: write three given letters in any order (the given one included).

Prompt ``arrange dca``; generation ``adc`` (the arrangement, in the scratch region), then
``answer: adc``. All six orders are valid. The letters depend on each other exactly as in
:mod:`foretell.tasks.shuffle` (each position's marginal is spread over the letters, so one-step
decoding repeats letters), without shuffle's extra rule that the given order is wrong: a model
only needs exclusion, not also to steer away from one particular order.
"""

from __future__ import annotations

import random
import re
import string

from foretell.tasks.base import Example, Task

COUNT = 3


def distinct_letters(rng: random.Random) -> list[str]:
    """``COUNT`` distinct random letters: the problem of ``arrange`` and ``shuffle``."""
    return rng.sample(string.ascii_lowercase, COUNT)


def parse_letters(prompt: str, command: str) -> str:
    """The letters of ``"<command> <COUNT distinct letters>"``; a ValueError names the task."""
    m = re.match(rf"^{command} ([a-z]{{{COUNT}}})$", prompt)
    if m is None or len(set(m.group(1))) != COUNT:
        article = "an" if command[0] in "aeiou" else "a"
        raise ValueError(f"not {article} {command} prompt: {prompt!r}")
    return m.group(1)


def sample(rng: random.Random) -> Example:
    """Distinct random letters; the shown answer is a uniformly random order of them."""
    letters = distinct_letters(rng)
    word = "".join(rng.sample(letters, COUNT))
    return Example(prompt="arrange " + "".join(letters), answer=word, scratch=word)


def parse_prompt(prompt: str) -> str:
    return parse_letters(prompt, "arrange")


def check_answer(prompt: str, answer: str) -> bool:
    """Valid iff the answer uses each given letter exactly once."""
    return sorted(answer) == sorted(parse_prompt(prompt))


def key(prompt: str) -> str:
    """The same letters in another order are the same problem."""
    return "".join(sorted(parse_prompt(prompt)))


TASK = Task(
    name="arrange",
    sample=sample,
    check_answer=check_answer,
    key=key,
    description="write the three given letters in any order",
)
