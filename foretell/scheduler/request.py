"""A request in flight: its canvas, where decoding stands, and its own random generator.

The request is the state; the rules that move it forward live in ``foretell.decoding``. It
never touches the model, and its random draws come only from its own generator, so its result
cannot depend on what else shares the batch.
"""

from __future__ import annotations

import bisect
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from foretell.params import DecodeParams

if TYPE_CHECKING:
    from foretell.scheduler.canvas_rows import CanvasRows


# Fields of ``Request.geometry`` (a whole batch's is one ``[requests, GEOMETRY]`` array): prompt
# and canvas length, whether it decodes in blocks, where block 0 starts, the block length,
# cached, prefix cache, Fast-dLLM's Dream, Prophet's explicit span (start, end), whether
# Prophet's region is every generated mask, the step budget and steps per block, Dream, the
# threshold rule, random remasking, Dream's ``origin`` rule, and the sequences it puts in a pass
# (2 with classifier-free guidance).
GEOMETRY = 18
CANVAS_LEN = 1  # the field of the canvas length
IS_RANDOM, IS_ORIGIN = 15, 16  # the fields of the rules that rank no score
NUM_SEQUENCES = 17  # the field of the sequences a request puts in a pass

# Columns of a request's cursor (``Request.cursor_np``: a row of ``CanvasRows.cursor`` while it
# runs, so that the batched step moves a whole batch's with a few array writes): its block, its
# step in that block, its step, its block's masks at the block's start, and how many times the
# batched step wrote its canvas (its cached masked positions are stale once that moves on).
BLOCK, STEP_IN_BLOCK, GLOBAL_STEP, AT_START, WRITES = range(5)
CURSOR_FIELDS = 5


def block_canvas(prompt_len: int, params: DecodeParams) -> tuple[int, int]:
    """A block-causal request's ``(canvas length, largest pass)``, by arithmetic alone (the
    builder checks them before anything is allocated): the canvas runs to the end of its last
    block; the largest pass is its first (the prompt's whole blocks and the first block to
    denoise) or a finished block's store rows and the next block, or without the block cache
    the whole re-encoded canvas."""
    block = params.block_length
    canvas = -(-(prompt_len + params.gen_length) // block) * block
    if not params.block_cache:
        return canvas, canvas
    return canvas, min(canvas, max(prompt_len // block + 1, 2) * block)


class _CursorField:
    """One column of a request's cursor (``Request.cursor_np``) read and written as an int
    attribute: the request's own array, or its canvas row's while it runs."""

    def __init__(self, column: int) -> None:
        self.column = column

    def __get__(self, req: Request | None, owner: type | None = None) -> int:
        if req is None:
            return self  # type: ignore[return-value]
        return int(req.cursor_np[self.column])

    def __set__(self, req: Request, value: int) -> None:
        req.cursor_np[self.column] = value


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: object
    prompt_token_ids: list[int]
    params: DecodeParams
    mask_token_id: int
    family: str
    # Resolved constraints: generation position -> token id.
    constraint_ids: dict[int, int] = field(default_factory=dict)
    # Token ids whose logits are -inf before anything reads them (``logits_eos_inf``), and
    # whose columns the confidence softmax leaves out (``confidence_eos_eot_inf``).
    logits_suppress: tuple[int, ...] = ()
    confidence_suppress: tuple[int, ...] = ()
    # The confidence softmax's dtype where it is not the model's (``unmask.confidence_dtype``).
    confidence_dtype: torch.dtype | None = None
    # A block-causal model's request (SDAR, LLaDA2: foretell.decoding.block_step): its canvas
    # is block-aligned from position 0 and its pages hold the keys of its finished blocks.
    block_causal: bool = False
    # Token ids that end the generation (``stop_token_ids``, and a block-causal model's EOS
    # unless ``ignore_eos``): the returned ids stop after the first.
    stop_ids: tuple[int, ...] = ()

    status: Status = Status.WAITING
    # The canvas as a NumPy array (a view of the request's canvas row while it runs): the
    # batched step's host bookkeeping reads and writes it without dispatching a tensor op per
    # request (see ``write_np``); ``canvas`` is the same memory as a tensor, made when asked.
    canvas_np: np.ndarray = field(init=False, repr=False)
    _canvas: torch.Tensor | None = field(default=None, init=False, repr=False)
    generator: torch.Generator | None = field(init=False)
    # Positions whose tokens the unconditional (cfg) copy hides: the prompt and constraints.
    given: torch.Tensor = field(init=False)
    given_np: np.ndarray = field(init=False, repr=False)
    # Decoding cursor (``CURSOR_FIELDS``; the properties ``block``, ``step_in_block``,
    # ``global_step`` and ``block_masks_at_start`` read and write it): an array of its own, or a
    # view of its canvas row's cursor while it holds one.
    cursor_np: np.ndarray = field(
        default_factory=lambda: np.zeros(CURSOR_FIELDS, dtype=np.int64), init=False, repr=False
    )
    # The last gap Prophet's test measured (NaN: none yet; ``last_gap`` reads it) and the
    # canvas positions revealed last step (as flags over the canvas; ``revealed_last_step``):
    # arrays of their own, or views of the request's canvas row's.
    gap_np: np.ndarray = field(default_factory=lambda: np.full(1, np.nan), init=False, repr=False)
    revealed_np: np.ndarray = field(init=False, repr=False)
    # Dream's timestep grid (float32, exactly as ``diffusion_generate`` builds it).
    timesteps: torch.Tensor | None = None
    timesteps_np: np.ndarray | None = field(default=None, repr=False)  # the same memory
    # Outcome.
    finish_reason: str | None = None
    error: str | None = None
    commit_step: int | None = None
    # Block KV cache (``params.kv_cache``): the pool pages it needs, and from admission until
    # it ends the pages it holds and the pool slot of each canvas position (see
    # foretell.engine.kv_cache).
    kv_pages_needed: int = 0
    kv_pages: list[int] | None = None
    # ``kv_slots`` (a property): an array of its own, or a view of its canvas row's page table.
    _kv_slots: np.ndarray | None = field(default=None, init=False, repr=False)
    # A block-causal request's pages for its whole canvas: it takes them a block at a time
    # (``kv_pages_needed`` at admission: those of its first pass), as an autoregressive
    # sequence's grow.
    kv_pages_max: int = 0
    preemptions: int = 0
    # A block-causal request: canvas positions [0, kv_stored) have their final keys and
    # values in its pages.
    kv_stored: int = 0
    # Engine steps this request has waited: at the head of the queue (the age bound of fair
    # admission), and, once running, since it last took part in a pass.
    steps_waited: int = 0
    # The ``cost`` the scheduler's running sum holds for the request, and the params object
    # it was computed from (a swapped one is charged again).
    charged_cost: int = 0
    charged_params: DecodeParams | None = field(default=None, init=False, repr=False)
    # Timing (time.monotonic seconds).
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    finished_time: float | None = None
    # The row of the engine's canvas rows (``foretell.scheduler.canvas_rows``) the canvas is a
    # view of while the request runs, and those rows; None before it first runs and after.
    canvas_row: int | None = field(default=None, init=False, repr=False)
    _canvas_rows: CanvasRows | None = field(default=None, init=False, repr=False)
    # Sorted masked canvas positions, recomputed only after the canvas changes (``write``): the
    # decoding step asks for them several times per step.
    _masked: np.ndarray | None = field(default=None, init=False, repr=False)
    _masked_list: list[int] | None = field(default=None, init=False, repr=False)
    _masked_writes: int = field(default=-1, init=False, repr=False)  # cursor WRITES it is of
    _prompt_len: int = field(default=0, init=False, repr=False)
    _canvas_len: int = field(default=0, init=False, repr=False)
    _cached: bool = field(default=False, init=False, repr=False)
    _uses_blocks: bool = field(default=True, init=False, repr=False)
    _blocks_from: int = field(default=0, init=False, repr=False)
    # What the batched step's geometry reads of the request's fixed part, and the params it
    # was computed from (see ``geometry``).
    _geometry: tuple[int, ...] = field(default=(), init=False, repr=False)
    _geometry_of: DecodeParams | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._start()

    def _start(self) -> None:
        """The request as it begins: a fresh canvas, cursors at the start, its own stream."""
        p = self.params
        # Read many times a step: fixed for the request's life, so computed once.
        self._prompt_len = len(self.prompt_token_ids)
        if self.block_causal:
            self._canvas_len = block_canvas(self._prompt_len, p)[0]
        else:
            self._canvas_len = self._prompt_len + p.gen_length
        self._cached = p.kv_cache is not None
        self._uses_blocks = self.family != "dream" or self._cached
        # Where block 0 starts: the prompt's end, or position 0 for block-causal models.
        self._blocks_from = 0 if self.block_causal else self._prompt_len
        prompt = torch.tensor(self.prompt_token_ids, dtype=torch.long)
        masks = torch.full((self.canvas_len - self.prompt_len,), self.mask_token_id)
        self.set_canvas(torch.cat([prompt, masks]))
        if self.canvas_row is None:
            self.revealed_np = np.zeros(self._canvas_len, dtype=bool)
        else:  # a restart in its row
            self.revealed_np[:] = False
        if self.block_causal:  # the first block to denoise holds the prompt's tail
            self.block = self.prompt_len // p.block_length
        self.apply_constraints()
        self.given = self.canvas != self.mask_token_id
        self.given_np = self.given.numpy()
        # A seeded request owns its stream; an unseeded one draws from the engine's shared
        # stream (the runner gives it a generator of its own only where a step needs one).
        self.generator = None if p.seed is None else torch.Generator().manual_seed(p.seed)
        if self.family == "dream":
            # Fast-dLLM's cached Dream decoding runs the grid within each block.
            steps = p.steps if p.kv_cache is None else p.steps_per_block
            self.timesteps = torch.linspace(1, p.eps, steps + 1)
            self.timesteps_np = self.timesteps.numpy()

    # -- cursor ----------------------------------------------------------------------------
    block = _CursorField(BLOCK)
    step_in_block = _CursorField(STEP_IN_BLOCK)
    global_step = _CursorField(GLOBAL_STEP)
    # The masks the current block held at its first step: LLaDA's reveal counts over the
    # block follow from it (``foretell.decoding.unmask.llada_step_count``).
    block_masks_at_start = _CursorField(AT_START)

    @property
    def last_gap(self) -> float | None:
        """The statistic Prophet's test compared at the last step (None before any)."""
        value = float(self.gap_np[0])
        return None if value != value else value

    @last_gap.setter
    def last_gap(self, value: float | None) -> None:
        self.gap_np[0] = np.nan if value is None else value

    @property
    def kv_slots(self) -> np.ndarray | None:
        """The pool slot of each canvas position while the request holds pages (its page
        table as slots): a view of its canvas row's table while it holds a row, so that a
        pass's pool use is cut from one matrix (``foretell.models.attention.PoolUses``)."""
        return self._kv_slots

    @kv_slots.setter
    def kv_slots(self, slots: np.ndarray | None) -> None:
        if slots is None:
            self._kv_slots = None
            return
        slots = np.asarray(slots, dtype=np.int64)[: self._canvas_len]  # none past the canvas
        if self._canvas_rows is not None:
            table = self._canvas_rows.slots[self.canvas_row, : len(slots)]
            table[:] = slots
            slots = table
        self._kv_slots = slots

    @property
    def revealed_last_step(self) -> np.ndarray:
        """Canvas positions revealed by the last step (sorted; none before the first)."""
        return self.revealed_np.nonzero()[0]

    @revealed_last_step.setter
    def revealed_last_step(self, positions: torch.Tensor | np.ndarray | None) -> None:
        self.revealed_np[:] = False
        if positions is not None:
            self.revealed_np[np.asarray(positions, dtype=np.int64)] = True

    # -- geometry ------------------------------------------------------------------------
    @property
    def geometry(self) -> tuple[int, ...]:
        """What the batched step's geometry reads of the request's fixed part, as one tuple so
        that a whole batch's is one array (fields: ``GEOMETRY``).
        Computed once per params object (a caller that swaps ``params`` gets a fresh one)."""
        if self._geometry_of is not self.params:
            p, policy = self.params, self.params.early_commit
            span = policy and policy.answer_span(self._prompt_len, self._canvas_len)
            self._geometry = (
                self._prompt_len,
                self._canvas_len,
                int(self._uses_blocks),
                self._blocks_from,
                p.block_length if self._uses_blocks else 0,
                int(self._cached),
                int(p.kv_cache == "prefix"),
                int(self.family == "dream" and self._cached),  # Fast-dLLM's Dream refresh
                *(span or (0, 0)),
                int(policy is not None and span is None),  # region: every mask
                p.steps,
                p.steps_per_block,
                int(self.family == "dream"),
                int(p.remasking == "confidence_threshold"),
                int(p.remasking == "random"),
                int(p.remasking == "origin"),
                self.num_sequences,
            )
            self._geometry_of = p
        return self._geometry

    @property
    def prompt_len(self) -> int:
        return self._prompt_len

    @property
    def canvas_len(self) -> int:
        """Prompt and generation; a block-causal canvas runs on to the end of its last block
        (decoded whole, as the official decoders do, then cut to ``gen_length``)."""
        return self._canvas_len

    @property
    def num_sequences(self) -> int:
        """Sequences this request puts in a forward pass (2 with classifier-free guidance)."""
        return 2 if self.params.cfg_scale > 0 else 1

    @property
    def cost(self) -> int:
        """Tokens of this request's largest pass (a whole canvas, and its cfg copy): what it
        must find room for in ``max_num_batched_tokens`` to run at all. A block-causal
        request's largest is its first (the prompt's whole blocks and the first block to
        denoise), or a finished block's store rows and the next block."""
        if self.block_causal:
            return block_canvas(self.prompt_len, self.params)[1]
        return self.canvas_len * self.num_sequences

    @property
    def step_tokens(self) -> int:
        """Query tokens this request's next pass runs: its canvas (and cfg copy), or in a
        cached step the recomputed span plus the read-only rows Prophet's region adds outside
        it (exactly the rows ``foretell.decoding.positions_needed`` asks for there); a
        block-causal request, its keys not yet stored up to its block's end."""
        if self.block_causal:
            return self.block_bounds()[1] - self.window_start
        if not self.cached_step:
            return self.cost
        lo, hi = self.query_span()
        policy = self.params.early_commit
        outside = 0
        span = None if policy is None else policy.answer_span(self.prompt_len, self.canvas_len)
        if policy is not None and span is None:
            outside = self.masked_count(self.prompt_len) - self.masked_count(lo, hi)
        elif span is not None:
            start, end = span
            outside = (end - start) - max(0, min(end, hi) - max(start, lo))
        return hi - lo + outside

    @property
    def window_start(self) -> int:
        """A block-causal request's first position its pass runs: the first whose keys its
        pages do not hold yet, or 0 without the block cache (the whole window re-encoded)."""
        return self.kv_stored if self.params.block_cache else 0

    @property
    def query_start(self) -> int:
        """A block-causal request's first position of its query sequence: its block's start,
        or 0 without the block cache (the window re-encoded); see ``foretell.engine.packing``."""
        return self.block_bounds()[0] if self.params.block_cache else 0

    @property
    def uses_blocks(self) -> bool:
        """Semi-autoregressive blocks: LLaDA, and Dream with a KV cache (Fast-dLLM); Dream
        otherwise decodes the whole generation at once."""
        return self._uses_blocks

    def block_bounds(self) -> tuple[int, int]:
        """Canvas positions ``[start, end)`` of the block being decoded (a block-causal
        model's blocks are aligned at position 0, the others' at the prompt's end)."""
        if not self._uses_blocks:
            return self._prompt_len, self._canvas_len
        block = self.params.block_length
        start = self._blocks_from + self.block * block
        return start, start + block

    @property
    def cached_step(self) -> bool:
        """Whether this step reads the KV cache: a cached request after its block's first
        (refresh) step. Block-causal requests always read theirs (``block_step``)."""
        return self._cached and self.step_in_block > 0

    def set_masked(self, masked: np.ndarray) -> None:
        """The sorted masked positions, when the caller has them already (after a write)."""
        self._masked = masked
        self._masked_list = None

    def query_span(self) -> tuple[int, int]:
        """Canvas positions ``[start, end)`` this step recomputes: the whole canvas, or in a
        cached step from the block's start to the canvas end (``prefix``) or the block's end
        (``dual``), as Fast-dLLM's cached decoders."""
        if not self.cached_step:
            return 0, self.canvas_len
        start, end = self.block_bounds()
        return start, (self.canvas_len if self.params.kv_cache == "prefix" else end)

    def masked_positions(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Sorted canvas positions in ``[start, end)`` that still hold the mask token."""
        return torch.from_numpy(self.masked_np(start, end))

    def masked_np(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """:meth:`masked_positions` as a NumPy array (a view: do not write to it)."""
        lo, hi = self._masked_bounds(start, end)
        return self._masked[lo:hi]

    def masked_count(self, start: int = 0, end: int | None = None) -> int:
        """How many canvas positions in ``[start, end)`` still hold the mask token."""
        lo, hi = self._masked_bounds(start, end)
        return hi - lo

    def _masked_bounds(self, start: int, end: int | None) -> tuple[int, int]:
        writes = self.cursor_np[WRITES]
        if self._masked is None or self._masked_writes != writes:
            self._masked = (self.canvas_np == self.mask_token_id).nonzero()[0]
            self._masked_list = None
            self._masked_writes = writes
        if self._masked_list is None:  # built when first asked (bisect over a list is cheap)
            self._masked_list = self._masked.tolist()
        lo = bisect.bisect_left(self._masked_list, start)
        hi = len(self._masked_list) if end is None else bisect.bisect_left(self._masked_list, end)
        return lo, hi

    def write(self, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Put ``tokens`` at canvas ``positions``: the only way decoding changes a canvas."""
        self.canvas[positions] = tokens
        self._masked = None

    def write_np(self, positions: np.ndarray | slice, tokens: np.ndarray) -> None:
        """:meth:`write` from host arrays (the batched step: no tensor op per request)."""
        self.canvas_np[positions] = tokens
        self._masked = None

    @property
    def canvas(self) -> torch.Tensor:
        """The canvas as a tensor of the same memory as ``canvas_np`` (made at the first ask
        after the canvas moved: a request the batched step decodes never needs it)."""
        if self._canvas is None:
            with torch.inference_mode(False):  # a normal tensor: decoding writes to it in place
                self._canvas = torch.from_numpy(self.canvas_np)
        return self._canvas

    def set_canvas(self, canvas: torch.Tensor) -> None:
        """Take a whole new canvas (a host tensor: ``canvas_np`` shares its memory); copied into
        the request's canvas row while it holds one."""
        if self.canvas_row is not None:
            if len(canvas) != len(self.canvas_np):  # its row holds exactly its canvas
                raise ValueError(
                    f"request {self.request_id!r}: a canvas of {len(canvas)} tokens for one "
                    f"of {len(self.canvas_np)} while it holds a canvas row"
                )
            self.canvas_np[:] = canvas.numpy()
        else:
            self._canvas = canvas
            self.canvas_np = canvas.numpy()
        self._masked = None

    def hold_canvas_row(self, rows: CanvasRows, row: int) -> None:
        """Make the canvas, cursor, gap and reveals views of ``rows``' row ``row`` (which
        already holds their values)."""
        self.canvas_row, self._canvas_rows = row, rows
        self.canvas_np = rows.view(row, self._canvas_len)
        self.cursor_np = rows.cursor[row]
        self.gap_np = rows.last_gap[row : row + 1]
        self.revealed_np = rows.revealed[row, : self._canvas_len]
        if self._kv_slots is not None:
            self._kv_slots = rows.slots[row, : len(self._kv_slots)]
        self._canvas = None

    def leave_canvas_row(self) -> None:
        """Take copies of the row's canvas, cursor, gap and reveals as its own again."""
        self.canvas_np = self.canvas_np.copy()
        self.cursor_np = self.cursor_np.copy()
        self.gap_np = self.gap_np.copy()
        self.revealed_np = self.revealed_np.copy()
        if self._kv_slots is not None:
            self._kv_slots = self._kv_slots.copy()
        self.canvas_row, self._canvas_rows = None, None
        self._canvas = None

    def release_canvas_row(self) -> None:
        """Give the canvas row back (the request ended or was preempted); its canvas is kept."""
        if self._canvas_rows is not None:
            self._canvas_rows.remove(self)

    def apply_constraints(self) -> None:
        for pos, token in self.constraint_ids.items():
            self.canvas[self.prompt_len + pos] = token
        self._masked = None

    def unconditional_canvas(self) -> torch.Tensor:
        """The cfg input: the canvas with the prompt (and constraints) masked."""
        return self.canvas.masked_fill(self.given, self.mask_token_id)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        if reason in ("steps", "early_commit") and self.stop_ids and not self.block_causal:
            # LLaDA / Dream decode the whole canvas; a stop id in it still ends what is returned
            gen = self.canvas_np[self.prompt_len : self.prompt_len + self.params.gen_length]
            if np.isin(gen, self.stop_ids).any():
                reason = "stop"
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
        self.finished_time = time.monotonic()

    def restart(self) -> None:
        """Back to the start (preempted: its pages were taken back). A block-causal request
        decodes the same tokens again: its steps do not depend on its batch, and its random
        stream starts over from the same seed."""
        self.global_step = self.step_in_block = self.block = self.kv_stored = 0
        self.block_masks_at_start = 0
        self.commit_step = self.last_gap = None
        self.steps_waited = 0
        self.preemptions += 1
        self._start()

    def release_pages(self) -> list[int]:
        """Give up the request's pages (finished, aborted or failed: never read again)."""
        pages = self.kv_pages or []
        self.kv_pages, self.kv_slots = None, None
        return pages

    @property
    def generated_ids(self) -> list[int]:
        """The generation as the official decoders return it: ``gen_length`` ids (a
        block-causal canvas's tail past it dropped), ending after the first stop id."""
        ids = self.canvas_np[self.prompt_len : self.prompt_len + self.params.gen_length].tolist()
        if self.stop_ids:
            stops = set(self.stop_ids)
            for i, t in enumerate(ids):
                if t in stops:
                    return ids[: i + 1]
        return ids
