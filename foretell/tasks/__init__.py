"""Synthetic prompt -> answer tasks with exact checkers, for training and evaluating the default
models (see docs/training.md): ``arrange`` for the LLaDA default, ``permute`` for the
block-diffusion (SDAR) one.

Each task module defines ``sample(rng) -> Example`` and ``check_answer(prompt, answer)``; the
:class:`Task` wrapper adds ``check(example_or_prompt, generated_text)``, which parses the
answer after the fixed ``answer:`` marker, and the seeded train / held-out split.
"""

from __future__ import annotations

from foretell.tasks import arrange, countdown, permute, pick, shuffle, twosum
from foretell.tasks.base import (
    ALPHABET,
    ANSWER_LENGTH,
    ANSWER_MARKER,
    ANSWER_START,
    CHAT_TEMPLATE,
    GEN_LENGTH,
    MARKER_POSITION,
    Example,
    Task,
    chat_prompt,
    parse_answer,
    render_generation,
)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (arrange.TASK, countdown.TASK, permute.TASK, pick.TASK, shuffle.TASK, twosum.TASK)
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; a ValueError lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


__all__ = [
    "ALPHABET",
    "ANSWER_LENGTH",
    "ANSWER_MARKER",
    "ANSWER_START",
    "CHAT_TEMPLATE",
    "GEN_LENGTH",
    "MARKER_POSITION",
    "TASKS",
    "Example",
    "Task",
    "chat_prompt",
    "get_task",
    "parse_answer",
    "render_generation",
]
