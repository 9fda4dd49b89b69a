"""Decoding stays on the model's device: per step a constant number of transfers to the host,
whatever the batch size.

What counts as a transfer here (the machine has only a CPU, so "the device" is simulated):
every tensor computed from the model's gathered logits (``logits_at``, for the pass and for
rows asked later) is marked as living on the device, and the mark follows every operation
on it. A transfer is any call that brings such a tensor's values to Python or to a host tensor:
``.cpu()``, ``.numpy()``, ``.tolist()``, ``.item()``, ``int()``, ``float()``, ``bool()``,
use as a Python index, writing it into an unmarked (host) tensor, or indexing a host tensor
with it. Each is one synchronising copy on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from foretell import DecodeParams, Engine, Prophet
from foretell.models.tiny import tiny_model

_PULLS = {
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
}


class OnDevice(torch.Tensor):
    """A tensor standing for one on the model's device; ``transfers`` counts pulls."""

    transfers = 0
    largest = 0  # most values one transfer carried

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PULLS:
            OnDevice.transfers += 1
            plain = args[0].as_subclass(torch.Tensor)
            OnDevice.largest = max(OnDevice.largest, plain.numel())
            return func(plain, *args[1:], **kwargs)
        if func in (torch.Tensor.__setitem__, torch.Tensor.__getitem__):
            host_self = not isinstance(args[0], OnDevice)
            if host_self and any(_marked(a) for a in args[1:]):
                OnDevice.transfers += 1
        return super().__torch_function__(func, types, args, kwargs)


def _marked(value) -> bool:
    if isinstance(value, OnDevice):
        return True
    if isinstance(value, (tuple, list)):
        return any(_marked(v) for v in value)
    return False


def _transfers_per_step(loaded, params: list[DecodeParams], monkeypatch) -> list[int]:
    model = loaded.model
    real = type(model).logits_at

    def on_device(self, hidden, positions, flat_index):
        return real(self, hidden, positions, flat_index).as_subclass(OnDevice)

    monkeypatch.setattr(type(model), "logits_at", on_device)
    engine = Engine(loaded, dtype="float32", max_num_seqs=len(params))
    for i, p in enumerate(params):
        engine.add_request("12+34=" if i % 2 else "what is 7*8?", p)
    counts = []
    OnDevice.largest = 0
    while engine.has_unfinished_requests():
        OnDevice.transfers = 0
        engine.step()
        counts.append(OnDevice.transfers)
    monkeypatch.undo()
    # Ids, flags and gaps only, never logits: no transfer carries a [rows, vocab] matrix
    # (the largest is the pass's: a greedy token and a revealed flag per gathered row; per
    # request, its two scores at its cut, whether any reaches its threshold, and a gap).
    rows = sum(p.gen_length for p in params)
    assert OnDevice.largest <= 2 * rows + 4 * len(params) < loaded.model.vocab_size * rows
    return counts


@pytest.mark.parametrize(
    "policy",
    [
        None,
        Prophet(thresholds=(4.0, 3.0, 2.0)),  # the still-masked region
        Prophet(thresholds=(4.0, 3.0, 2.0), answer_start=2, answer_length=4),  # a span
    ],
    ids=["no-prophet", "prophet-region", "prophet-span"],
)
def test_greedy_steps_transfer_a_constant_number_of_times(policy, monkeypatch) -> None:
    loaded = tiny_model("llada", seed=31, dtype="float32")

    def batch(n: int) -> list[DecodeParams]:
        return [
            DecodeParams(
                gen_length=16,
                block_length=8,
                steps=8,
                remasking="random" if i % 3 == 2 else "low_confidence",
                early_commit=policy,
                seed=i,
            )
            for i in range(n)
        ]

    small = _transfers_per_step(loaded, batch(2), monkeypatch)
    large = _transfers_per_step(loaded, batch(16), monkeypatch)
    # Every step pulled something (the counting works) and no step pulled more than the
    # pass's ids, gaps and (for span commits) the fills of masks outside the gathered rows.
    assert min(small + large) >= 1
    assert max(large) == max(small) <= 3, (small, large)


def test_every_commit_fill_of_a_step_comes_to_the_host_in_one_transfer(monkeypatch) -> None:
    """A commit fills masks the pass did not gather: a greedy one's from one LM-head call for
    all, a guided one's from its own, a cached one's outside its pass from a read-only pass,
    a sampled one's with draws (seeded, or from the shared stream). Whatever their number,
    all of a step's fills cross at once."""
    loaded = tiny_model("llada", seed=31, dtype="float32")
    # An answer span (the pass gathers it and the block, not the later block's masks), and a
    # test that fires once a third of the steps are done: in the first block, at a cached step.
    policy = Prophet(thresholds=(1e9, 0.0, 0.0), answer_start=0, answer_length=4)
    kinds = [
        {},
        {"cfg_scale": 1.0},
        {"kv_cache": "dual"},
        {"kv_cache": "prefix"},
        {"temperature": 1.0, "seed": 5},
        {"temperature": 1.0, "top_k": 5},  # drawn from the shared stream
    ]

    def batch(n: int) -> list[DecodeParams]:
        return [
            DecodeParams(
                gen_length=16, block_length=8, steps=8, early_commit=policy, **kinds[i % 6]
            )
            for i in range(n)
        ]

    small = _transfers_per_step(loaded, batch(6), monkeypatch)
    large = _transfers_per_step(loaded, batch(24), monkeypatch)
    assert len(small) == len(large) < 8  # every request committed early, all at one step
    assert max(large) == max(small) == 2, (small, large)  # the pass's, and the fills
