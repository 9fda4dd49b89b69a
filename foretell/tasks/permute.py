"""Permute: write the five to eight given letters in any order (the given one included).

Prompt ``permute dcafb=``; generation ``answer: bdfca`` (then EOS). Every order is valid. This is
:mod:`foretell.tasks.arrange` made long enough to span several decoding blocks of a
block-diffusion model (blocks of 4: the letters always fill at least two blocks), so that the
model must read which letters earlier, already-final blocks used. Inside a block the letters
depend on each other as in ``arrange``: each masked position's marginal is spread over the unused
letters, so revealing a block's positions in one step repeats letters, while revealing one per
step lets each see the last. The count varies, so the end of the answer (the EOS) must be
decided too, and prompts of four lengths start the generation at every offset inside a block.

The prompt ends with ``=`` because a block-diffusion model reads prompt and generation as one
stream with nothing else marking where the prompt ends: without it a prompt whose last letter is
``a`` reads like a shorter prompt followed by the marker's ``a`` (the first training run wrote
``nswer:`` after such prompts, docs/training.md).
"""

from __future__ import annotations

import random
import re
import string

from foretell.tasks.base import Example, Task

MIN_COUNT = 5
MAX_COUNT = 8
COMMAND = "permute"
END = "="  # closes the prompt (see the module docstring)


def sample(rng: random.Random) -> Example:
    """A uniform count, distinct random letters, and a uniformly random order of them."""
    letters = rng.sample(string.ascii_lowercase, rng.randint(MIN_COUNT, MAX_COUNT))
    word = "".join(rng.sample(letters, len(letters)))
    return Example(prompt=f"{COMMAND} {''.join(letters)}{END}", answer=word)


def parse_prompt(prompt: str) -> str:
    """The letters of ``"permute <5 to 8 distinct letters>="``; a ValueError otherwise."""
    m = re.match(rf"^{COMMAND} ([a-z]{{{MIN_COUNT},{MAX_COUNT}}}){re.escape(END)}$", prompt)
    if m is None or len(set(m.group(1))) != len(m.group(1)):
        raise ValueError(f"not a {COMMAND} prompt: {prompt!r}")
    return m.group(1)


def check_answer(prompt: str, answer: str) -> bool:
    """Valid iff the answer uses each given letter exactly once."""
    return sorted(answer) == sorted(parse_prompt(prompt))


def key(prompt: str) -> str:
    """The same letters in another order are the same problem."""
    return "".join(sorted(parse_prompt(prompt)))


TASK = Task(
    name="permute",
    sample=sample,
    check_answer=check_answer,
    key=key,
    description="write the five to eight given letters in any order",
)
