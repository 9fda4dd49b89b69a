"""SDAR's ``bd3`` decoder, written for the tests from the behaviour of the official one
(JetAstra/SDAR ``evaluation/opencompass/opencompass/models/huggingface_bd3.py``), batch 1.

Greedy by default, as foretell's temperature 0 means (the argmax, ranked by its unfiltered
softmax probability; the paper's ``temperature=1.0, top_k=1`` draws the same tokens but scores
every row 1.0, which ``sampling=(1.0, 1, 1.0, g)`` reproduces);
``sampling=(temperature, top_k, top_p, generator)`` runs the official sampling (both families'
files sample the same way: temperature, top-k, top-p, one multinomial draw per block row,
confidence = the drawn token's filtered probability).
Where the official code differs:
- at temperature 0 its decoders still sample (``torch.multinomial``); greedy here is the
  argmax with its unfiltered probability as confidence, as SGLang and diffusers read them;
- it asserts ``block_length % steps == 0``; this accepts any ``steps <= block_length`` with
  the general schedule (``block // steps``, one more for the first ``block % steps`` steps);
- it returns the whole block-aligned canvas; :func:`cut` gives what foretell returns;
- its ``topk`` takes ``k_s`` positions even when fewer masks are left (a block holding the
  prompt's tail), writing over prompt or revealed tokens; this caps ``k_s`` at the masks left;
- a block whose ``steps`` are spent with masks left (a revealed token was the mask token
  itself) would index past the schedule; this stores it as it is and moves on.

``prophet`` is foretell's block-wise early commit (no official code): ``(thresholds, bounds,
statistic, span)``, with ``span`` None (the block's masks) or ``(start, length)`` relative to
the generation. Before each reveal, the gap statistic over the region (the part of the span
inside the block) is compared with the threshold of progress ``(step + 1) / steps``; when it
is reached every mask of the block takes its argmax and the block is done.

Confidence is the softmax probability of the argmax over the unfiltered logits, in the logits'
dtype (SDAR's head returns the model's dtype; the softmax is not upcast).
"""

from __future__ import annotations

import torch


def schedule(block_length: int, steps: int) -> list[int]:
    return [block_length // steps + (i < block_length % steps) for i in range(steps)]


def prophet_fires(
    prophet: tuple | None,
    logits: torch.Tensor,
    masked: torch.Tensor,
    lo: int,
    prompt_len: int,
    step: int,
    steps: int,
    gen_end: int,
) -> bool:
    """The block-wise Prophet test over one block's ``logits`` (rows of the block); an
    explicit span stops at ``gen_end``, the end of the generation (the tail is cut)."""
    if prophet is None:
        return False
    thresholds, bounds, statistic, span = prophet
    if span is None:
        rows = masked.nonzero().flatten()
    else:
        start = prompt_len + span[0] - lo
        end = min(start + span[1], logits.shape[0], gen_end - lo)
        first = max(start, 0)
        rows = torch.arange(first, max(end, first))
    if len(rows) == 0:
        return False
    top2 = logits[rows].topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).float()
    gap = float(gaps.mean() if statistic == "mean" else gaps.min())
    progress = (step + 1) / steps
    phase = 0 if progress < bounds[0] else (1 if progress < bounds[1] else 2)
    return gap >= thresholds[phase]


def draw(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official sampling of a block's rows: temperature, top-k, top-p (to -inf), a
    multinomial draw per row; (tokens, their filtered probabilities)."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        smallest = torch.topk(logits, top_k).values[..., -1, None]
        logits = torch.where(logits < smallest, torch.full_like(logits, float("-inf")), logits)
    if top_p < 1.0:
        values, order = torch.sort(logits, descending=True)
        over = torch.cumsum(values.softmax(-1), dim=-1) > top_p
        over[..., 1:] = over[..., :-1].clone()
        over[..., 0] = False
        cut = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, over)
        logits = logits.masked_fill(cut, float("-inf"))
    probs = logits.softmax(-1)
    token = torch.multinomial(probs, 1, generator=generator)
    return token[:, 0], probs.gather(-1, token)[:, 0]


def choose(conf: torch.Tensor, k: int, threshold: float | None) -> torch.Tensor:
    """Positions to reveal: every confidence strictly above ``threshold`` when there are at
    least ``k`` of them, else the ``k`` highest (masked positions carry -inf)."""
    masked = int(torch.isfinite(conf).sum())
    if threshold is not None:
        high = conf > threshold
        if int(high.sum()) >= k:
            return high.nonzero().flatten()
    return conf.topk(min(k, masked)).indices


@torch.no_grad()
def bd3_generate(
    model: torch.nn.Module,
    prompt: list[int],
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    threshold: float | None = None,
    stop_ids: tuple[int, ...] = (),
    use_cache: bool = True,
    prophet: tuple | None = None,
    sampling: tuple[float, int, float, torch.Generator] | None = None,
    count_stores: bool = True,
) -> tuple[list[int], int]:
    """(the canvas after the prompt, forward passes: with ``count_stores`` False, the
    denoising passes only). ``threshold`` None: the static
    schedule; else the dynamic one. ``use_cache=False`` recomputes the whole window every step
    (no KV cache, no store pass): the same tokens, by the block-causal mask."""
    if not 0 < steps <= block_length:
        raise ValueError("steps: must be in [1, block_length]")
    mask = model.mask_token_id
    n = len(prompt)
    num_blocks = -(-(n + gen_length) // block_length)
    x = torch.full((1, num_blocks * block_length), mask, dtype=torch.long)
    x[0, :n] = torch.tensor(prompt)
    pos = torch.arange(x.shape[1])[None]
    passes, past = 0, None
    first = n // block_length
    if use_cache and first:
        _, past = model(
            x[:, : first * block_length],
            positions=pos[:, : first * block_length],
            return_kv=True,
            block_size=block_length,
        )
        passes += count_stores
    ks = schedule(block_length, steps)
    for b in range(first, num_blocks):
        lo, hi = b * block_length, (b + 1) * block_length
        committed = False
        for i in range(steps + 1):
            masked = x[0, lo:hi] == mask
            if not masked.any() or i == steps or committed:
                if use_cache:  # one extra pass stores the finished block's clean keys
                    _, kv = model(
                        x[:, lo:hi],
                        positions=pos[:, lo:hi],
                        past=past,
                        return_kv=True,
                        block_size=block_length,
                    )
                    past = kv if past is None else past.cat(kv)
                    passes += count_stores
                break
            if use_cache:
                logits = model(
                    x[:, lo:hi], positions=pos[:, lo:hi], past=past, block_size=block_length
                )[0]
            else:
                logits = model(x[:, :hi], block_size=block_length)[0, lo:hi]
            passes += 1
            probs = logits.softmax(-1)
            x0 = logits.argmax(-1)
            if sampling is not None:  # (temperature, top_k, top_p, generator)
                x0, drawn = draw(logits, *sampling)
            if prophet_fires(prophet, logits, masked, lo, n, i, steps, n + gen_length):
                x[0, lo:hi] = torch.where(masked, x0, x[0, lo:hi])
                committed = True  # the block is done: the next turn stores it
                continue
            conf = probs.gather(-1, x0[:, None])[:, 0] if sampling is None else drawn
            conf = conf.float().masked_fill(~masked, float("-inf"))
            reveal = choose(conf, ks[i], threshold)
            x[0, lo + reveal] = x0[reveal]
        if any(int(t) in stop_ids for t in x[0, n:].tolist()):
            break
    return x[0, n:].tolist(), passes


def cut(tokens: list[int], gen_length: int, stop_ids: tuple[int, ...]) -> list[int]:
    """The generation as foretell returns it: at most ``gen_length`` tokens, ending after the
    first stop token."""
    tokens = tokens[:gen_length]
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens
