"""The ``sdpa_buckets`` backend: one attention call per length bucket instead of per length.

Each sequence is padded to its own bucket (the next power of two), so its result does not
depend on its batch-mates: batched equals alone, token for token. Padded keys change float
rounding, so it is close to, not bitwise equal to, the exact ``sdpa`` path: in float64 that
never shows in tokens here; in bfloat16 it can (docs/guide.md), which is why it is not the
default.
"""

from __future__ import annotations

import pytest
import torch
from reference_decoders import early_exit_of, llada_generate
from torch.utils._python_dispatch import TorchDispatchMode

from foretell import DecodeParams, Engine, Prophet
from foretell.engine.kv_cache import KVPool
from foretell.models.attention import CacheUse, _bucket
from foretell.models.tiny import tiny_model
from tests.shared_draws import OpNames

PROMPTS = ["12+34=", "what is 7*8?", "a", "count: 1 2 3 4 5 6 7 8 9 10", "x=3, y=x+4, y?"]


class _Calls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sdpa = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:
            self.sdpa += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def llada():
    return tiny_model("llada", seed=13, dtype="float64")


def _cases() -> list[tuple[str, DecodeParams]]:
    cases = []
    for i in range(15):
        gen = (16, 32, 48)[i % 3]
        cases.append(
            (
                PROMPTS[i % len(PROMPTS)],
                DecodeParams(
                    gen_length=gen,
                    block_length=8,
                    steps=gen,
                    remasking=("low_confidence", "random", "confidence_threshold")[i % 3],
                    kv_cache=(None, "prefix", "dual")[(i // 3) % 3],
                    early_commit=Prophet(answer_start=4, answer_length=4) if i % 2 else None,
                    seed=i,
                ),
            )
        )
    return cases


def test_buckets_are_powers_of_two_from_16() -> None:
    assert [_bucket(n) for n in (1, 16, 17, 32, 33, 200)] == [16, 16, 32, 32, 64, 256]


def test_close_to_the_exact_path_with_and_without_the_pool(llada) -> None:
    model = llada.model
    lengths = [5, 17, 17, 40, 3]
    ids = torch.randint(4, 40, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        model.set_attention_backend("sdpa")
        exact = model.forward_packed(ids, positions, lengths)
        model.set_attention_backend("sdpa_buckets")
        bucketed = model.forward_packed(ids, positions, lengths)
        torch.testing.assert_close(bucketed, exact, rtol=0, atol=1e-12)
        # A refresh and a cached step (with a read-only row) through the pool.
        pool = KVPool(model, torch.device("cpu"), 10**8, page_size=8)
        slots = pool.slots(pool.allocate(pool.pages_for(40)), 40)
        canvas = ids[25:65]
        full = model.forward_packed(
            canvas, torch.arange(40), [40], [CacheUse(slots, 0, 0, 40)], pool.storage
        )
        pos = torch.tensor([3, *range(24, 32)])
        step = CacheUse(slots, 1, 24, 8, 40)
        out = model.forward_packed(canvas[pos], pos, [9], [step], pool.storage)
        model.set_attention_backend("sdpa")
        torch.testing.assert_close(out, full[pos], rtol=0, atol=1e-12)


def test_batched_equals_alone_and_the_reference_in_float64(llada) -> None:
    cases = _cases()
    engine = Engine(llada, dtype="float64", attention_backend="sdpa_buckets", max_num_seqs=6)
    mixed = engine.generate([c[0] for c in cases], [c[1] for c in cases], use_tqdm=False)
    for (prompt, params), out in zip(cases, mixed, strict=True):
        solo = Engine(llada, dtype="float64", attention_backend="sdpa_buckets", max_num_seqs=1)
        assert solo.generate([prompt], params, use_tqdm=False)[0].token_ids == out.token_ids
        if params.kv_cache is None and params.remasking != "confidence_threshold":
            torch.manual_seed(params.seed)
            policy = params.early_commit
            x, _ = llada_generate(
                llada.model,
                torch.tensor([out.prompt_token_ids]),
                steps=params.steps,
                gen_length=params.gen_length,
                block_length=params.block_length,
                remasking=params.remasking,
                mask_id=llada.model.mask_token_id,
                early_exit=early_exit_of(policy),
                statistic="mean" if policy is None else policy.statistic,
            )
            assert out.token_ids == x[0, len(out.prompt_token_ids) :].tolist(), params


def test_one_call_per_bucket_whatever_the_lengths(llada) -> None:
    """Ten different canvas lengths in two buckets: two attention calls a layer, not ten."""
    params = DecodeParams(gen_length=16, steps=16, seed=0)
    prompts = [[5] * n for n in range(1, 11)]  # canvases of 17 to 26 positions: bucket 32
    prompts[0] = [5] * 10
    counts = []
    # One engine at a time: the backend is set on the model they share.
    for backend in ("sdpa_buckets", "sdpa"):
        engine = Engine(llada, dtype="float64", attention_backend=backend, max_num_seqs=10)
        for p in prompts:
            engine.add_request(p, params)
        with _Calls() as calls:
            engine.step()
        counts.append(calls.sdpa)
    layers = llada.model.config.num_layers
    assert counts == [1 * layers, 9 * layers]


def test_a_pass_builds_its_bucket_layout_once_for_every_layer() -> None:
    """The layout (indices, masks, their copies to the device) depends only on the pass's
    sequences: every layer reuses the first layer's; another pass builds its own."""
    from foretell.models import attention

    specs = [(0, 5, 0, 5), (5, 20, 5, 20), (25, 3, 25, 3)]
    first = attention._bucket_groups(specs, 28, 28, torch.device("cpu"))
    assert attention._bucket_groups(list(specs), 28, 28, torch.device("cpu")) is first
    assert [(g.count, g.q_len, g.k_len) for g in first] == [(2, 16, 16), (1, 32, 32)]
    assert first[0].q_index.tolist()[1][:3] == [25, 26, 27] and first[0].q_index[1, 3] == 28
    other = attention._bucket_groups(specs[:2], 25, 25, torch.device("cpu"))
    assert other is not first and len(other) == 2


@pytest.fixture(scope="module")
def sdar():
    return tiny_model("sdar", seed=5, dtype="float64", block_size=4)


def _block_cases() -> list[tuple[list[int], DecodeParams]]:
    """Prompts of 1 to 13 tokens (their whole blocks stored at the first pass: block-causal
    masks over several blocks), both schedules, with and without the block cache (without it
    the window is re-encoded block-causally every step), Prophet on some."""
    cases = []
    for i in range(12):
        cases.append(
            (
                [5 + (i * 7 + j) % 30 for j in range(1 + i)],
                DecodeParams(
                    gen_length=(8, 12, 16)[i % 3],
                    block_length=4,
                    steps=(4, 2)[i % 2],
                    remasking=("low_confidence", "confidence_threshold")[(i // 2) % 2],
                    threshold=0.3,
                    block_cache=i % 4 != 3,
                    early_commit=Prophet((4.0, 2.5, 1.0), (0.33, 0.67)) if i % 3 == 1 else None,
                    ignore_eos=True,
                ),
            )
        )
    return cases


def _block_causal_pass(model, backend: str) -> torch.Tensor:
    """The final hidden states of one pass of two block-causal sequences under ``backend``:
    positions 0-14 written and read block-causally (three whole blocks and part of a fourth:
    its queries see different keys), and the block [12, 16) over its pages (the engine's
    passes: prompt stores, the window without the block cache)."""
    pool = KVPool(model, torch.device("cpu"), 10**8, page_size=4)
    slots = pool.slots(pool.allocate(pool.pages_for(24)), 24)
    pool.storage.zero_()
    ids = torch.randint(4, 40, (24,), generator=torch.Generator().manual_seed(1))
    uses = [CacheUse(slots, 0, 0, 15, 15, 4), CacheUse(slots, 0, 12, 4, 16, 4)]
    pieces = [torch.arange(15), torch.arange(12, 16)]
    pos = torch.cat(pieces)
    with torch.no_grad():
        model.set_attention_backend(backend)
        try:
            return model.forward_packed(ids[pos], pos, [len(p) for p in pieces], uses, pool.storage)
        finally:
            model.set_attention_backend("sdpa")


def test_block_causal_sequences_are_bucketed_close_to_the_exact_path(sdar) -> None:
    """Block-causal sequences (a store sequence spanning blocks, a block's queries over its
    pages) in buckets, with a mask per query where the queries see different keys: within
    1e-12 of the exact path in float64; and the decoded tokens equal the exact path's, batched
    and alone."""
    outs = {
        backend: _block_causal_pass(sdar.model, backend) for backend in ("sdpa", "sdpa_buckets")
    }
    torch.testing.assert_close(outs["sdpa_buckets"], outs["sdpa"], rtol=0, atol=1e-12)
    cases = _block_cases()
    prompts, params = [c[0] for c in cases], [c[1] for c in cases]
    exact = Engine(sdar, dtype="float64", attention_backend="sdpa", max_num_seqs=12)
    expected = [o.token_ids for o in exact.generate(prompts, params, use_tqdm=False)]
    bucketed = Engine(sdar, dtype="float64", attention_backend="sdpa_buckets", max_num_seqs=12)
    mixed = bucketed.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in mixed] == expected
    for prompt, param, out in list(zip(prompts, params, mixed, strict=True))[:4]:
        solo = Engine(sdar, dtype="float64", attention_backend="sdpa_buckets", max_num_seqs=1)
        assert solo.generate([prompt], param, use_tqdm=False)[0].token_ids == out.token_ids


def test_sdpa_buckets_builds_no_exact_path_block_masks(sdar, monkeypatch) -> None:
    """The pool plan's per-call block masks serve the exact ``sdpa`` path (and tell flash-attn
    it cannot run); ``sdpa_buckets`` masks its bucket groups from the plan's specs, so under
    it the plan builds none, and the outputs are the same as when it did."""
    from foretell.models import attention

    built = []
    real = attention._block_mask

    def counting(*args, **kwargs):
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_block_mask", counting)
    outs, counts = [], []
    for backend in ("sdpa", "sdpa_buckets"):
        built.clear()
        outs.append(_block_causal_pass(sdar.model, backend))
        counts.append(len(built))
    assert counts[0] > 0 and counts[1] == 0
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)


def test_block_causal_calls_do_not_grow_with_the_batch(sdar) -> None:
    """The first pass of 4 and of 12 block-causal requests (store sequences of several blocks
    and first blocks, of many lengths): the same number of attention calls a layer under
    ``sdpa_buckets``; under ``sdpa`` they grow with the batch's shapes."""
    cases = _block_cases()
    counts = {}
    for backend in ("sdpa_buckets", "sdpa"):
        for n in (4, 12):
            engine = Engine(sdar, dtype="float64", attention_backend=backend, max_num_seqs=n)
            for prompt, params in cases[:n]:
                engine.add_request(prompt, params)
            with _Calls() as calls:
                engine.step()
            counts[backend, n] = calls.sdpa
    assert counts["sdpa_buckets", 4] == counts["sdpa_buckets", 12]
    assert counts["sdpa", 12] > counts["sdpa", 4]


def _self_attending(lengths: list[int]) -> list[tuple[int, int, int, int]]:
    """Bucket specs of packed sequences of ``lengths``, each attending to its own rows."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [(s, n, s, n) for s, n in zip(starts, lengths, strict=True)]


def test_each_bucket_group_adds_six_ops_a_layer() -> None:
    """The bucketed call's ops: a constant part (padding the queries, the copy back) and six
    per bucket group (three gathers, the SDPA call with its additive mask made once per pass,
    a reshape and the indexed copy back), since the rows are read heads first; transposing
    each gathered tensor and turning a boolean mask into an additive one at every call, as
    before, took thirteen."""
    from foretell.models import attention

    def ops(lengths: list[int]) -> int:
        specs = _self_attending(lengths)
        q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
        out = torch.empty_like(q)
        attention._bucketed(q, k, v, out, specs)  # the layout, built once for the pass
        with OpNames() as counted:
            attention._bucketed(q, k, v, out, specs)
        return len(counted.names)

    one, three = ops([20, 20, 20]), ops([20, 40, 70])  # buckets 32; 32, 64 and 128
    assert three - one == 2 * 6


def test_a_pass_layout_goes_to_the_device_in_two_copies() -> None:
    """Every bucket group's indices go to the device in one copy, and every additive mask in
    another, each split there into views: the copies (on a GPU, one host-to-device transfer
    each) do not grow with the groups; each group adds three views (its queries, keys and
    mask). Before, each group made three copies of its own. A block-causal group whose
    queries see different keys sends its block numbers in the indices' copy."""
    from foretell.models import attention

    def layout_ops(specs: list[tuple[int, ...]], rows: int) -> list[str]:
        attention._last_layout[0] = None  # built again, not read from the last pass
        with OpNames() as counted:
            attention._bucket_groups(specs, rows, rows, torch.device("cpu"))
        return counted.names

    copies = {"aten.lift_fresh", "aten.to", "aten._to_copy", "aten.split_with_sizes"}
    one = layout_ops(_self_attending([20, 20, 20]), 60)
    three = layout_ops(_self_attending([20, 40, 70]), 130)
    assert [n for n in one if n in copies] == [n for n in three if n in copies]
    assert sorted(set(three) - copies) == ["aten.view"]
    assert three.count("aten.view") - one.count("aten.view") == 2 * 3
    # A store sequence of blocks of 4 (its queries see different keys) beside a plain one.
    mixed = layout_ops([(0, 15, 0, 15, 4, 0), (15, 40, 15, 40, 0, 0)], 55)
    assert [n for n in mixed if n in copies] == [n for n in one if n in copies]


@pytest.mark.parametrize("lengths", [[4, 0], [0, 4], [4, 0, 3], [0]])
def test_sequences_without_tokens_anywhere_in_the_pass(lengths) -> None:
    """A sequence of no tokens, even the pass's last (whose padding keys would start past the
    last row), takes no part and leaves the others as the exact path computes them."""
    from foretell.models.attention import packed_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 2, 8, generator=gen, dtype=torch.float64) for _ in "qkv")
    bucketed = packed_attention(q, k, v, lengths, "sdpa_buckets")
    torch.testing.assert_close(bucketed, packed_attention(q, k, v, lengths, "sdpa"))


def test_an_sdpa_output_laid_out_transposed_goes_back_as_well(monkeypatch) -> None:
    """CUDA's memory-efficient SDPA kernel (the one an additive mask selects there) returns
    its output ``[batch, heads, length, dim]`` laid out as ``[batch, length, heads, dim]``:
    the bucketed call writes it back the same as a contiguous one (a ``view`` of it would
    fail for any bucket group of two or more sequences)."""
    from foretell.models import attention

    real = attention.F.scaled_dot_product_attention

    def transposed_layout(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides

    lengths = [20, 30, 25]  # one bucket group of three
    starts = [0, 20, 50]
    specs = [(s, n, s, n) for s, n in zip(starts, lengths, strict=True)]
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in "qkv")
    expected = torch.empty_like(q)
    attention._bucketed(q, k, v, expected, specs)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", transposed_layout)
    out = torch.empty_like(q)
    attention._bucketed(q, k, v, out, specs)
    assert torch.equal(out, expected)
