"""Denoising block-causal requests (SDAR, LLaDA2): one step of each one's current block.

A block-causal request decodes its canvas block by block, blocks aligned at position 0 (the
prompt's tail sits in the first block it denoises). Each step runs the block's queries over
the cached keys of every earlier block and reveals some of its masks:

- ``k_s = block_length // steps`` tokens at step ``s`` (one more for the first
  ``block_length % steps`` steps), the most confident first (``"low_confidence"``, the static
  schedule); with ``"confidence_threshold"`` (the dynamic one), every mask whose confidence is
  strictly above ``threshold`` when there are at least ``k_s`` of them, else the ``k_s`` best.
  ``k_s`` is capped at the masks left, so a prompt token or a revealed one is never written
  over (the official SDAR script's ``topk`` can pick them when a block holds the prompt's tail
  and ``k_s`` exceeds its masks; docs/guide.md);
- greedy, as the official decoders at temperature 0 are read (SGLang, diffusers): the argmax,
  with the softmax probability of the argmax as confidence, in the dtype of the model's logits
  (SDAR's head returns the model's dtype; LLaDA2's casts to float32, and takes the argmax of
  the probabilities);
- sampled (temperature > 0, or top-k / top-p), as both official decoders sample: the logits
  divided by the temperature, top-k then top-p filtered (to -inf), one multinomial draw per
  row of the whole block from the request's generator, and the confidence is the drawn
  token's filtered probability;
- Prophet, block by block: the top-1 minus top-2 logit gap over the block's masks (or the part
  of an explicit answer span inside the block), against the threshold of the block's progress
  ``(step + 1) / steps``. When it fires, every mask of the block takes its argmax and the
  next block starts; the threshold rule still decides how many tokens a step reveals.

A block is done when it has no masks (or its ``steps`` are spent, as LLaDA2's loop ends); a
stop id in the generation then ends the request (both official decoders check after a whole
block), and so does the last block. With ``eos_early_stop`` (LLaDA2) a step that reveals a
stop id ends the request at once if everything before the first stop id is decoded.

The finished block's keys are stored by the next pass (``Request.kv_stored``): a sequence of
its own in the same forward as the next block's queries, written before any sequence reads, so
it is the official store pass (and the prompt's whole blocks the official prefill) in shape
and numbers, without a pass of its own. Every request of a pass is scored in a few batched
device ops and one transfer to the host; each request's reveal is then a few host operations
on its own block.
"""

from __future__ import annotations

import torch

from foretell.decoding.early_commit import reduce_gaps
from foretell.decoding.unmask import llada_step_count, top2_gap
from foretell.params import Prophet
from foretell.scheduler.request import Request

_NOTHING = torch.empty(0, dtype=torch.long)


def _span_in_block(policy: Prophet, req: Request, lo: int, hi: int) -> torch.Tensor:
    """The explicit answer span's positions inside ``[lo, hi)``, the generation's only (the
    tail past ``gen_length`` is cut)."""
    start, end = policy.answer_span(req.prompt_len, req.prompt_len + req.params.gen_length)
    return torch.arange(max(start, lo), max(min(end, hi), max(start, lo)))


def samples(req: Request) -> bool:
    """Whether ``req`` samples (else it is greedy)."""
    p = req.params
    return p.temperature > 0 or p.top_k is not None or p.top_p is not None


def block_positions(req: Request) -> torch.Tensor:
    """Canvas positions whose logits this step needs: the block's masks, and an explicit
    Prophet span's positions inside the block; sorted, unique. A sampled step needs the whole
    block: the official decoders draw a token for every row of it."""
    lo, hi = req.block_bounds()
    if samples(req):
        return torch.arange(lo, hi)
    masked = req.masked_positions(lo, hi)
    policy = req.params.early_commit
    if policy is None or policy.answer_start is None:
        return masked
    return torch.unique(torch.cat([masked, _span_in_block(policy, req, lo, hi)]))


def score_rows(logits: torch.Tensor, argmax_of_probs: bool) -> torch.Tensor:
    """``[3, rows]`` float64 on the logits' device: each row's greedy token, its softmax
    probability (in the logits' dtype) and its top-1 minus top-2 logit gap, for one
    transfer."""
    probs = logits.softmax(-1)
    x0 = (probs if argmax_of_probs else logits).argmax(-1)
    conf = probs.gather(-1, x0[:, None])[:, 0]
    if logits.shape[-1] > 1:
        gap = top2_gap(logits, logits.argmax(-1) if argmax_of_probs else x0)
    else:
        gap = torch.zeros_like(conf)
    # Float32 confidences and gaps convert to float64 and back exactly.
    return torch.stack([x0.double(), conf.float().double(), gap.float().double()])


def sample_rows(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """:func:`score_rows` for a sampled step, on the host: the drawn tokens, their filtered
    probabilities and the raw logits' gaps (Prophet reads the logits before sampling)."""
    gaps = score_rows(logits, False)[2]
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = torch.where(logits < kth, float("-inf"), logits)
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        beyond = ordered.softmax(-1).cumsum(-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()
        beyond[..., 0] = False
        drop = torch.zeros_like(beyond).scatter(-1, order, beyond)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1).cpu()
    token = torch.multinomial(probs, 1, generator=generator)
    conf = probs.gather(-1, token)[:, 0]
    return torch.stack([token[:, 0].double(), conf.float().double(), gaps.cpu()])


def advance_block(req: Request, positions: torch.Tensor, scores: torch.Tensor) -> None:
    """Apply one step to ``req`` given its rows' host ``scores`` (:func:`score_rows`'s, the
    rows of ``positions``)."""
    p = req.params
    req.global_step += 1
    req.revealed_last_step = _NOTHING
    lo, hi = req.block_bounds()
    # This pass stored the keys of every position before the block.
    req.kv_stored = lo
    x0 = scores[0].long()
    conf = scores[1].float()
    masked = req.masked_positions(lo, hi)
    rows = torch.searchsorted(positions, masked)
    policy = p.early_commit
    fires = policy is not None and len(masked) > 0
    if fires and _prophet_fires(req, policy, positions, scores[2].float(), lo, hi):
        _write(req, masked, x0[rows])
        req.commit_step = req.global_step  # the step of the latest block committed
        _block_done(req)
        return
    count = min(llada_step_count(p.block_length, p.steps, req.step_in_block), len(masked))
    row_conf = torch.full((hi - lo,), float("-inf"))
    row_conf[masked - lo] = conf[rows]
    chosen = None
    if p.remasking == "confidence_threshold":
        high = row_conf > p.threshold
        if int(high.sum()) >= count:
            chosen = high.nonzero().flatten()
    if chosen is None:
        chosen = row_conf.topk(count).indices
    at = torch.searchsorted(masked, chosen.sort().values + lo)
    _write(req, masked[at], x0[rows[at]])
    if p.eos_early_stop and _early_eos(req, x0[rows[at]]):
        return
    req.step_in_block += 1
    if req.step_in_block >= p.steps or not req.masked_count(lo, hi):
        _block_done(req)


def _prophet_fires(
    req: Request, policy: Prophet, positions: torch.Tensor, gaps: torch.Tensor, lo: int, hi: int
) -> bool:
    if policy.answer_start is None:
        region = req.masked_positions(lo, hi)
    else:
        region = _span_in_block(policy, req, lo, hi)
    gap = reduce_gaps(gaps[torch.searchsorted(positions, region)], policy.statistic)
    req.last_gap = gap
    if gap is None:
        return False
    return gap >= policy.threshold(req.step_in_block + 1, req.params.steps)


def _write(req: Request, positions: torch.Tensor, tokens: torch.Tensor) -> None:
    req.write(positions, tokens)
    req.revealed_last_step = positions


def _early_eos(req: Request, revealed: torch.Tensor) -> bool:
    """LLaDA2's ``eos_early_stop``: a stop id revealed, and every position of the generation
    before the first stop id decoded."""
    stops = torch.tensor(req.stop_ids, dtype=torch.long)
    if not bool(torch.isin(revealed, stops).any()):
        return False
    gen = req.canvas[req.prompt_len : req.prompt_len + req.params.gen_length]
    hits = torch.isin(gen, stops).nonzero()
    if not len(hits):  # revealed only in the tail past gen_length, which is cut
        return False
    first = int(hits[0])
    if bool((gen[:first] == req.mask_token_id).any()):
        return False
    req.finish("stop")
    return True


def _block_done(req: Request) -> None:
    """The block is finished: stop at a stop id, after the last block, or move on (the next
    pass stores this block's keys)."""
    stops = req.stop_ids
    _, hi = req.block_bounds()
    end = min(hi, req.prompt_len + req.params.gen_length)  # the tail past gen_length is cut
    if stops and bool(torch.isin(req.canvas[req.prompt_len : end], torch.tensor(stops)).any()):
        req.finish("stop")
        return
    req.block += 1
    req.step_in_block = 0
    if req.block * req.params.block_length >= req.canvas_len:
        req.finish("steps")
