"""Training views of cached decoding equal the cached step they stand for (reference_cache)."""

from __future__ import annotations

import pytest
import torch

from tests.reference_cache import LLaDAReference
from training.cache_views import cache_view_batch

GEN = 32


def _canvases(model, prompt_lengths: list[int], seed: int):
    """Left-padded clean canvases (random tokens, no mask) as make_batch lays them out."""
    g = torch.Generator().manual_seed(seed)
    width = max(prompt_lengths)
    vocab = model.vocab_size
    ids = torch.zeros(len(prompt_lengths), width + GEN, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, n in enumerate(prompt_lengths):
        body = torch.randint(4, vocab, (n + GEN,), generator=g)
        ids[row, width - n :] = body
        attention[row, width - n :] = 1
    is_gen = torch.zeros_like(ids, dtype=torch.bool)
    is_gen[:, width:] = True
    return ids, attention, is_gen


def _reference_rows(
    ref: LLaDAReference, view: torch.Tensor, real: int, s: int, dual: bool, start: int, end: int
) -> dict[int, torch.Tensor]:
    """The logits a cached step sees, computed as Fast-dLLM does: a refresh pass over the
    refresh canvas, then the recomputed span (and dual's read-only rows) against its cache.
    ``start``/``end`` are canvas positions. Returns {canvas position: logits} from ``start``."""
    refresh = view[s - real : s]
    step = refresh.clone()
    step[real - GEN :] = view[s:]
    _, past = ref.forward(refresh[None], torch.arange(real))
    if not dual:
        cache = [(k[:, :, :start], v[:, :, :start]) for k, v in past]
        logits, _ = ref.forward(step[None, start:], torch.arange(start, real), cache, "prefix")
        return dict(zip(range(start, real), logits[0], strict=True))
    logits, present = ref.forward(
        step[None, start:end], torch.arange(start, end), past, "dual", (start, end)
    )
    rows = dict(zip(range(start, end), logits[0], strict=True))
    if end < real:
        read, _ = ref.forward(step[None, end:], torch.arange(end, real), present, "read")
        rows.update(zip(range(end, real), read[0], strict=True))
    return rows


@pytest.mark.parametrize("seed", [0, 1])
def test_view_rows_equal_the_cached_step_they_stand_for(llada64, seed):
    model = llada64.model
    mask_id = model.mask_token_id
    ids, attention, is_gen = _canvases(model, [5, 11, 8, 13, 6, 9], seed)
    keep = torch.zeros_like(is_gen)
    keep[:, -GEN + 16 : -GEN + 23] = True  # a forced marker, never masked
    gen = torch.Generator().manual_seed(seed)
    views = cache_view_batch(ids, attention, is_gen, keep, mask_id, gen)
    s = ids.shape[1]
    with torch.no_grad():
        logits = model(views.ids, attention_mask=views.allowed, positions=views.positions)
    ref = LLaDAReference(model)
    for row in range(ids.shape[0]):
        real = int(attention[row].sum())
        prompt = real - GEN
        # The refresh copy is a plain full pass over the refresh canvas.
        refresh = views.ids[row, s - real : s]
        full, _ = ref.forward(refresh[None], torch.arange(real))
        torch.testing.assert_close(logits[row, s - real : s], full[0], rtol=0, atol=1e-10)
        assert not bool(views.masked[row, : s - GEN].any())
        assert not bool(views.masked[row, s:][keep[row, s - GEN :]].any())
        # Every row of the step copy from the block on equals the cached step drawn.
        start = prompt + int(views.block_start[row])
        end = prompt + int(views.block_end[row])
        rows = _reference_rows(ref, views.ids[row], real, s, bool(views.dual[row]), start, end)
        assert views.masked[row, s:].any(), "every view scores rows of its step copy"
        for pos, expected in rows.items():
            torch.testing.assert_close(logits[row, s + pos - prompt], expected, rtol=0, atol=1e-10)


def test_views_leave_unmasked_what_a_cached_step_has_decoded(llada64):
    model = llada64.model
    ids, attention, is_gen = _canvases(model, [7] * 64, 3)
    keep = torch.zeros_like(is_gen)
    mask_id = model.mask_token_id
    views = cache_view_batch(
        ids, attention, is_gen, keep, mask_id, torch.Generator().manual_seed(3)
    )
    view_ids, allowed, masked = views.ids, views.allowed, views.masked
    s = ids.shape[1]
    refresh_gen, step_gen = view_ids[:, s - GEN : s], view_ids[:, s:]
    # A step only reveals: its masks are a subset of the refresh's, in one block.
    assert bool(((step_gen == mask_id) <= (refresh_gen == mask_id)).all())
    assert bool((masked[:, s:] == (step_gen == mask_id)).all())
    # The refresh canvas is clean before the block and masked from it on.
    first = (refresh_gen == mask_id).float().argmax(1)
    for row in range(len(first)):
        assert bool((refresh_gen[row, first[row] :] == mask_id).all())
    # Nothing attends to the step copy from the refresh copy.
    assert not bool(allowed[:, :s, s:].any())
    # Both modes and every block length are drawn; blocks lie on the block grid.
    assert 0 < int(views.dual.sum()) < len(views.dual)
    lengths = views.block_end - views.block_start
    assert set(lengths.tolist()) == {4, 8, 16, 32}
    assert bool((views.block_start % lengths == 0).all())


def test_views_draw_only_the_block_lengths_asked_and_refuse_others(llada64):
    model = llada64.model
    ids, attention, is_gen = _canvases(model, [5] * 16, 6)
    keep = torch.zeros_like(is_gen)
    views = cache_view_batch(
        ids,
        attention,
        is_gen,
        keep,
        model.mask_token_id,
        torch.Generator().manual_seed(6),
        block_lengths=(8,),
    )
    assert set((views.block_end - views.block_start).tolist()) == {8}
    with pytest.raises(ValueError, match="block_lengths"):
        cache_view_batch(
            ids,
            attention,
            is_gen,
            keep,
            model.mask_token_id,
            torch.Generator(),
            block_lengths=(5,),
        )


def test_uncertain_views_draw_blocks_by_the_uncertainty_of_their_refresh(llada64):
    model = llada64.model
    ids, attention, is_gen = _canvases(model, [5, 9] * 16, 7)
    keep = torch.zeros_like(is_gen)
    mask_id = model.mask_token_id
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def uncertainty(canvases: torch.Tensor, canvas_attention: torch.Tensor) -> torch.Tensor:
        calls.append((canvases, canvas_attention))
        score = torch.zeros(len(canvases), GEN)
        score[:, 9:11] = 1.0  # only the second block of 8 (and the third block of 4) is uncertain
        return score

    views = cache_view_batch(
        ids,
        attention,
        is_gen,
        keep,
        mask_id,
        torch.Generator().manual_seed(7),
        block_lengths=(8, 4),
        uncertainty=uncertainty,
    )
    ((canvases, canvas_attention),) = calls
    # One candidate per block of each row's drawn length, masked from its start: refresh canvases.
    lengths = (views.block_end - views.block_start).tolist()
    assert len(canvases) == sum(GEN // n for n in lengths)
    assert bool(((canvases == mask_id).sum(1) % 4 == 0).all())
    assert canvas_attention.shape == canvases.shape
    # Nearly every view is of the one uncertain block (1e-3 is left to each other block).
    expected = {8: 8, 4: 8}
    hits = sum(
        int(start) == expected[n] for start, n in zip(views.block_start, lengths, strict=True)
    )
    assert hits >= len(lengths) - 1


def test_certain_first_views_reveal_what_the_model_was_surest_of(llada64):
    model = llada64.model
    ids, attention, is_gen = _canvases(model, [6] * 48, 8)
    keep = torch.zeros_like(is_gen)
    mask_id = model.mask_token_id
    # Each candidate block's refresh canvas gets its own uncertainties (keyed by its first mask),
    # so reading another candidate's row would reveal other positions.
    by_start = {
        start: torch.rand(GEN, generator=torch.Generator().manual_seed(start)) + 0.1
        for start in range(0, GEN, 8)
    }

    def uncertainty(canvases: torch.Tensor, canvas_attention: torch.Tensor) -> torch.Tensor:
        first = (canvases[:, -GEN:] == mask_id).float().argmax(1)
        return torch.stack([by_start[int(f)] for f in first])

    def surest(start: int, k: int) -> set[int]:
        """The k positions of the block at ``start`` its refresh was surest of."""
        return set(sorted(range(start, start + 8), key=lambda i: float(by_start[start][i]))[:k])

    def revealed(views) -> list[set[int]]:
        s = ids.shape[1]
        refresh_masked = views.ids[:, s - GEN : s] == mask_id
        step_masked = views.ids[:, s:] == mask_id
        return [
            set((r & ~m).nonzero().flatten().tolist())
            for r, m in zip(refresh_masked, step_masked, strict=True)
        ]

    args = (ids, attention, is_gen, keep, mask_id)
    views = cache_view_batch(
        *args,
        torch.Generator().manual_seed(8),
        block_lengths=(8,),
        uncertainty=uncertainty,
        certain_first=1.0,
    )
    counts = []
    for shown, start in zip(revealed(views), views.block_start.tolist(), strict=True):
        assert shown == surest(start, len(shown))
        counts.append(len(shown))
    assert len(set(counts)) > 3  # the number revealed still varies
    # Random reveals (the default) do not follow the model's certainty.
    plain = cache_view_batch(
        *args, torch.Generator().manual_seed(8), block_lengths=(8,), uncertainty=uncertainty
    )
    assert any(
        shown != surest(start, len(shown))
        for shown, start in zip(revealed(plain), plain.block_start.tolist(), strict=True)
    )
    with pytest.raises(ValueError, match="certain_first"):
        cache_view_batch(*args, torch.Generator(), certain_first=1.5, uncertainty=uncertainty)
    with pytest.raises(ValueError, match="certain_first"):
        cache_view_batch(*args, torch.Generator(), certain_first=0.5)


def test_views_draw_the_same_random_stream_as_the_shipped_training_command() -> None:
    """Stage 1 of the shipped checkpoint's fine-tune (docs/training.md) reproduces only if views
    without ``certain_first`` draw exactly what they drew then: a digest recorded at commit
    3d41f02, before ``certain_first`` existed."""
    import hashlib

    g = torch.Generator().manual_seed(11)
    rows, width = 12, 6
    ids = torch.randint(4, 50, (rows, width + GEN), generator=g)
    attention = torch.ones_like(ids)
    attention[::3, :2] = 0
    ids[::3, :2] = 0
    is_gen = torch.zeros_like(ids, dtype=torch.bool)
    is_gen[:, width:] = True
    keep = torch.zeros_like(is_gen)
    keep[:, width + 16] = True
    digest = hashlib.sha256()
    for uncertainty in (None, lambda c, a: (c[:, -GEN:] % 7).float()):
        views = cache_view_batch(
            ids,
            attention,
            is_gen,
            keep,
            3,
            torch.Generator().manual_seed(5),
            0.5,
            (4, 8, 16, 32),
            uncertainty,
        )
        for tensor in views:
            digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest()[:16] == "12e8206b58564427"
