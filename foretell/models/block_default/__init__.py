"""The small SDAR-architecture (block-diffusion) model shipped with foretell, and its decoding.

Why it exists: the LLaDA default (:mod:`foretell.models.default`) decodes with full attention,
so it cannot tell how well a block-causal model decodes. This checkpoint is block-causal
(attention bidirectional inside a block of ``BLOCK_LENGTH`` positions, causal between blocks, as
SDAR), trained on ``permute``, whose answer spans several blocks and whose letters depend on
each other inside a block: one step per block repeats letters, one token per step does not, so
full decoding, threshold decoding and Prophet can be told apart by accuracy and by forward
passes. docs/training.md has the command, the learning curve and the measured accuracies.

The checkpoint in ``weights/`` is a real SDAR-format directory (``config.json`` with
``SDARForCausalLM``, ``block_size``, ``mask_token_id``, ``eos_token_id``; ``model.safetensors``;
tokenizer files): load it with ``foretell.models.load_model(BLOCK_DEFAULT_MODEL_DIR)``. It was
trained by ``python -m training.train_sdar`` from the repository root (``training/`` is not
installed).

Prompts are the task prompt as is (the tokenizer's chat template renders the user text alone).
The generation is the marker ``answer:`` at ``MARKER_POSITION`` (0) of the generation, a space,
the letters from ``ANSWER_START``, then EOS: decoders stop after the block that holds it.
"""

from __future__ import annotations

from pathlib import Path

# The held-out convention is the LLaDA default's: the same seed, size and check.
from foretell.models.default import HELDOUT_SEED, HELDOUT_SIZE, check_heldout_size
from foretell.tasks import ANSWER_MARKER, Example, chat_prompt
from foretell.tasks.permute import MAX_COUNT

BLOCK_DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights"
# Tasks the shipped model was trained on (docs/training.md has its measured accuracy).
TASK_NAMES = ("permute",)
# The checkpoint's block_size (config.json): SDAR's released models decode in blocks of 4 too.
BLOCK_LENGTH = 4
# Denoising steps per block for full decoding: one token revealed per step.
STEPS = BLOCK_LENGTH
# The dynamic (threshold) decoding measured in docs/training.md: every masked position of the
# block whose confidence is above it is revealed at once, else the single most confident one.
THRESHOLD = 0.9
MARKER_POSITION = 0
ANSWER_START = MARKER_POSITION + len(ANSWER_MARKER) + 1  # one space after the marker
# The longest answer, and the generation budget: marker, space, letters and the EOS fit in it.
MAX_ANSWER_LENGTH = MAX_COUNT
GEN_LENGTH = 18


def generation_text(example: Example) -> str:
    """The generation the model was trained to write for ``example`` (EOS not included):
    ``answer: <letters>``, with no scratch region (the LLaDA default's layout pads one)."""
    text = f"{ANSWER_MARKER} {example.answer}"
    if len(text) + 1 > GEN_LENGTH:
        raise ValueError(f"answer {example.answer!r} does not fit in {GEN_LENGTH} tokens with EOS")
    return text


def answer_constraints(tokenizer: object) -> dict[int, int]:
    """Constraints ``{relative position: token id}`` that force the marker (as the LLaDA
    default's do), so that an answer span for Prophet starts at ``ANSWER_START``."""
    ids = tokenizer.convert_tokens_to_ids(list(ANSWER_MARKER))  # type: ignore[attr-defined]
    return {MARKER_POSITION + i: int(t) for i, t in enumerate(ids)}


__all__ = [
    "ANSWER_MARKER",
    "ANSWER_START",
    "BLOCK_DEFAULT_MODEL_DIR",
    "BLOCK_LENGTH",
    "GEN_LENGTH",
    "HELDOUT_SEED",
    "HELDOUT_SIZE",
    "MARKER_POSITION",
    "MAX_ANSWER_LENGTH",
    "STEPS",
    "TASK_NAMES",
    "THRESHOLD",
    "answer_constraints",
    "chat_prompt",
    "check_heldout_size",
    "generation_text",
]
