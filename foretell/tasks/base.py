"""What every task shares: the example type, the generation layout and the train/held-out split.

The layout follows the Prophet paper's trick: the generation is a scratch region (worked steps),
then the fixed marker ``answer:`` at a fixed offset, then the answer, then EOS to the end. Because
the marker's position is fixed, a decoder can force it with constraints and Prophet knows where
the answer region starts without parsing anything.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# The generation layout, in characters (= tokens: the default model's tokenizer is per-char).
GEN_LENGTH = 32
ANSWER_MARKER = "answer:"
MARKER_POSITION = 16  # the scratch region is positions [0, 16)
# Prophet's reference skips one position after the last constraint: the space after the colon.
ANSWER_START = MARKER_POSITION + len(ANSWER_MARKER) + 1
ANSWER_LENGTH = GEN_LENGTH - ANSWER_START
SCRATCH_LENGTH = MARKER_POSITION

# Every character a prompt, a generation or the chat template can contain.
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +-*/()=<>,.:?!\n"


@dataclass(frozen=True)
class Example:
    """One prompt with one valid generation (other valid answers may exist: use the checker)."""

    prompt: str
    answer: str
    scratch: str = ""

    @property
    def generation(self) -> str:
        """The training target text (EOS fill not included)."""
        return render_generation(self.scratch, self.answer)


def render_generation(scratch: str, answer: str) -> str:
    """Scratch padded to the marker, then ``answer: <answer>``; raises if it would not fit."""
    if len(scratch) > SCRATCH_LENGTH:
        raise ValueError(f"scratch {scratch!r} is longer than {SCRATCH_LENGTH}")
    if len(answer) > ANSWER_LENGTH:
        raise ValueError(f"answer {answer!r} is longer than {ANSWER_LENGTH}")
    return f"{scratch.ljust(SCRATCH_LENGTH)}{ANSWER_MARKER} {answer}"


def parse_answer(generated: str) -> str | None:
    """The text after the last ``answer:`` marker, up to the first whitespace; None if absent.

    Decoders that keep EOS tokens should decode with ``skip_special_tokens=True`` first.
    """
    if ANSWER_MARKER not in generated:
        return None
    tail = generated.rsplit(ANSWER_MARKER, 1)[1].strip()
    return tail.split()[0] if tail else ""


# The default model's chat template: the user's text as is. A "user: ... assistant: " frame
# would cost 18 canvas tokens per request on a model whose whole generation is 32.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def chat_prompt(prompt: str) -> str:
    """The prompt as the default model saw it in training (what ``CHAT_TEMPLATE`` renders)."""
    return prompt


@dataclass(frozen=True)
class Task:
    """A prompt generator with an exact checker.

    ``key`` maps a prompt to the identity used for the held-out split: prompts with equal keys
    are the same problem (e.g. the same numbers in another order), so none of them is trained on.
    """

    name: str
    sample: Callable[[random.Random], Example]
    check_answer: Callable[[str, str], bool]  # (prompt, parsed answer) -> valid?
    key: Callable[[str], object]
    description: str = ""

    def check(self, example_or_prompt: Example | str, generated_text: str) -> bool:
        """Whether ``generated_text`` (the decoded generation) holds a valid answer."""
        prompt = getattr(example_or_prompt, "prompt", example_or_prompt)
        answer = parse_answer(generated_text)
        return answer is not None and self.check_answer(prompt, answer)

    def heldout(self, n: int, seed: int) -> list[Example]:
        """``n`` examples with distinct keys from a seeded stream, for evaluation only."""
        rng = random.Random(f"{self.name}/heldout/{seed}")
        seen: set[object] = set()
        out: list[Example] = []
        while len(out) < n:
            ex = self.sample(rng)
            k = self.key(ex.prompt)
            if k not in seen:
                seen.add(k)
                out.append(ex)
        return out

    def train_stream(self, seed: int, exclude: set[object]) -> Iterator[Example]:
        """An endless seeded stream of examples whose keys are not in ``exclude``."""
        rng = random.Random(f"{self.name}/train/{seed}")
        while True:
            ex = self.sample(rng)
            if self.key(ex.prompt) not in exclude:
                yield ex
