"""One denoising step for every greedy LLaDA request of a pass at once.

The per-request step (:mod:`foretell.decoding.step`) runs a few dozen small tensor ops per
request; with a small model that is a large share of each pass. Greedy LLaDA decoding (the
common case: temperature 0, no classifier-free guidance, low-confidence or random remasking,
with or without Prophet) reads only :class:`RowStats` from its rows, so the whole step can run
as a fixed number of ops over the packed batch, however many requests it holds.

The result equals the per-request step exactly: the same rows are gathered, Prophet's statistic
is reduced row by row with the same kernel (a ``[requests, span]`` mean or min), and top-k ranks
the same canvas-length rows with the same ``k`` (``tests/test_batched_step.py`` runs both paths
side by side).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from foretell.decoding.early_commit import should_commit
from foretell.decoding.step import mark_committed, move_block_cursor
from foretell.decoding.unmask import RowStats, greedy_llada, llada_block_schedule
from foretell.scheduler.request import Request

# Columns of the per-sequence geometry table (canvas positions).
_PROMPT_END, _BLOCK_START, _BLOCK_END, _SPAN_START, _SPAN_END, _REGION_IS_MASKED = range(6)


def batchable(req: Request) -> bool:
    """Whether :class:`GreedyBatch` can step ``req`` (otherwise it takes the per-request path)."""
    p = req.params
    return (
        p.cfg_scale <= 0
        and p.kv_cache is None
        and p.remasking in ("low_confidence", "random")
        and greedy_llada(req.family, p.remasking, p.temperature, p.top_p, p.top_k)
    )


@dataclass
class _Plan:
    """A pass's decisions for every request of the group, before any request changes."""

    new_ids: torch.Tensor  # the pass's flat tokens with every reveal written
    x0: torch.Tensor  # flat greedy tokens of the gathered rows (commits add theirs)
    gaps: list[float | None]
    commits: list[bool]
    schedules: list[list[int] | None]  # a new block's reveal counts, where one starts
    revealed: list[torch.Tensor | None]  # canvas positions revealed (None: commits, for now)


class GreedyBatch:
    """The batchable requests of one packed pass: which rows they need, then their step.

    ``ids`` and ``positions`` are the pass's flat tokens and their positions within their own
    canvas; ``seq_index[i]`` is the packed sequence holding ``reqs[i]``'s canvas and
    ``starts[i]`` its first flat token.
    """

    def __init__(
        self,
        reqs: Sequence[Request],
        seq_index: Sequence[int],
        starts: Sequence[int],
        seq_lens: Sequence[int],
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask_token_id: int,
    ) -> None:
        self.reqs = list(reqs)
        self.seq_index = list(seq_index)
        self.starts = list(starts)
        self.num_seqs = len(seq_lens)
        self.ids = ids
        self._pass: tuple | None = None  # (rows, stats, more), once the forward pass has run
        # Every other sequence gets a geometry that selects nothing.
        table = [[0] * 6 for _ in seq_lens]
        for req, s in zip(self.reqs, self.seq_index, strict=True):
            start, end = req.block_bounds()
            row = table[s]
            row[_PROMPT_END], row[_BLOCK_START], row[_BLOCK_END] = req.prompt_len, start, end
            policy = req.params.early_commit
            if policy is not None and policy.answer_start is None:
                row[_REGION_IS_MASKED] = 1
            elif policy is not None:
                row[_SPAN_START] = req.prompt_len + policy.answer_start
                row[_SPAN_END] = min(row[_SPAN_START] + policy.answer_length, req.canvas_len)
        lens = torch.tensor(list(seq_lens))
        per_token = torch.tensor(table).repeat_interleave(lens, dim=0)
        prompt_end, block_start, block_end, span_start, span_end, region_is_masked = per_token.T
        self.seq_of_token = torch.arange(self.num_seqs).repeat_interleave(lens)
        masked = ids == mask_token_id
        generated = masked & (positions >= prompt_end)
        # The reveal window (masked, up to the end of the current block), Prophet's answer
        # region (an explicit span, masked or not, or every masked generated position), the
        # current block's masks (its reveal schedule), and what a commit fills.
        self.window = generated & (positions < block_end)
        self.region = ((positions >= span_start) & (positions < span_end)) | (
            generated & region_is_masked.bool()
        )
        self.in_block = masked & (positions >= block_start) & (positions < block_end)
        self.generated = generated
        self.needed = self.window | self.region

    def bind(
        self, rows: torch.Tensor, stats: RowStats, more: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """The pass's results: gathered ``rows`` (sorted flat token indices, including this
        batch's ``needed``), their ``stats``, and ``more(flat_rows)`` for rows not gathered."""
        self._pass = (rows, stats, more)

    def advance(self) -> None:
        """Step every request. A failure while planning (before any request changes, though
        random remasking has drawn) finishes every member with an error; a failure while one
        request's step is applied finishes only that one."""
        rows, stats, more = self._pass
        try:
            plan = self._plan(rows, stats, more)
        except Exception as err:  # not attributable to one request
            for req in self.reqs:
                req.finish("error", f"decoding failed: {err!r}")
            return
        for j, req in enumerate(self.reqs):
            try:
                self._apply(j, req, plan)
            except Exception as err:
                req.finish("error", f"decoding failed: {err!r}")

    # -- planning: tensors only; no request changes except random remasking's draws --------
    def _plan(
        self, rows: torch.Tensor, stats: RowStats, more: Callable[[torch.Tensor], torch.Tensor]
    ) -> _Plan:
        """Every request's Prophet statistic and reveal, computed on the logits' device; then
        two transfers for the whole pass, whatever its size: the token ids (every gathered
        row's argmax and the positions picked) and the gaps; and a third when a commit fills
        masks whose rows were not gathered (an explicit answer span), for all such commits.

        The reveal is computed for every request, also those whose gap will commit them
        (they discard it): so nothing waits for the gaps to reach the host first.
        """
        seq_of_row = self.seq_of_token[rows]
        gap_parts = self._gaps(seq_of_row, rows, stats)
        schedules: list[list[int] | None] = [None] * len(self.reqs)
        if any(req.step_in_block == 0 for req in self.reqs):
            in_block = self.seq_of_token[self.in_block]
            counts = torch.bincount(in_block, minlength=self.num_seqs).tolist()
            for j, (req, s) in enumerate(zip(self.reqs, self.seq_index, strict=True)):
                if req.step_in_block == 0:
                    schedules[j] = llada_block_schedule(counts[s], req.params.steps_per_block)
        picks = self._reveal(rows, seq_of_row, stats, schedules)
        # The pass's only device -> host transfers.
        ids = torch.cat([stats.argmax, *(targets.flatten() for _, targets in picks)]).cpu()
        values = torch.cat([v for _, v in gap_parts]).tolist() if gap_parts else []

        gaps: list[float | None] = [None] * len(self.reqs)
        at = 0
        for members, _ in gap_parts:
            for j in members:
                gaps[j] = values[at]
                at += 1
        commits = []
        for req, gap in zip(self.reqs, gaps, strict=True):
            policy, step = req.params.early_commit, req.global_step + 1
            commits.append(
                policy is not None and should_commit(policy, gap, step, req.params.steps)
            )
        x0 = torch.zeros_like(self.ids)
        x0[rows] = ids[: len(rows)]
        plan = _Plan(self.ids.clone(), x0, gaps, commits, schedules, [None] * len(self.reqs))
        at = len(rows)
        for members, targets in picks:
            k = targets.shape[1]
            chosen = ids[at : at + len(members) * k].view(len(members), k)
            at += len(members) * k
            if any(commits[j] for j in members):
                keep = [i for i, j in enumerate(members) if not commits[j]]
                members, chosen = [members[i] for i in keep], chosen[keep]
            if not members:
                continue
            plan.new_ids[chosen] = x0[chosen]
            starts = torch.tensor([self.starts[j] for j in members])
            for j, picked in zip(members, (chosen - starts[:, None]).unbind(0), strict=True):
                plan.revealed[j] = picked
        for j in range(len(self.reqs)):
            if plan.revealed[j] is None and not commits[j]:
                plan.revealed[j] = torch.empty(0, dtype=torch.long)
        self._fill_commits(plan, more)
        return plan

    def _fill_commits(self, plan: _Plan, more: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The argmax at every generated mask of the committing requests whose rows were not
        gathered, from one LM-head call for all of them (with each one's suppressed ids)."""
        missing, cells = [], []
        at = 0
        for j, req in enumerate(self.reqs):
            if not plan.commits[j]:
                continue
            start, end = self.starts[j], self.starts[j] + req.canvas_len
            fill = self.generated[start:end].nonzero().flatten()
            rows = fill[~self.needed[start:end][fill]] + start
            if rows.numel():
                missing.append(rows)
                cells += [(at, at + rows.numel(), t) for t in req.logits_suppress]
                at += rows.numel()
        if not missing:
            return
        flat = torch.cat(missing)
        logits = more(flat)
        if cells:
            row_idx = torch.cat([torch.arange(a, b) for a, b, _ in cells])
            col_idx = torch.cat([torch.full((b - a,), t) for a, b, t in cells])
            logits = logits.index_put(
                (row_idx.to(logits.device), col_idx.to(logits.device)),
                logits.new_full((), float("-inf")),
            )
        plan.x0[flat] = logits.argmax(dim=-1).cpu()

    def _gaps(
        self, seq_of_row: torch.Tensor, rows: torch.Tensor, stats: RowStats
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Prophet's statistic, on the device: ``(requests, values)`` per group of requests
        with the same number of region rows (none without a policy or without region rows).

        A request's region rows are contiguous and in position order, so requests with the same
        number of rows reduce as one ``[requests, rows]`` matrix: row by row this is the kernel
        the per-request path runs on one row.
        """
        policies = [req.params.early_commit for req in self.reqs]
        if all(p is None for p in policies):
            return []
        device = stats.gap.device
        in_region = self.region[rows]
        region_seq = seq_of_row[in_region]
        region_gap = stats.gap[in_region.nonzero().flatten().to(device)]
        counts = torch.bincount(region_seq, minlength=self.num_seqs)
        count_of = counts.tolist()
        by_count: dict[int, list[int]] = defaultdict(list)  # rows per request -> requests
        for j, s in enumerate(self.seq_index):
            if policies[j] is not None and count_of[s] > 0:
                by_count[count_of[s]].append(j)
        row_count = counts[region_seq]
        parts = []
        for count, members in by_count.items():
            sel = (row_count == count).nonzero().flatten().to(device)
            block = region_gap[sel].view(-1, count)
            # The block's rows come in packed order: sort its requests the same way.
            members.sort(key=lambda j: self.seq_index[j])
            for statistic in sorted({policies[j].statistic for j in members}):
                own = [i for i, j in enumerate(members) if policies[j].statistic == statistic]
                values = block.mean(1) if statistic == "mean" else block.amin(1)
                if len(own) < len(members):
                    values = values[torch.tensor(own, device=device)]
                parts.append(([members[i] for i in own], values))
        return parts

    def _reveal(
        self,
        rows: torch.Tensor,
        seq_of_row: torch.Tensor,
        stats: RowStats,
        schedules: list[list[int] | None],
    ) -> list[tuple[list[int], torch.Tensor]]:
        """LLaDA's reveal for every request, on the device: ``(requests, flat positions
        [requests, k])`` per group, the top-``k`` scores of each canvas-length row (``-inf``
        outside the window), grouped by canvas length, rule and ``k`` so that each group is one
        ``topk``. A request whose ``k`` is 0 is in no group."""
        device = stats.prob.device
        in_window = self.window[rows]
        window_size = torch.bincount(seq_of_row[in_window], minlength=self.num_seqs).tolist()
        prob = None
        groups: dict[tuple[int, str], list[int]] = defaultdict(list)
        for j, req in enumerate(self.reqs):
            groups[(req.canvas_len, req.params.remasking)].append(j)
            if req.params.remasking == "low_confidence" and prob is None:
                prob = stats.prob.new_full(self.ids.shape, float("-inf"))
                window_rows = in_window.nonzero().flatten()
                prob[rows[window_rows].to(device)] = stats.prob[window_rows.to(device)]
        picks = []
        for (length, rule), members in groups.items():
            flat = torch.tensor([self.starts[j] for j in members])[:, None] + torch.arange(length)
            if rule == "low_confidence":
                scores = prob[flat.to(device)]
            else:  # the reference draws one uniform per canvas position every step
                draws = [torch.rand(length, generator=self.reqs[j].generator) for j in members]
                scores = torch.stack(draws).masked_fill(~self.window[flat], float("-inf"))
                scores = scores.to(device)
            by_k: dict[int, list[int]] = defaultdict(list)
            for i, j in enumerate(members):
                req = self.reqs[j]
                schedule = schedules[j]
                if schedule is None:
                    schedule = req.block_schedule
                k = min(schedule[req.step_in_block], window_size[self.seq_index[j]])
                by_k[k].append(i)
            for k, idx in by_k.items():
                if k <= 0:
                    continue
                sel = torch.tensor(idx)
                chosen = scores[sel.to(device)].topk(k, dim=1).indices
                picks.append(([members[i] for i in idx], flat[sel].to(device).gather(1, chosen)))
        return picks

    # -- applying: one request at a time ---------------------------------------------------
    def _apply(self, j: int, req: Request, plan: _Plan) -> None:
        p = req.params
        req.global_step += 1
        if plan.schedules[j] is not None:
            req.block_schedule = plan.schedules[j]
        if p.early_commit is not None:
            req.last_gap = plan.gaps[j]
        start, end = self.starts[j], self.starts[j] + req.canvas_len
        if plan.commits[j]:
            # Every generated mask takes this step's argmax (rows not gathered were filled in
            # while planning).
            fill = self.generated[start:end].nonzero().flatten()
            plan.new_ids[fill + start] = plan.x0[fill + start]
            req.set_canvas(plan.new_ids[start:end].clone())  # finished: its own copy (below)
            req.revealed_last_step = fill
            mark_committed(req)
            return
        req.revealed_last_step = plan.revealed[j]
        move_block_cursor(req)
        # A finished request takes its own copy, not a view that keeps the pass's tokens alive.
        canvas = plan.new_ids[start:end]
        req.set_canvas(canvas.clone() if req.is_finished else canvas)
