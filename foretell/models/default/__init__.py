"""The small LLaDA-architecture model shipped with foretell, and the decoding it was trained for.

The checkpoint in ``weights/`` is a real LLaDA-format directory (``config.json``,
``model.safetensors``, tokenizer files): load it with
``foretell.models.load_model(DEFAULT_MODEL_DIR)``. It was trained by ``python -m training.train``
(from the repository root; ``training/`` is not installed) on the tasks in :mod:`foretell.tasks`;
see docs/training.md for the command, the learning curve and the measured accuracies.

Prompts are the task prompt wrapped in the tokenizer's chat template (``chat_prompt``). Every
generation has the marker ``answer:`` at ``MARKER_POSITION`` (relative to the generation start)
and the answer from ``ANSWER_START`` on, so a decoder can force the marker with constraints and
Prophet's answer region is known.
"""

from __future__ import annotations

from pathlib import Path

from foretell.tasks import (
    ANSWER_LENGTH,
    ANSWER_MARKER,
    ANSWER_START,
    GEN_LENGTH,
    MARKER_POSITION,
    chat_prompt,
)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights"
# Tasks the shipped model was trained on (docs/training.md has its measured accuracy).
TASK_NAMES = ("arrange",)
# Prophet's answer span: the shipped task's answer, three letters from ANSWER_START. Not the whole
# tail: the EOS after the answer is certain from the first step, and its large gaps would lift
# the mean over the tail past the threshold before the answer itself is settled.
PROPHET_ANSWER_LENGTH = 3
# Full decoding as measured in docs/training.md: LLaDA semi-autoregressive blocks, one token
# revealed per step, greedy, low-confidence remasking.
BLOCK_LENGTH = 8
STEPS = GEN_LENGTH
HELDOUT_SEED = 1234  # seed of the held-out prompts (docs/training.md)
# Training drops every problem among the first HELDOUT_SIZE prompts of each task's held-out
# stream; later prompts of that stream may have been trained on (a task has only so many).
HELDOUT_SIZE = 500


def check_heldout_size(n: int, seed: int = HELDOUT_SEED) -> None:
    """Refuse to evaluate on more held-out prompts than training held out."""
    if seed == HELDOUT_SEED and n > HELDOUT_SIZE:
        raise ValueError(
            f"n: {n} held-out prompts asked for, but training held out only the first "
            f"{HELDOUT_SIZE} of each task (HELDOUT_SIZE); later ones may have been trained on"
        )


def answer_constraints(tokenizer: object) -> dict[int, int]:
    """Prophet-style constraints ``{relative position: token id}`` that force the marker."""
    ids = tokenizer.convert_tokens_to_ids(list(ANSWER_MARKER))  # type: ignore[attr-defined]
    return {MARKER_POSITION + i: int(t) for i, t in enumerate(ids)}


__all__ = [
    "ANSWER_LENGTH",
    "ANSWER_MARKER",
    "ANSWER_START",
    "BLOCK_LENGTH",
    "DEFAULT_MODEL_DIR",
    "GEN_LENGTH",
    "HELDOUT_SEED",
    "HELDOUT_SIZE",
    "MARKER_POSITION",
    "PROPHET_ANSWER_LENGTH",
    "STEPS",
    "TASK_NAMES",
    "answer_constraints",
    "chat_prompt",
    "check_heldout_size",
]
