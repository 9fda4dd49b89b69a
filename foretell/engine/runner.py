"""ModelRunner: one packed forward pass for the whole batch, logits only where needed.

Every running canvas (and, for classifier-free guidance, its prompt-masked copy) is laid back
to back in one flat token tensor with per-sequence boundaries: no padding, so mixed lengths
cost only their own tokens. The LM head then runs once, on just the rows the decoders asked
for (still-masked positions and Prophet's answer region), not on the whole canvas.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from foretell.decoding import positions_needed
from foretell.decoding.unmask import RowStats, greedy_llada
from foretell.models.transformer import DiffusionLM
from foretell.scheduler.request import Request


def _reads_stats(req: Request) -> bool:
    """Whether ``advance`` uses :class:`RowStats` for this request (Prophet's gap, or the
    greedy LLaDA reveal)."""
    p = req.params
    greedy = greedy_llada(req.family, p.remasking, p.temperature, p.top_p, p.top_k)
    return p.cfg_scale <= 0 and (p.early_commit is not None or greedy)


@dataclass
class RequestLogits:
    """What one request gets back from a forward pass."""

    positions: torch.Tensor  # canvas positions, sorted
    logits: torch.Tensor  # [len(positions), vocab], aligned, cfg applied
    more: Callable[[torch.Tensor], torch.Tensor]  # logits at other positions of this pass
    stats: RowStats | None = None  # greedy statistics of ``logits`` (None with cfg)


class ModelRunner:
    def __init__(self, model: DiffusionLM, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self.forward_seconds = 0.0  # time inside the model, for overhead accounting
        self.forward_passes = 0
        self._aranges: dict[int, torch.Tensor] = {}

    def _arange(self, n: int) -> torch.Tensor:
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n)
        return self._aranges[n]

    @torch.inference_mode()
    def run(self, batch: list[Request]) -> list[RequestLogits]:
        seqs: list[torch.Tensor] = []
        offsets: list[tuple[int, int | None]] = [(0, None)] * len(batch)  # (cond, uncond) starts
        total = 0
        # Packed by canvas length, so that equal lengths are neighbours and attention runs
        # once per length (packed_attention batches runs of equal lengths).
        for i in sorted(range(len(batch)), key=lambda i: batch[i].canvas_len):
            req = batch[i]
            cond = total
            seqs.append(req.canvas)
            total += req.canvas_len
            uncond = None
            if req.params.cfg_scale > 0:
                uncond = total
                seqs.append(req.unconditional_canvas())
                total += req.canvas_len
            offsets[i] = (cond, uncond)
        seq_lens = [len(s) for s in seqs]
        ids = torch.cat(seqs).to(self.device)
        positions = torch.cat([self._arange(n) for n in seq_lens]).to(self.device)
        needed = [positions_needed(req) for req in batch]
        rows = [self._rows(pos, starts) for pos, starts in zip(needed, offsets, strict=True)]

        start = time.perf_counter()
        hidden = self.model.forward_packed(ids, positions, seq_lens)
        gathered = self.model.logits_at(hidden, positions, torch.cat(rows).to(self.device))
        self.forward_seconds += time.perf_counter() - start
        self.forward_passes += 1
        gathered = gathered.cpu()
        # One batched computation of what greedy decoding and Prophet read from each row, when
        # some request reads it; cfg rows are guided per request first, so they do without.
        stats = RowStats.of(gathered) if any(_reads_stats(r) for r in batch) else None

        def more(pos: torch.Tensor, req: Request, rows: tuple[int, int | None]) -> torch.Tensor:
            with torch.inference_mode():
                idx = self._rows(pos, rows).to(self.device)
                return self._guided(req, self.model.logits_at(hidden, positions, idx).cpu())

        out = []
        cursor = 0
        for req, starts, pos in zip(batch, offsets, needed, strict=True):
            n = len(pos) * req.num_sequences
            logits = self._guided(req, gathered[cursor : cursor + n])
            own = None
            if stats is not None and req.params.cfg_scale <= 0:
                own = stats.take(slice(cursor, cursor + n))
            cursor += n
            more_fn = functools.partial(more, req=req, rows=starts)
            out.append(RequestLogits(pos, logits, more_fn, own))
        return out

    @staticmethod
    def _rows(pos: torch.Tensor, starts: tuple[int, int | None]) -> torch.Tensor:
        """Flat rows of canvas positions ``pos``: conditional copy, then the cfg copy."""
        cond, uncond = starts
        return pos + cond if uncond is None else torch.cat([pos + cond, pos + uncond])

    @staticmethod
    def _guided(req: Request, logits: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: ``un + (scale + 1) * (cond - un)``, as LLaDA's reference."""
        if req.params.cfg_scale <= 0:
            return logits
        cond, un = logits.chunk(2)
        return un + (req.params.cfg_scale + 1) * (cond - un)
