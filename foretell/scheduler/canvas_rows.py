"""Every running request's canvas as one row of a single token matrix (vLLM's persistent batch).

A request's canvas is read whole or in spans every pass and written at its reveals every step.
Held as one array per request, both cost a NumPy call per request per step; held as rows of one
matrix, a whole batch's reads are one gather and its reveals one scatter, whatever the batch
size (``foretell.engine.packing``, ``foretell.decoding.batched``). On a GPU this matrix is the
one to keep on the device; here it is a host array.

A request takes a row when it first runs and gives it back when it ends (finished, aborted,
failed or preempted: ``Request.release_canvas_row``). While it holds one, ``Request.canvas`` and
``canvas_np`` are views of that row, so every reader and writer of a canvas, the per-request
step included, works on the row itself. So are the rest of what a step changes: the request's
cursor (``Request.cursor_np``), its last Prophet gap and the positions it revealed last, so
that the batched step moves a whole batch on with a few array writes, not a call per request;
and its KV page table (``Request.kv_slots``), so that a pass's pool use is cut from one matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from foretell.params import PROPHET_COLUMNS
from foretell.scheduler.gather import identities, where
from foretell.scheduler.request import CURSOR_FIELDS, GEOMETRY

if TYPE_CHECKING:
    from foretell.scheduler.request import Request

# A block-causal request's geometry but for its sequences (the last field): its sequence is
# laid out on its own (``foretell.engine.packing._block_layouts``).
NO_GEOMETRY = (0,) * (GEOMETRY - 1)


def block_causal_rows(geometry: np.ndarray) -> np.ndarray:
    """Which rows of a batch's geometry are block-causal requests' (``NO_GEOMETRY``: the only
    geometry with a canvas of 0)."""
    return geometry[:, 1] == 0


class CanvasRows:
    """Rows of ``[capacity, width]`` int64 tokens, one per running request; both dimensions
    grow by doubling when a request needs more (every holder's views are moved along).

    Each row also keeps its request's geometry (``Request.geometry``, fixed for its life) and
    the ``extra`` columns its user derives from a request's params alone (the runner's: which
    path steps it), and the float ``values`` it derives likewise with ``values_of`` (the
    runner's: sampling parameters, threshold, guidance), and for a block-causal request the
    float ``block_constants`` it derives with ``block_constants_of`` (the block step's: block
    length, steps, rule, Prophet), so that a pass reads a whole batch's with one gather
    (:meth:`geometry_of`, ``values``, ``block_constants``); and its cursor, last gap and last
    reveals (``cursor``, ``last_gap``, ``revealed``)."""

    def __init__(
        self,
        capacity: int = 8,
        width: int = 64,
        extra: Callable[[Request], tuple[int, ...]] | None = None,
        extra_width: int = 0,
        values_of: Callable[[Request], tuple[float, ...]] | None = None,
        values_width: int = 0,
        block_constants_of: Callable[[Request], tuple[float, ...]] | None = None,
        block_constants_width: int = 0,
    ) -> None:
        if capacity < 1 or width < 1:
            raise ValueError(f"capacity and width: must be >= 1, got {capacity} and {width}")
        if (extra is None) != (extra_width == 0):
            raise ValueError("extra and extra_width: give both or neither")
        if (values_of is None) != (values_width == 0):
            raise ValueError("values_of and values_width: give both or neither")
        if (block_constants_of is None) != (block_constants_width == 0):
            raise ValueError("block_constants_of and block_constants_width: give both or neither")
        self.extra = extra
        self.values_of = values_of
        self.block_constants_of = block_constants_of
        # A block-causal row's constants (NaN: another kind of request's row, or a free one).
        self.block_constants = np.full((capacity, block_constants_width), np.nan)
        # Each row's float columns (``values``), read with the geometry.
        self.values = np.full((capacity, values_width), np.nan)
        self.tokens = np.zeros((capacity, width), dtype=np.int64)
        self.revealed = np.zeros((capacity, width), dtype=bool)
        self.slots = np.zeros((capacity, width), dtype=np.int64)  # KV page tables, as slots
        self.geometry = np.zeros((capacity, GEOMETRY + extra_width), dtype=np.int64)
        self.cursor = np.zeros((capacity, CURSOR_FIELDS), dtype=np.int64)
        self.last_gap = np.full(capacity, np.nan)
        # Each row's Prophet policy (``Prophet.columns``; NaN: none).
        self.policy = np.full((capacity, PROPHET_COLUMNS), np.nan)
        self._geometry_of: list[object] = [None] * capacity  # the params each row's is from
        self._geometry_id = np.zeros(capacity, dtype=np.uint64)  # their ids (0: none)
        # Each row's given positions (the prompt and constraints: ``Request.given_np``), which
        # a guided request's unconditional copy masks.
        self.given = np.zeros((capacity, width), dtype=bool)
        self._holders: list[Request | None] = [None] * capacity
        self._free = list(range(capacity - 1, -1, -1))  # popped from the end: lowest row first

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def flat(self) -> np.ndarray:
        """The matrix as one array (a view): token ``p`` of row ``r`` is ``flat[r * width + p]``."""
        return self.tokens.reshape(-1)

    @property
    def num_held(self) -> int:
        return len(self._holders) - len(self._free)

    def add(self, req: Request) -> int:
        """Give ``req`` a row holding its canvas; its canvas becomes a view of the row."""
        if req.canvas_row is not None:
            raise ValueError(f"request {req.request_id!r} already holds row {req.canvas_row}")
        if req.canvas_len > self.width or not self._free:
            self._grow(
                rows=len(self._holders) * (2 if not self._free else 1),
                width=max(self.width, _pow2_at_least(req.canvas_len)),
            )
        row = self._free.pop()
        self._holders[row] = req
        self.tokens[row, : req.canvas_len] = req.canvas_np
        self.revealed[row, : req.canvas_len] = req.revealed_np
        self.given[row] = False
        self.given[row, : req.canvas_len] = req.given_np
        if req.kv_slots is not None:
            self.slots[row, : len(req.kv_slots)] = req.kv_slots
        self.cursor[row] = req.cursor_np
        self.last_gap[row] = req.gap_np[0]
        req.hold_canvas_row(self, row)
        return row

    def remove(self, req: Request) -> None:
        """Take ``req``'s row back; its canvas becomes a copy of its own again."""
        row = req.canvas_row
        if row is None or self._holders[row] is not req:
            raise ValueError(f"request {req.request_id!r} holds no row of these canvas rows")
        req.leave_canvas_row()
        self._holders[row] = None
        self._geometry_of[row] = None
        self._geometry_id[row] = 0
        self.block_constants[row] = np.nan
        self._free.append(row)

    def view(self, row: int, length: int) -> np.ndarray:
        return self.tokens[row, :length]

    def geometry_of(self, batch: list[Request], rows: np.ndarray) -> np.ndarray:
        """``[len(batch), GEOMETRY]``: the geometry of every request of ``batch`` (holding
        ``rows``), recomputed only for a request whose params were swapped since (with its
        ``values`` and policy)."""
        held = self._geometry_of
        stale = self._geometry_id[rows] != identities(batch, "params")
        for req in where(batch, stale) if stale.any() else ():
            row = req.canvas_row
            block_causal = (*NO_GEOMETRY, req.num_sequences) if req.block_causal else None
            self.geometry[row, :GEOMETRY] = block_causal or req.geometry
            if self.extra is not None:
                self.geometry[row, GEOMETRY:] = self.extra(req)
            if self.values_of is not None:
                self.values[row] = self.values_of(req)
            if self.block_constants_of is not None and req.block_causal:
                self.block_constants[row] = self.block_constants_of(req)
            policy = None if req.block_causal else req.params.early_commit
            self.policy[row] = np.nan if policy is None else policy.columns()
            held[row] = req.params
            self._geometry_id[row] = id(req.params)  # ``held`` keeps it alive
        return self.geometry[rows]

    def _grow(self, rows: int, width: int) -> None:
        self.tokens = _grown(self.tokens, (rows, width), 0)
        self.revealed = _grown(self.revealed, (rows, width), False)
        self.given = _grown(self.given, (rows, width), False)
        self._geometry_id = _grown(self._geometry_id, (rows,), 0)
        self.slots = _grown(self.slots, (rows, width), 0)
        self.geometry = _grown(self.geometry, (rows, self.geometry.shape[1]), 0)
        self.cursor = _grown(self.cursor, (rows, CURSOR_FIELDS), 0)
        self.last_gap = _grown(self.last_gap, (rows,), np.nan)
        self.policy = _grown(self.policy, (rows, PROPHET_COLUMNS), np.nan)
        self.values = _grown(self.values, (rows, self.values.shape[1]), np.nan)
        width = self.block_constants.shape[1]
        self.block_constants = _grown(self.block_constants, (rows, width), np.nan)
        added = rows - len(self._holders)
        self._free = list(range(rows - 1, rows - 1 - added, -1)) + self._free
        self._holders += [None] * added
        self._geometry_of += [None] * added
        for row, req in enumerate(self._holders):
            if req is not None:  # its views were of the old matrix
                req.hold_canvas_row(self, row)


def _grown(old: np.ndarray, shape: tuple[int, ...], fill: object) -> np.ndarray:
    """``old`` in the top-left corner of a new array of ``shape``, the rest ``fill``."""
    new = np.full(shape, fill, dtype=old.dtype)
    new[tuple(slice(0, n) for n in old.shape)] = old
    return new


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
