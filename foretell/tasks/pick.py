"""Pick: name any one of three listed words.

Prompt ``pick qmfa lore zibt``; generation ``answer: lore`` (no worked steps). Every listed word
is valid, so the answer's four tokens depend on each other: one-step decoding reveals each
position from its own marginal, which is a mixture over the three words, and spells a word
that is not in the list (``qobt``); step-by-step decoding commits the first letter and the rest
follows. This is the "several valid answers" failure that makes decoding policies matter, with
no arithmetic for a small model to get wrong.
"""

from __future__ import annotations

import random
import re
import string

from foretell.tasks.base import Example, Task

COUNT = 3
WORD_LENGTH = 4
_PROMPT = re.compile(r"^pick ([a-z]+(?: [a-z]+)*)$")


def sample(rng: random.Random) -> Example:
    """Three distinct random words; the shown answer is a uniformly chosen one of them."""
    words: list[str] = []
    while len(words) < COUNT:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(WORD_LENGTH))
        if word not in words:
            words.append(word)
    return Example(prompt="pick " + " ".join(words), answer=rng.choice(words))


def parse_prompt(prompt: str) -> list[str]:
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not a pick prompt: {prompt!r}")
    return m.group(1).split()


def check_answer(prompt: str, answer: str) -> bool:
    """Valid iff the answer is exactly one of the listed words."""
    return answer in parse_prompt(prompt)


def key(prompt: str) -> tuple[str, ...]:
    """The same words in another order are the same problem."""
    return tuple(sorted(parse_prompt(prompt)))


TASK = Task(
    name="pick",
    sample=sample,
    check_answer=check_answer,
    key=key,
    description="name any one of three listed words",
)
