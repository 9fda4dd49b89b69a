"""Countdown with three numbers: combine 1-9 digits with + - * to reach a target.

Prompt ``3 5 7>38``; generation ``5*7=35,35+3=38`` (worked steps), then ``answer: 5*7+3``.
Many answers are valid (``3+5*7``, ``7*5+3``...): the checker evaluates the expression, so the
answer tokens depend on each other and one-step decoding, which picks every token
independently, mixes different solutions.
"""

from __future__ import annotations

import random
import re

from foretell.tasks.arith import apply, evaluate, render
from foretell.tasks.base import Example, Task

NUMBERS = range(1, 10)
MAX_VALUE = 99  # intermediate results and targets stay within two digits
_PROMPT = re.compile(r"^(\d+) (\d+) (\d+)>(\d+)$")


def sample(rng: random.Random) -> Example:
    """A random solvable instance; the shown numbers are shuffled apart from the solution."""
    while True:
        x, y, z = (rng.choice(NUMBERS) for _ in range(3))
        o1, o2 = rng.choice("+-*"), rng.choice("+-*")
        flip = rng.random() < 0.5  # second step as "z o2 r1" instead of "r1 o2 z"
        r1 = apply(x, o1, y)
        r2 = apply(z, o2, r1) if flip else apply(r1, o2, z)
        if not (0 <= r1 <= MAX_VALUE and 0 <= r2 <= MAX_VALUE):
            continue
        inner = f"{x}{o1}{y}"
        if flip:
            expr = render(o2, str(z), None, inner, o1)
            scratch = f"{inner}={r1},{z}{o2}{r1}={r2}"
        else:
            expr = render(o2, inner, o1, str(z), None)
            scratch = f"{inner}={r1},{r1}{o2}{z}={r2}"
        shown = [x, y, z]
        rng.shuffle(shown)
        prompt = f"{shown[0]} {shown[1]} {shown[2]}>{r2}"
        return Example(prompt=prompt, answer=expr, scratch=scratch)


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not a countdown prompt: {prompt!r}")
    *numbers, target = (int(g) for g in m.groups())
    return numbers, target


def check_answer(prompt: str, answer: str) -> bool:
    """Valid iff the expression uses each given number exactly once and equals the target."""
    numbers, target = parse_prompt(prompt)
    if not answer or set(answer) - set("0123456789+-*()"):
        return False
    result = evaluate(answer)
    if result is None:
        return False
    value, literals = result
    return value == target and sorted(literals) == sorted(numbers)


def key(prompt: str) -> tuple[tuple[int, ...], int]:
    """The same numbers in another order are the same problem."""
    numbers, target = parse_prompt(prompt)
    return tuple(sorted(numbers)), target


TASK = Task(
    name="countdown",
    sample=sample,
    check_answer=check_answer,
    key=key,
    description="reach the target from three digits with + - * (each used once)",
)
