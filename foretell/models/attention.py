"""One attention interface for packed, variable-length, bidirectional sequences.

The engine packs every running canvas into one flat ``[tokens, heads, head_dim]`` tensor with
per-sequence boundaries, so attention must never cross a boundary. Backends:

- ``sdpa`` (default, CPU and GPU): torch's scaled_dot_product_attention run on views of the
  packed tensor, one batched call per run of consecutive equal-length sequences (the runner
  packs canvases ordered by length, so a run is usually every canvas of one length). On CPU
  this beat a padded batch with a boolean mask (see docs/benchmarks.md): no work on padding.
- ``sdpa_buckets``: torch SDPA with one call per length bucket (the next power of two): each
  sequence padded to its own bucket and its padding keys masked, so the number of calls does
  not grow with the batch's variety of lengths and a sequence's result does not depend on its
  batch-mates; padding changes rounding, so it is not bitwise the official kernel's result
  (``sdpa`` is: it stays the default). Block-causal sequences (SDAR, LLaDA2) take a mask per
  query in their bucket where their queries see different blocks.
- ``flash``: flash-attn's varlen kernel (CUDA only; untested on the CPU machines we develop on).
- ``xformers``: xformers' memory-efficient attention with a block-diagonal mask (CUDA only;
  untested here).

A sequence may use the KV pool (:class:`CacheUse`, Fast-dLLM's block cache): its rows' keys
and values are stored in its request's pages (a refresh stores the whole canvas; a cached step
the span it recomputes), and a cached step's queries attend to the keys of its whole canvas read
back through its page table (the cache with the fresh span in place): q length != k length.
:func:`plan_kv` works the pass's pool use out once; every layer then stores with one indexed
copy and gathers with one indexed read, and SDPA runs one call per group of equal shapes.
flash-attn and xformers get separate query and key lengths per sequence (untested here: no
GPU).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from foretell.ranges import concat_ranges

BACKENDS = ("auto", "sdpa", "sdpa_buckets", "flash", "xformers")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# flash-attn's kernels take only these dtypes; anything else fails at the first pass.
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def resolve_backend(
    name: str, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> str:
    """Turn ``auto`` into a concrete backend, and refuse one that cannot run on ``device`` in
    ``dtype``. ``auto`` is flash-attn only where it can run: CUDA, the package installed, and
    a half-precision model; SDPA otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown backend {name!r}; choose one of {BACKENDS}")
    is_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        flash = is_cuda and dtype in FLASH_DTYPES and _installed("flash_attn")
        return "flash" if flash else "sdpa"
    if name in ("flash", "xformers"):
        module = "flash_attn" if name == "flash" else "xformers"
        if not is_cuda:
            raise ValueError(f"attention_backend: {name!r} needs a CUDA device, got {device}")
        if name == "flash" and dtype not in FLASH_DTYPES:
            raise ValueError(
                f"attention_backend: 'flash' needs float16 or bfloat16, the model is {dtype}"
            )
        if not _installed(module):
            raise ValueError(
                f"attention_backend: {name!r} needs the {module} package "
                f"(pip install 'foretell[{name}]')"
            )
    return name


def _expand_kv(x: torch.Tensor, num_heads: int, head_dim_axis: int) -> torch.Tensor:
    """Repeat grouped key/value heads so that every query head has its own (HF's repeat_kv)."""
    groups = num_heads // x.shape[head_dim_axis]
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim_axis)


class CacheUse(NamedTuple):
    """How one packed sequence uses its request's pages of the KV pool in a pass.

    ``slots`` holds the pool slot of each canvas position of the request. Rows
    ``[write_row, write_row + write_len)`` of the sequence store their (rotated) keys and
    values at canvas positions ``[write_start, write_start + write_len)``. With ``read_len``
    None the sequence attends to itself (a refresh); otherwise every row attends to the keys of
    canvas positions ``[0, read_len)`` in the pool, after this pass's writes, and rows outside
    the written span are read-only (never stored).

    ``block_size`` (block-causal models): the sequence is the canvas positions
    ``[write_start, read_len)``, all written, and a row sees a key when the key's block (of
    ``block_size`` positions from 0) is not after its own: a finished block's store rows and
    the next block's queries share one sequence.

    A named tuple: a pass builds one per cached sequence, and a tuple is built in a fraction of
    a frozen dataclass's time.
    """

    slots: np.ndarray  # the pool slot of each canvas position (a host page table)
    write_row: int
    write_start: int
    write_len: int
    read_len: int | None = None
    block_size: int | None = None


@dataclass(frozen=True)
class KVPlan:
    """A pass's use of the KV pool, worked out once for every layer.

    Writes are one indexed copy a layer (``write_rows`` -> ``write_slots``); reads one indexed
    gather a layer (``read_slots``: every reading sequence's keys back to back). Sequences that
    attend to themselves form ``self_runs``; reading sequences form ``read_groups`` of equal
    query and key lengths, one attention call each.
    """

    storage: torch.Tensor  # the pool: [layers, 2, slots, kv_heads, head_dim]
    write_rows: torch.Tensor | None  # flat rows of the pass whose keys/values are stored
    write_slots: torch.Tensor | None
    read_slots: torch.Tensor | None
    # (first row, sequence lengths) of consecutive sequences attending to themselves.
    self_runs: tuple[tuple[int, tuple[int, ...]], ...]
    # (first row, count, query length, first gathered key, key length).
    read_groups: tuple[tuple[int, int, int, int, int], ...]
    # Each read group's block-causal mask ([query length, key length] booleans), or None.
    read_masks: tuple[torch.Tensor | None, ...]
    seq_lens: tuple[int, ...]
    k_lens: tuple[int, ...]  # keys each sequence attends to (flash-attn / xformers)
    # ``sdpa_buckets``: every sequence's (first query row, queries, first key row, keys, block
    # size, canvas position of its first query), where a reading sequence's keys are its
    # gathered ones, which follow the pass's own rows (key ``j`` is canvas position ``j``);
    # self-attending sequences first, then reading ones, each in packed order.
    specs: np.ndarray | None = None
    # flash-attn / xformers only: every sequence's keys back to back, as indices into the
    # pass's keys followed by the gathered ones, and the cumulative query and key lengths.
    key_index: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None

    @property
    def span(self) -> int:
        """One more than the largest canvas position any sequence of the pass can hold."""
        return max(self.k_lens, default=0)


@dataclass(frozen=True)
class PoolUses:
    """Every packed sequence's :class:`CacheUse` as arrays, one entry per sequence: how a
    pass's KV pool use is handed to the model. The packer builds a pass's from its requests'
    rows with a few array ops, and :func:`plan_kv` works it out with a few more, whatever the
    batch (a list of :class:`CacheUse` is turned into one by :meth:`of`)."""

    slots: np.ndarray  # [tables, width]: page tables (the pool slot of each canvas position)
    table: np.ndarray  # [sequences] each one's row of ``slots``; -1: it uses no pool
    write_row: np.ndarray
    write_start: np.ndarray
    write_len: np.ndarray
    read_len: np.ndarray  # -1: it attends to itself
    block_size: np.ndarray  # 0: not block-causal

    @classmethod
    def of(cls, caches: Sequence[CacheUse | None]) -> PoolUses:
        n = len(caches)
        width = max((len(c.slots) for c in caches if c is not None), default=1)
        slots = np.zeros((n, max(width, 1)), dtype=np.int64)
        fields = np.zeros((6, n), dtype=np.int64)
        fields[0] = fields[4] = -1
        for i, c in enumerate(caches):
            if c is not None:
                slots[i, : len(c.slots)] = c.slots
                fields[:, i] = pool_columns(i, c)
        return cls(slots, *fields)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, part: slice) -> PoolUses:
        """The uses of a run of consecutive sequences (their page tables shared)."""
        return PoolUses(
            self.slots,
            self.table[part],
            self.write_row[part],
            self.write_start[part],
            self.write_len[part],
            self.read_len[part],
            self.block_size[part],
        )

    def uses_any(self) -> bool:
        return bool((self.table >= 0).any())

    def uses_all(self) -> bool:
        return bool((self.table >= 0).all())

    def use(self, seq: int) -> CacheUse | None:
        """Sequence ``seq``'s use as a :class:`CacheUse` (for inspection), or None."""
        if self.table[seq] < 0:
            return None
        read, block = int(self.read_len[seq]), int(self.block_size[seq])
        return CacheUse(
            self.slots[self.table[seq]],
            int(self.write_row[seq]),
            int(self.write_start[seq]),
            int(self.write_len[seq]),
            None if read < 0 else read,
            block or None,
        )


def pool_columns(table: int, cache: CacheUse) -> tuple[int, int, int, int, int, int]:
    """``cache`` as one sequence's :class:`PoolUses` fields, its page table being row
    ``table`` of the slots."""
    read = -1 if cache.read_len is None else cache.read_len
    return (table, cache.write_row, cache.write_start, cache.write_len, read, cache.block_size or 0)


def pool_uses(caches: PoolUses | Sequence[CacheUse | None] | None) -> PoolUses | None:
    """``caches`` as :class:`PoolUses` (None stays None)."""
    if caches is None or isinstance(caches, PoolUses):
        return caches
    return PoolUses.of(caches)


def plan_kv(
    storage: torch.Tensor,
    seq_lens: list[int],
    caches: PoolUses | Sequence[CacheUse | None],
    varlen: bool = False,
    group_masks: bool = True,
) -> KVPlan:
    """The :class:`KVPlan` of packed sequences ``seq_lens`` using ``caches`` (one entry per
    sequence), from array ops over the whole pass: the write rows and slots and the read slots
    are each one gather out of the page tables. Reading sequences of equal shapes that are
    neighbours share one call: the runner packs them so. ``varlen``: also lay out every
    sequence's keys for one varlen call (flash-attn, xformers). ``group_masks``: build the
    block-causal masks of those calls (``read_masks``; ``sdpa_buckets`` builds its own from
    ``specs`` and reads none of them: all None then)."""
    uses = pool_uses(caches)
    device = storage.device
    lens = np.asarray(seq_lens, dtype=np.int64).reshape(-1)
    starts = np.cumsum(lens) - lens
    width, flat = uses.slots.shape[1], uses.slots.reshape(-1)
    used = uses.table >= 0
    writes = used & (uses.write_len > 0)
    first = starts[writes] + uses.write_row[writes]
    write_len = uses.write_len[writes]
    write_rows = concat_ranges(first, first + write_len)
    at = uses.table[writes] * width + uses.write_start[writes]
    write_slots = flat[concat_ranges(at, at + write_len)]
    reads = used & (uses.read_len >= 0)
    read_len = np.where(reads, uses.read_len, 0)
    at = uses.table[reads] * width
    read_slots = flat[concat_ranges(at, at + read_len[reads])]
    k_lens = np.where(reads, uses.read_len, lens)
    read_at = np.cumsum(read_len) - read_len  # each reading sequence's first gathered key
    # Runs of consecutive sequences attending to themselves.
    own = np.flatnonzero(~reads)
    run_first = np.flatnonzero(np.diff(own, prepend=-2) != 1)
    run_end = np.append(run_first[1:], len(own))[: len(run_first)]
    own_lens = lens[own].tolist()
    self_runs = tuple(
        (int(starts[own[a]]), tuple(own_lens[a:b]))
        for a, b in zip(run_first.tolist(), run_end.tolist(), strict=True)
    )
    # Groups of neighbouring reading sequences of equal query length, key length and block.
    seqs = np.flatnonzero(reads)
    shape = np.stack([lens[seqs], uses.read_len[seqs], uses.block_size[seqs]])
    new = np.ones(len(seqs), dtype=bool)
    new[1:] = (np.diff(seqs) != 1) | (np.diff(shape, axis=1) != 0).any(axis=0)
    heads = np.flatnonzero(new)
    counts = np.diff(np.append(heads, len(seqs)))
    g = seqs[heads]
    columns = (starts[g], counts, lens[g], read_at[g], uses.read_len[g], uses.block_size[g])
    groups = list(zip(*(c.tolist() for c in columns), strict=True))
    if group_masks:
        masks = tuple(_block_mask(q, k, block, device) for _, _, q, _, k, block in groups)
    else:
        masks = (None,) * len(groups)

    def to_device(index: np.ndarray) -> torch.Tensor | None:
        """A host index as one device tensor: one copy for the whole pass."""
        return torch.from_numpy(index).to(device) if index.size else None

    key_index = cu_q = cu_k = None
    if varlen:
        # Keys of a self-attending sequence are its own rows; a reading one's are its gathered
        # keys, which follow the pass's own rows in the concatenation attention builds.
        key_from = np.where(reads, read_at + int(lens.sum()), starts)
        key_index = torch.from_numpy(concat_ranges(key_from, key_from + k_lens)).to(device)
        cu_q = torch.tensor(np.cumsum([0, *seq_lens]), dtype=torch.int32, device=device)
        cu_k = torch.tensor(np.cumsum([0, *k_lens]), dtype=torch.int32, device=device)
    # Self-attending sequences first, then reading ones (whose keys follow the pass's rows).
    spec_order = np.concatenate([own, seqs])
    key_first = np.where(reads, read_at + int(lens.sum()), starts)
    block = np.where(reads, uses.block_size, 0)
    first_query = np.where(reads, uses.read_len - lens, 0)
    specs = np.stack([starts, lens, key_first, k_lens, block, first_query], axis=1)[spec_order]
    return KVPlan(
        storage=storage,
        write_rows=to_device(write_rows),
        write_slots=to_device(write_slots),
        read_slots=to_device(read_slots),
        self_runs=self_runs,
        read_groups=tuple(group[:5] for group in groups),
        read_masks=masks,
        seq_lens=tuple(seq_lens),
        k_lens=tuple(k_lens.tolist()),
        key_index=key_index,
        cu_q=cu_q,
        cu_k=cu_k,
        specs=specs,
    )


def _block_mask(
    length: int, read_len: int, block_size: int, device: torch.device
) -> torch.Tensor | None:
    """A block-causal sequence's mask: its rows are the last ``length`` of its ``read_len``
    keys. None when every row sees every key (a block's queries over the blocks before it:
    the common step), where SDPA gives the same numbers without a mask; and without blocks
    (``block_size`` 0)."""
    if not block_size:
        return None
    first_row, last_key = read_len - length, read_len - 1
    if first_row // block_size == last_key // block_size:
        return None
    keys = torch.arange(read_len, device=device) // block_size
    rows = keys[read_len - length :]
    return keys[None, :] <= rows[:, None]


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    backend: str = "sdpa",
    kv: KVPlan | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence.

    ``q`` is ``[T, H, D]``, ``k``/``v`` are ``[T, H_kv, D]`` and ``seq_lens`` sums to ``T``.
    ``kv`` says how the sequences use the KV pool (see :class:`KVPlan`); ``layer`` is the
    layer being run. Returns ``[T, H, D]``.
    """
    if kv is not None:
        return _cached_attention(q, k, v, backend, kv, layer)
    num_heads = q.shape[1]
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        cu = torch.tensor([0, *seq_lens], device=q.device).cumsum(0).to(torch.int32)
        longest = max(seq_lens)
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=False)
    k = _expand_kv(k, num_heads, 1)
    v = _expand_kv(v, num_heads, 1)
    if backend == "xformers":
        from xformers.ops import fmha

        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(seq_lens)
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    if backend == "sdpa_buckets":
        return _sdpa_buckets(q, k, v, seq_lens)
    out = torch.empty_like(q)
    _sdpa_runs(q, k, v, out, 0, seq_lens)
    return out


def _bucket(length: int) -> int:
    """The padded length of a sequence under ``sdpa_buckets``: the next power of two, at
    least 16 (a length's bucket depends on nothing else, so neither does its result)."""
    return max(16, 1 << (length - 1).bit_length())


def _sdpa_buckets(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]
) -> torch.Tensor:
    """Self-attention of packed sequences, one call per length bucket (``k``/``v`` expanded)."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    specs = np.stack([starts, lens, starts, lens], axis=1)
    out = torch.empty_like(q)
    _bucketed(q, k, v, out, specs)
    return out


@dataclass(frozen=True)
class _BucketGroup:
    """One SDPA call of ``sdpa_buckets``: ``count`` sequences padded to ``q_len`` queries and
    ``k_len`` keys, gathered (and their outputs scattered back) through flat row indices."""

    count: int
    q_len: int
    k_len: int
    q_index: torch.Tensor  # [count, q_len] rows of q (the padding row past the end)
    q_flat: torch.Tensor  # q_index flattened, a view (where the outputs go)
    k_index: torch.Tensor  # [count, k_len] rows of k and v (padding: its first key, masked)
    # Added to the scores, in the queries' dtype: 0 where a key is seen, -inf where not, what
    # SDPA makes of a boolean mask at every call (three ops), made once per pass instead.
    # [1, count, 1, k_len] real keys, or [1, count, q_len, k_len] the keys each query sees
    # when a block-causal sequence's queries do not all see the same ones (the call's batch
    # is ``[heads, count]``: see :func:`_bucketed`; a mask of SDPA's four dimensions keeps
    # its fused CPU kernel, where one of three fell back to a path four times as slow).
    mask: torch.Tensor


# The last pass's (key, groups): every layer of a pass has the same layout, so it is built (and
# its indices copied to the device) once per pass, not once per layer. One tuple, stored and
# read whole, so that engines in two threads never pair one pass's key with another's groups.
_last_layout: list = [None]


def _buckets(lengths: np.ndarray) -> np.ndarray:
    """:func:`_bucket` of every length at once."""
    exponent = np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    return np.maximum(16, np.left_shift(1, exponent))


def _bucket_groups(
    specs: np.ndarray | list[tuple[int, int, int, int]],
    rows_q: int,
    rows_k: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> list[_BucketGroup]:
    """The SDPA calls of ``specs`` (``[sequences, 4 or 6]``: first query row, queries, first
    key row, keys, and for a block-causal sequence its block size and its first query's canvas
    position): one per pair of buckets, in the order each pair first appears, its members in
    ``specs``' order, its mask in ``dtype`` (the queries'). Worked out once per pass (every
    layer has the same layout)."""
    specs = np.asarray(specs, dtype=np.int64)
    specs = specs.reshape(-1, specs.shape[-1] if specs.ndim == 2 else 4)
    if specs.shape[1] == 4:  # no block-causal sequence
        specs = np.concatenate([specs, np.zeros((len(specs), 2), dtype=np.int64)], axis=1)
    key = (specs.tobytes(), rows_q, rows_k, device, dtype)
    last = _last_layout[0]
    if last is not None and last[0] == key:
        return last[1]
    shape = _buckets(specs[:, 1]) * (1 << 32) + _buckets(specs[:, 3])
    _, first, which = np.unique(shape, return_index=True, return_inverse=True)
    # Every group's indices (and block-causal masks' block numbers) go to the device in one
    # copy, every additive mask in another, each split into the groups' views there: a
    # constant number of host-to-device copies per pass, however many groups.
    ints: list[np.ndarray] = []
    floats: list[np.ndarray] = []
    layouts = []
    for pair in np.argsort(first, kind="stable").tolist():
        table = specs[which.reshape(-1) == pair]
        qb, kb = _bucket(int(table[0, 1])), _bucket(int(table[0, 3]))
        q_col, k_col = np.arange(qb), np.arange(kb)
        q_index = np.where(q_col < table[:, 1:2], table[:, 0:1] + q_col, rows_q)
        # A padding key reads its sequence's first key (masked; a row that exists even for a
        # sequence without keys at the pass's end).
        pad = np.minimum(table[:, 2:3], max(rows_k - 1, 0))
        k_index = np.where(k_col < table[:, 3:4], table[:, 2:3] + k_col, pad)
        real = k_col < table[:, 3:4]
        mask = _bucket_mask(table, real, q_col)
        per_query = isinstance(mask, tuple)  # a block-causal member's queries see different keys
        ints += [q_index, k_index]
        if per_query:
            ints += mask
        else:
            floats.append(mask)
        layouts.append((len(table), qb, kb, per_query))
    int_pieces = iter(_uploaded(ints, device, torch.int64))
    float_pieces = iter(_uploaded(floats, device, dtype))
    groups = []
    for count, qb, kb, per_query in layouts:
        q_flat, k_flat = next(int_pieces), next(int_pieces)
        if per_query:  # [1, count, q_len, k_len]: each key's block against each query's
            keys, queries = next(int_pieces).view(count, kb), next(int_pieces).view(count, qb)
            seen = (keys[:, None, :] <= queries[:, :, None])[None]
            full = torch.full(seen.shape, -torch.inf, dtype=dtype, device=device)
            mask = full.masked_fill_(seen, 0.0)
        else:  # [1, count, 1, k_len]: the real keys
            mask = next(float_pieces).view(1, count, 1, kb)
        group = _BucketGroup(
            count, qb, kb, q_flat.view(count, qb), q_flat, k_flat.view(count, kb), mask
        )
        groups.append(group)
    _last_layout[0] = (key, groups)
    return groups


def _uploaded(arrays: list[np.ndarray], device: torch.device, dtype: torch.dtype) -> tuple:
    """``arrays`` on ``device`` in ``dtype``, flattened: one copy for all, split there into
    one view each. Each of the layout's pieces is a number of rows of a bucket's length (a
    multiple of 16), so every view starts 16-element aligned, as CUDA's memory-efficient
    attention wants of its mask."""
    if not arrays:
        return ()
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    return torch.from_numpy(flat).to(device, dtype).split([a.size for a in arrays])


def _bucket_mask(
    table: np.ndarray, real: np.ndarray, q_col: np.ndarray
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The additive mask of one bucket group (``table``: its members' specs; ``real``:
    ``[count, k_len]`` which padded keys are real), as host arrays: 0 where a key is seen,
    -inf where not. ``[count, k_len]``, the real keys, the same for every query, unless a
    block-causal member's queries see different keys (:func:`_block_mask`: a key is seen
    when its block is not after the query's); then each key's block ``[count, k_len]`` and
    each query's ``[count, q_len]``, compared on the device into ``[1, count, q_len, k_len]``
    (small host arrays: a padding key's block is past every query's, a member without blocks
    sees every key, and a padding query sees what its sequence's last one sees, so no row is
    all masked)."""
    block, first_query = table[:, 4], table[:, 5]
    size = np.maximum(block, 1)
    # A member's queries all see every real key when its first query's block is not before
    # its last key's (the common step: a block's queries over the blocks before it).
    differs = (block > 0) & (first_query // size < (table[:, 3] - 1) // size)
    if not differs.any():
        return np.where(real, 0.0, -np.inf)
    past = np.iinfo(np.int64).max
    key_block = np.where(real, np.arange(real.shape[1]) // size[:, None], past)
    query_pos = table[:, 5:6] + np.minimum(q_col, table[:, 1:2] - 1)  # [count, q_len]
    query_block = np.where(block[:, None] > 0, query_pos // size[:, None], past - 1)
    return key_block, query_block


def _bucketed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    specs: np.ndarray,
) -> None:
    """Attention of each ``(first query row, queries, first key row, keys)`` in ``specs``, into
    ``out``: queries and keys padded to their buckets, padding keys masked, one SDPA call per
    pair of buckets. ``k``/``v`` are expanded to every query head.

    The rows are read heads first (``[heads, rows, head_dim]`` views, once per layer; the
    queries with a padding row after theirs, whose outputs go nowhere; a padding key reads its
    sequence's first key, masked), so that a group's gather is already SDPA's layout, with the
    call's batch ``[heads, count]`` (every pair independent, as with ``[count, heads]``: the
    same numbers), and its output goes back with one indexed copy; its mask is already
    SDPA's additive one: six ops a group and layer, where the layout before took thirteen
    (a transpose of each gathered tensor and of the output, and SDPA turning a boolean mask
    into an additive one at every call); and no copy of the keys and values to pad them."""
    rows_q, rows_k = q.shape[0], k.shape[0]
    if rows_q == 0:  # no query: nothing to write
        return
    groups = _bucket_groups(specs, rows_q, rows_k, q.device, q.dtype)
    heads, dim = q.shape[1], q.shape[2]
    qp = torch.cat((q, q.new_zeros(1, *q.shape[1:]))).transpose(0, 1)
    kp, vp = k.transpose(0, 1), v.transpose(0, 1)
    outp = q.new_empty(heads, rows_q + 1, dim)
    for g in groups:
        # [heads, count, padded length, head_dim] in one gather each.
        qs, ks, vs = qp[:, g.q_index], kp[:, g.k_index], vp[:, g.k_index]
        res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=g.mask)
        # (``reshape``: a view of CPU SDPA's contiguous output; CUDA's memory-efficient kernel
        # returns its output transposed, which needs the copy)
        outp.index_copy_(1, g.q_flat, res.reshape(heads, -1, dim))
    out.copy_(outp[:, :rows_q].transpose(0, 1))


def _sdpa_runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    start: int,
    seq_lens: list[int] | tuple[int, ...],
) -> None:
    """Self-attention of consecutive sequences from flat row ``start``, into ``out``
    (``k``/``v`` already expanded to every query head)."""
    for length, count in _runs(seq_lens):
        end = start + length * count
        # A run of ``count`` equal-length sequences is one batched call:
        # [count * L, H, D] -> [count, H, L, D] (a view; the only copy is SDPA's output).
        qs, ks, vs = (
            t[start:end].reshape(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
        )
        res = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        out[start:end] = res.reshape(count * length, *q.shape[1:])
        start = end


def _cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    kv: KVPlan,
    layer: int,
) -> torch.Tensor:
    """Packed attention where some sequences write to and read from the KV pool."""
    pool = kv.storage[layer]  # [2, slots, kv_heads, head_dim]
    # Writes first: a cached step's keys are the cache with this pass's span in place.
    if kv.write_rows is not None:
        fresh = torch.stack((k.index_select(0, kv.write_rows), v.index_select(0, kv.write_rows)))
        pool.index_copy_(1, kv.write_slots, fresh)
    read = None if kv.read_slots is None else pool.index_select(1, kv.read_slots)
    num_heads = q.shape[1]
    if backend in ("flash", "xformers") and any(m is not None for m in kv.read_masks):
        raise ValueError(
            f"attention_backend: block-causal masks need 'sdpa' or 'sdpa_buckets', not {backend!r}"
        )
    if backend in ("flash", "xformers"):
        return _varlen_cached(q, k, v, backend, kv, read)
    out = torch.empty_like(q)
    if backend == "sdpa_buckets":
        _bucketed_cached(q, k, v, out, kv, read)
        return out
    if kv.self_runs:
        ks, vs = _expand_kv(k, num_heads, 1), _expand_kv(v, num_heads, 1)
        for start, lens in kv.self_runs:
            _sdpa_runs(q, ks, vs, out, start, lens)
    if read is not None:
        # Grouped heads through SDPA's own GQA (no repeated copy of every gathered key); the
        # same numbers as repeating them (tested against the references).
        gqa = read.shape[2] != num_heads
        for (start, count, q_len, k_start, k_len), mask in zip(
            kv.read_groups, kv.read_masks, strict=True
        ):
            end = start + count * q_len
            qs = q[start:end].reshape(count, q_len, *q.shape[1:]).transpose(1, 2)
            keys = read[:, k_start : k_start + count * k_len]
            ks, vs = (t.reshape(count, k_len, *t.shape[1:]).transpose(1, 2) for t in keys)
            res = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
            res = res.transpose(1, 2)
            out[start:end] = res.reshape(count * q_len, *q.shape[1:])
    return out


def _bucketed_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    kv: KVPlan,
    read: torch.Tensor | None,
) -> None:
    """``sdpa_buckets`` with the pool: sequences attending to themselves and cached steps
    (over their gathered keys, which follow the pass's own rows) in one bucketed layout."""
    num_heads = q.shape[1]
    if read is not None:  # a reading sequence's keys follow the pass's own rows
        k, v = torch.cat((k, read[0])), torch.cat((v, read[1]))
    _bucketed(q, _expand_kv(k, num_heads, 1), _expand_kv(v, num_heads, 1), out, kv.specs)


def _varlen_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    kv: KVPlan,
    read: torch.Tensor | None,
) -> torch.Tensor:
    """flash-attn / xformers: every sequence's keys laid back to back by one index (its own
    rows, or its gathered cache), with separate query and key lengths: a constant number of
    calls for the batch (untested here: no GPU)."""
    if read is not None:
        k, v = torch.cat((k, read[0])), torch.cat((v, read[1]))
    k_all, v_all = k.index_select(0, kv.key_index), v.index_select(0, kv.key_index)
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k_all, v_all, kv.cu_q, kv.cu_k, max(kv.seq_lens), max(kv.k_lens), causal=False
        )
    from xformers.ops import fmha

    num_heads = q.shape[1]
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(
        list(kv.seq_lens), kv_seqlen=list(kv.k_lens)
    )
    k_all, v_all = _expand_kv(k_all, num_heads, 1), _expand_kv(v_all, num_heads, 1)
    return fmha.memory_efficient_attention(q[None], k_all[None], v_all[None], attn_bias=bias)[0]


def _runs(seq_lens: list[int]) -> list[tuple[int, int]]:
    """``(length, count)`` for each run of consecutive equal lengths."""
    runs: list[tuple[int, int]] = []
    for length in seq_lens:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    return runs


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Bidirectional attention over a padded batch: ``q`` ``[B, H, L, D]``, ``k``/``v``
    ``[B, H_kv, L, D]``; ``attention_mask`` ``[B, L]`` with 1 for real tokens (HF style), or
    ``[B, L, L]`` saying which keys each query may see (training views of cached decoding).

    Padding keys are masked out; padding queries still get an output (ignored by callers).
    """
    k = _expand_kv(k, q.shape[1], 1)
    v = _expand_kv(v, q.shape[1], 1)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()
        mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
