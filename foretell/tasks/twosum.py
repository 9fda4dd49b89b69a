"""Two-sum: pick two of five distinct digits (1-9) that add up to the target.

Prompt ``4 2 7 9 5+11``; generation ``11-4=7`` (worked step), then ``answer: 4+7``. Both
orders and every other matching pair are valid, so, as in Countdown, the answer tokens must agree
with each other and with the scratch.
"""

from __future__ import annotations

import random
import re

from foretell.tasks.base import Example, Task

NUMBERS = range(1, 10)
COUNT = 5
_PROMPT = re.compile(r"^((?:\d+ ){4}\d+)\+(\d+)$")
_ANSWER = re.compile(r"^(\d+)\+(\d+)$")


def sample(rng: random.Random) -> Example:
    """Five distinct digits and the sum of a random pair; the answer is a random valid pair."""
    shown = rng.sample(NUMBERS, COUNT)
    a, b = rng.sample(shown, 2)
    target = a + b
    pairs = [(p, target - p) for p in shown if target - p in shown and target - p != p]
    first, second = rng.choice(pairs)
    prompt = " ".join(map(str, shown)) + f"+{target}"
    return Example(prompt=prompt, answer=f"{first}+{second}", scratch=f"{target}-{first}={second}")


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not a two-sum prompt: {prompt!r}")
    return [int(n) for n in m.group(1).split()], int(m.group(2))


def check_answer(prompt: str, answer: str) -> bool:
    """Valid iff ``a+b`` names two different listed numbers whose sum is the target."""
    numbers, target = parse_prompt(prompt)
    m = _ANSWER.match(answer)
    if m is None or m.group(1).startswith("0") or m.group(2).startswith("0"):
        return False
    a, b = int(m.group(1)), int(m.group(2))
    return a != b and a in numbers and b in numbers and a + b == target


def key(prompt: str) -> str:
    return prompt


TASK = Task(
    name="twosum",
    sample=sample,
    check_answer=check_answer,
    key=key,
    description="name two of five listed numbers that add up to the target",
)
