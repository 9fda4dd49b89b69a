"""Shared fixtures: tiny random models (float64 for exact parity) and engines over them."""

from __future__ import annotations

import pytest
import torch

import foretell.decoding.batched as batched_module
from foretell import Engine
from foretell.models import save_model
from foretell.models.tiny import tiny_model
from tests.block_checkpoints import llada2_checkpoint, sdar_checkpoint

torch.set_num_threads(1)  # deterministic and fair on a shared 2-core machine


@pytest.fixture(scope="session")
def block_checkpoints(tmp_path_factory):
    """Random SDAR (blocks of 4) and LLaDA2 (blocks of 8) checkpoints in the official layouts,
    built once for every block-causal engine test."""
    root = tmp_path_factory.mktemp("block-checkpoints")
    return {
        "sdar": sdar_checkpoint(root / "sdar", seed=11, block_size=4)[0],
        "llada2": llada2_checkpoint(root / "llada2", seed=12, block_size=8)[0],
    }


@pytest.fixture(scope="session")
def llada64():
    return tiny_model("llada", seed=1, dtype="float64")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny LLaDA saved as a checkpoint directory, for ``foretell serve --model``."""
    path = tmp_path_factory.mktemp("tiny-llada")
    loaded = tiny_model("llada", seed=11)
    save_model(loaded.model, path, loaded.tokenizer)
    return path


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
    """``fail_greedy_step(when)``: the batched step raises "injected fault" for every
    request ``when(req)`` picks (a fault in the engine's own decoding, for one request)."""

    def install(when) -> None:
        real = batched_module.BatchedStep._plan

        def failing(self, *args):
            plan = real(self, *args)
            for j, req in enumerate(self.reqs):  # as a request's own part of the step fails
                if when(req):
                    plan.failed[j] = f"decoding failed: {RuntimeError('injected fault')!r}"
            return plan

        monkeypatch.setattr(batched_module.BatchedStep, "_plan", failing)

    return install


@pytest.fixture()
def poison_forward(monkeypatch):
    """``poison_forward(model, token_id)``: every forward pass whose input holds ``token_id``
    raises "injected forward fault" (a fault of the pass itself, e.g. a bad kernel or an
    allocation failure, that only some inputs trigger). The embedding sees every packed input,
    whatever path the runner takes."""

    def install(model, token_id: int) -> None:
        embed = model.embed
        real = embed.forward

        def failing(ids):
            if bool((ids == token_id).any()):
                raise RuntimeError("injected forward fault")
            return real(ids)

        monkeypatch.setattr(embed, "forward", failing)

    return install
