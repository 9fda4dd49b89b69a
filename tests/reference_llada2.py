"""LLaDA2's model-card ``generate``, written for the tests from the behaviour of the official
one (inclusionAI/dFactory ``models/llada2_moe/modeling_llada2_moe.py``), batch 1.

No cache: every step re-encodes the window from position 0 to the end of the current block.
``steps`` (per block) is capped at ``gen_length // minimal_topk``; the reveal schedule comes
from the block length; every confidence strictly above ``threshold`` is revealed when there
are at least ``k`` of them, else the ``k`` best (``k`` capped at the block's masks). After each
block the canvas stops at an EOS; the result is cut after the first EOS or at ``gen_length``
(the last block is decoded whole first).

Where the official code differs:
- at temperature 0 it still draws with ``torch.multinomial`` from the softmax (it only skips
  the division by the temperature), so its "greedy" decoding is sampled. Here temperature 0 is
  greedy: the argmax, with the softmax probability of the argmax as confidence (float32, as
  the official logits are), which is how SGLang, diffusers and other revisions treat it;
- with ``eos_early_stop`` it returns the prompt too (and a prompt containing EOS would end
  the search there); this returns the generation only.
``use_cache=True`` is not the official code: it keeps the finished blocks' keys and values,
computed by a store pass over what finished since the last one (the prompt's whole blocks at
first), as SDAR's official decoder does; foretell's engine computes its cache in those shapes.
The same tokens in exact arithmetic; in bfloat16 the rounding differs from re-encoding the
window. ``passes`` counts the denoising passes (the official count), never store passes.
``prophet`` is foretell's block-wise early commit, as in :mod:`tests.reference_sdar`.
"""

from __future__ import annotations

import torch

from tests.reference_sdar import choose, draw, prophet_fires, schedule


@torch.no_grad()
def llada2_generate(
    model: torch.nn.Module,
    prompt: list[int],
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    threshold: float = 0.95,
    minimal_topk: int = 1,
    eos_id: int,
    eos_early_stop: bool = False,
    use_cache: bool = False,
    prophet: tuple | None = None,
    sampling: tuple[float, int, float, torch.Generator] | None = None,
) -> tuple[list[int], int]:
    """(the generation, forward passes)."""
    mask = model.mask_token_id
    steps = min(steps, gen_length // minimal_topk)
    n = len(prompt)
    num_blocks = -(-(n + gen_length) // block_length)
    x = torch.full((1, num_blocks * block_length), mask, dtype=torch.long)
    x[0, :n] = torch.tensor(prompt)
    pos = torch.arange(x.shape[1])[None]
    ks = schedule(block_length, steps)
    passes, past, stored = 0, None, 0
    for b in range(n // block_length, num_blocks):
        lo, hi = b * block_length, (b + 1) * block_length
        for step in range(steps):
            active = x[0, lo:hi] == mask
            if not active.any():
                break
            if not use_cache:
                logits = model(x[:, :hi], block_size=block_length)[0, lo:hi]
            else:
                if stored < lo:  # store what finished since the last store
                    _, kv = model(
                        x[:, stored:lo],
                        positions=pos[:, stored:lo],
                        past=past,
                        return_kv=True,
                        block_size=block_length,
                    )
                    past, stored = (kv if past is None else past.cat(kv)), lo
                logits = model(
                    x[:, lo:hi], positions=pos[:, lo:hi], past=past, block_size=block_length
                )[0]
            passes += 1
            probs = logits.float().softmax(-1)
            x0 = probs.argmax(-1)
            if sampling is not None:  # (temperature, top_k, top_p, generator)
                x0, probs_x0 = draw(logits, *sampling)
            if prophet_fires(prophet, logits, active, lo, n, step, steps, n + gen_length):
                x[0, lo:hi] = torch.where(active, x0, x[0, lo:hi])
                break
            conf = probs.gather(-1, x0[:, None])[:, 0] if sampling is None else probs_x0
            conf = conf.masked_fill(~active, float("-inf"))
            reveal = choose(conf, ks[step], threshold)
            x[0, lo + reveal] = x0[reveal]
            if eos_early_stop and bool((x0[reveal] == eos_id).any()):
                eos = (x[0] == eos_id).nonzero().flatten()
                if len(eos) and bool((x[0, n : int(eos[0])] != mask).all()):
                    return x[0, n : int(eos[0]) + 1].tolist(), passes
        if bool((x[0, n:hi] == eos_id).any()):
            break
    gen = x[0, n : n + gen_length].tolist()
    return (gen[: gen.index(eos_id) + 1] if eos_id in gen else gen), passes
