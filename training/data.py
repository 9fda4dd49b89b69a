"""Training batches for the default model's tasks: generations EOS-filled, prompts left-padded."""

from __future__ import annotations

import torch

from foretell.models.default.data import encode_prompt
from foretell.tasks import GEN_LENGTH, Example


def encode_generation(tokenizer: object, example: Example) -> list[int]:
    """The generation ids, EOS-filled to ``GEN_LENGTH`` as LLaDA-Instruct's SFT data is."""
    ids = tokenizer(example.generation, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return ids + [tokenizer.eos_token_id] * (GEN_LENGTH - len(ids))  # type: ignore[attr-defined]


def make_batch(
    tokenizer: object, examples: list[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, L], attention mask [B, L], generation mask [B, L]); prompts are left-padded."""
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    gens = [encode_generation(tokenizer, ex) for ex in examples]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    ids = torch.full((len(examples), width + GEN_LENGTH), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (p, g) in enumerate(zip(prompts, gens, strict=True)):
        ids[row, width - len(p) :] = torch.tensor(p + g)
        attention[row, width - len(p) :] = 1
    is_gen = torch.zeros_like(ids, dtype=torch.bool)
    is_gen[:, width:] = True
    return ids, attention, is_gen
