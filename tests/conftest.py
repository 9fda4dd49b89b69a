"""Shared fixtures: tiny random models (float64 for exact parity) and engines over them."""

from __future__ import annotations

import pytest
import torch

import foretell.decoding.batched as batched_module
from foretell import Engine
from foretell.models.tiny import tiny_model

torch.set_num_threads(1)  # deterministic and fair on a shared 2-core machine


@pytest.fixture(scope="session")
def llada64():
    return tiny_model("llada", seed=1, dtype="float64")


@pytest.fixture(scope="session")
def dream64():
    return tiny_model("dream", seed=2, dtype="float64")


@pytest.fixture()
def llada_engine(llada64):
    return Engine(llada64, dtype="float64", max_num_seqs=8)


@pytest.fixture()
def dream_engine(dream64):
    return Engine(dream64, dtype="float64", max_num_seqs=8)


@pytest.fixture()
def fail_greedy_step(monkeypatch):
    """``fail_greedy_step(when)``: the greedy batch's step raises "injected fault" for every
    request ``when(req)`` picks (a fault in the engine's own decoding, for one request)."""

    def install(when) -> None:
        real = batched_module.GreedyBatch._apply

        def failing(self, j, req, *args):
            if when(req):
                raise RuntimeError("injected fault")
            return real(self, j, req, *args)

        monkeypatch.setattr(batched_module.GreedyBatch, "_apply", failing)

    return install
