"""The default model's training script: fine-tuning with views of cached decoding."""

from __future__ import annotations

import json

import pytest
import torch

from foretell.models import load_model
from foretell.models.default import DEFAULT_MODEL_DIR, train


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--cache-views", "1.5"], "--cache-views"),
        (["--cache-views", "0.5", "--loss-weighting", "elbo"], "--cache-views"),
        (["--cache-view-dual", "-0.1"], "--cache-view-dual"),
        (["--cache-view-blocks", "5"], "--cache-view-blocks"),
        (["--cache-view-blocks", "8,x"], "--cache-view-blocks"),
        (["--cache-view-certain-first", "2"], "--cache-view-certain-first"),
        (
            ["--cache-view-certain-first", "0.5", "--cache-view-where", "uniform"],
            "--cache-view-certain-first",
        ),
    ],
)
def test_bad_arguments_name_the_flag(argv, flag, capsys) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert flag in capsys.readouterr().err


def test_fine_tune_with_cache_views_writes_a_checkpoint(tmp_path) -> None:
    out, log = tmp_path / "weights", tmp_path / "log.json"
    argv = f"--init {DEFAULT_MODEL_DIR} --out {out} --log-json {log} --tasks arrange --steps 2"
    argv += " --batch-size 4 --eval-every 2 --eval-n 2 --cache-views 0.5 --lr 1e-3 --warmup 1"
    argv += " --cache-view-certain-first 0.5"
    train.main(argv.split())
    tuned = load_model(out).model.state_dict()
    base = load_model(DEFAULT_MODEL_DIR).model.state_dict()
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    row = json.loads(log.read_text())["curve"][-1]["arrange"]
    # With views, every eval also decodes with each cache mode.
    assert set(row) == {"full", "one_step", "prefix", "dual"}


def test_view_losses_reach_every_layer() -> None:
    from foretell.models.default import answer_constraints
    from foretell.models.default.data import make_batch
    from foretell.tasks import GEN_LENGTH, get_task

    loaded = load_model(DEFAULT_MODEL_DIR)
    model, tok = loaded.model.requires_grad_(True), loaded.tokenizer
    examples = get_task("arrange").heldout(8, 99)
    ids, attention, is_gen = make_batch(tok, examples)
    gen_index = torch.arange(ids.shape[1]) - (ids.shape[1] - GEN_LENGTH)
    marker = torch.tensor(sorted(answer_constraints(tok)))
    keep = is_gen & torch.isin(gen_index, marker)[None, :]
    losses = train.cache_view_losses(
        model, ids, attention, is_gen, keep, tok.mask_token_id, torch.Generator().manual_seed(0)
    )
    assert losses.numel() > 0 and bool(torch.isfinite(losses).all())
    losses.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
