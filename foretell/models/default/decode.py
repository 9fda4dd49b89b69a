"""A small batched LLaDA decoder for training-time evaluation of the default model.

Same rule as LLaDA's ``generate`` (greedy, low-confidence remasking, semi-autoregressive blocks,
``m // s`` reveals per step plus one for the first ``m % s`` steps) and Prophet's constraints, but
over many prompts at once with left padding, so that evaluating hundreds of held-out prompts
during training takes seconds. The engine is the real implementation; this only has to agree
with the reference decoder.
"""

from __future__ import annotations

import torch

from foretell.models.transformer import DiffusionLM


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompts: list[list[int]],
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    pad_id: int = 0,
    constraints: dict[int, int] | None = None,
    batch_size: int = 256,
) -> list[list[int]]:
    """Greedy generations (``gen_length`` ids each, EOS kept) for a list of token-id prompts."""
    if gen_length % block_length:
        raise ValueError("gen_length must be a multiple of block_length")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError("steps must be a multiple of the number of blocks")
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out.extend(
            _generate_batch(
                model, chunk, gen_length, block_length, steps // num_blocks, pad_id, constraints
            )
        )
    return out


def _generate_batch(
    model: DiffusionLM,
    prompts: list[list[int]],
    gen_length: int,
    block_length: int,
    steps_per_block: int,
    pad_id: int,
    constraints: dict[int, int] | None,
) -> list[list[int]]:
    mask_id = model.mask_token_id
    width = max(len(p) for p in prompts)
    total = width + gen_length
    x = torch.full((len(prompts), total), mask_id, dtype=torch.long)
    attention = torch.ones_like(x)
    for row, p in enumerate(prompts):
        x[row, : width - len(p)] = pad_id
        attention[row, : width - len(p)] = 0
        x[row, width - len(p) : width] = torch.tensor(p)
    attention_mask = None if bool(attention.all()) else attention
    for pos, token in (constraints or {}).items():
        x[:, width + pos] = token
    rows = torch.arange(len(prompts))
    for block in range(gen_length // block_length):
        block_end = width + (block + 1) * block_length
        masked = (x[:, block_end - block_length : block_end] == mask_id).sum(1)
        base, extra = masked // steps_per_block, masked % steps_per_block
        for i in range(steps_per_block):
            k = base + (i < extra).long()
            if not bool((k > 0).any()):
                continue
            logits = model(x, attention_mask=attention_mask)
            probs = torch.softmax(logits.double(), dim=-1)
            conf, x0 = probs.max(dim=-1)
            conf = conf.masked_fill(x != mask_id, -1.0)
            conf[:, block_end:] = -1.0
            order = conf.argsort(dim=1, descending=True)
            ranks = torch.empty_like(order)
            ranks[rows[:, None], order] = torch.arange(total).expand_as(order)
            reveal = (ranks < k[:, None]) & (conf >= 0)
            x = torch.where(reveal, x0, x)
    return x[:, width:].tolist()
