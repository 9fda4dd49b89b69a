"""The default model's training script: fine-tuning with views of cached decoding."""

from __future__ import annotations

import json

import pytest
import torch

from foretell.models import load_model
from foretell.models.default import DEFAULT_MODEL_DIR
from training import train


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--cache-views", "1.5"], "--cache-views"),
        (["--cache-views", "0.5", "--loss-weighting", "elbo"], "--cache-views"),
        (["--cache-view-dual", "-0.1"], "--cache-view-dual"),
        (["--cache-view-blocks", "5"], "--cache-view-blocks"),
        (["--cache-view-blocks", "8,x"], "--cache-view-blocks"),
        (["--cache-view-certain-first", "2"], "--cache-view-certain-first"),
        (["--cache-view-distill", "-1"], "--cache-view-distill"),
        (["--cache-view-teacher", "/tmp"], "--cache-view-teacher"),
        (["--cache-view-hard", "0"], "--cache-view-hard"),
        (["--cache-view-hard", "2"], "--cache-view-hard"),
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
    argv += " --cache-view-certain-first 0.5 --cache-view-distill 0.5 --cache-view-hard 2"
    argv += f" --cache-view-teacher {DEFAULT_MODEL_DIR}"
    train.main(argv.split())
    tuned = load_model(out).model.state_dict()
    base = load_model(DEFAULT_MODEL_DIR).model.state_dict()
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    row = json.loads(log.read_text())["curve"][-1]["arrange"]
    # With views, every eval also decodes with each cache mode.
    assert set(row) == {"full", "one_step", "prefix", "dual"}


def _view_batch(n: int):
    """The shipped model and a batch of ``n`` arrange canvases laid out as training lays them."""
    from foretell.models.default import answer_constraints
    from foretell.tasks import get_task
    from training.data import make_batch

    loaded = load_model(DEFAULT_MODEL_DIR)
    model, tok = loaded.model.requires_grad_(True), loaded.tokenizer
    ids, attention, is_gen = make_batch(tok, get_task("arrange").heldout(n, 99))
    keep = train.forced_positions(is_gen, answer_constraints(tok))
    return model, (ids, attention, is_gen, keep, tok.mask_token_id)


def test_view_losses_reach_every_layer() -> None:
    model, batch = _view_batch(8)
    losses = train.cache_view_losses(model, *batch, torch.Generator().manual_seed(0))
    assert losses.numel() > 0 and bool(torch.isfinite(losses).all())
    losses.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


@pytest.mark.parametrize("own", [True, False])
def test_distill_adds_the_kl_from_the_uncached_prediction_of_the_same_canvas(own: bool) -> None:
    import copy

    from training.cache_views import cache_view_batch

    model, batch = _view_batch(16)
    ids, attention = batch[:2]
    # The model's own uncached prediction, or a frozen teacher's (here the model, perturbed).
    teacher = None
    if not own:
        teacher = copy.deepcopy(model)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    kwargs = {"dual_fraction": 1.0, "block_lengths": (8,), "where": "uniform"}
    with torch.no_grad():
        plain = train.cache_view_losses(model, *batch, torch.Generator().manual_seed(4), **kwargs)
        mixed = train.cache_view_losses(
            model, *batch, torch.Generator().manual_seed(4), distill=0.5, teacher=teacher, **kwargs
        )
        # The same views, drawn again from the same seed, and the KL written out.
        views = cache_view_batch(*batch, torch.Generator().manual_seed(4), 1.0, (8,))
        s, g = ids.shape[1], views.ids.shape[1] - ids.shape[1]
        rows = views.masked[:, s:]
        cached = model(views.ids, attention_mask=views.allowed, positions=views.positions)
        canvas = torch.cat([ids[:, : s - g], views.ids[:, s:]], 1)
        uncached = (model if own else teacher)(canvas, attention_mask=attention)[:, s - g :]
    p = uncached[rows].log_softmax(-1)
    q = cached[:, s:][rows].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(mixed - plain, 0.5 * kl, atol=1e-5)
    # On the shipped model a dual step does not decode exactly as the uncached pass does.
    assert float(kl.max()) > 1e-3


def test_view_losses_refuse_a_teacher_without_distillation() -> None:
    model, batch = _view_batch(2)
    with pytest.raises(ValueError, match="teacher"):
        train.cache_view_losses(model, *batch, torch.Generator(), teacher=model)
    with pytest.raises(ValueError, match="distill"):
        train.cache_view_losses(model, *batch, torch.Generator(), distill=-1.0)


def test_hardest_views_are_those_whose_cached_step_disagrees_most_with_a_full_pass() -> None:
    from training.cache_views import cache_view_batch

    model, batch = _view_batch(16)
    ids, attention = batch[:2]
    views = cache_view_batch(*batch, torch.Generator().manual_seed(3), 1.0, (8,))
    top = train.hardest_views(model, views, ids, attention, 4)
    # Each view's score written out alone: the mean over its scored rows of the KL from the
    # full pass over its step canvas to the cached step.
    s, g = ids.shape[1], views.ids.shape[1] - ids.shape[1]
    scores = []
    with torch.no_grad():
        for i in range(len(ids)):
            cached = model(
                views.ids[i : i + 1],
                attention_mask=views.allowed[i : i + 1],
                positions=views.positions[i : i + 1],
            )[0, s:]
            canvas = torch.cat([ids[i, : s - g], views.ids[i, s:]])[None]
            full = model(canvas, attention_mask=attention[i : i + 1])[0, s - g :]
            rows = views.masked[i, s:]
            p, q = full[rows].log_softmax(-1), cached[rows].log_softmax(-1)
            scores.append(float((p.exp() * (p - q)).sum(-1).mean()) if rows.any() else 0.0)
    assert len(set(top.tolist())) == 4
    # The kept views' scores are the four largest (compared as values, so that a tie at the
    # boundary cannot make a right choice fail), and the scores do differ.
    kept = sorted(scores[i] for i in top.tolist())
    assert kept == pytest.approx(sorted(scores)[-4:], abs=1e-6)
    assert max(scores) > min(scores) + 1e-3


def test_a_hard_pool_scores_only_its_hardest_views() -> None:
    import torch.nn.functional as F

    from training.cache_views import CacheViews, cache_view_batch

    model, batch = _view_batch(16)
    ids, attention = batch[:2]
    kwargs = {"dual_fraction": 1.0, "block_lengths": (8,), "where": "uniform"}
    with torch.no_grad():
        losses = train.cache_view_losses(
            model, *batch, torch.Generator().manual_seed(7), hard=4, **kwargs
        )
        # The same pool of views, drawn again from the same seed; the four hardest scored.
        views = cache_view_batch(*batch, torch.Generator().manual_seed(7), 1.0, (8,))
        top = train.hardest_views(model, views, ids, attention, 4)
        kept = CacheViews(*(t[top] for t in views))
        s, g = ids.shape[1], views.ids.shape[1] - ids.shape[1]
        logits = model(kept.ids, attention_mask=kept.allowed, positions=kept.positions)[:, s:]
        rows = kept.masked[:, s:]
        expected = F.cross_entropy(logits[rows], ids[top][:, s - g :][rows], reduction="none")
    assert torch.equal(losses, expected)
    with pytest.raises(ValueError, match="hard"):
        train.cache_view_losses(model, *batch, torch.Generator(), hard=3)


@pytest.mark.parametrize("hard", [1, 3])
def test_main_draws_a_pool_of_hard_times_the_views_after_the_plain_examples(
    tmp_path, monkeypatch, hard: int
) -> None:
    """A batch of 4 with half views: 2 plain examples, then 2 views chosen from 2 * hard."""
    calls: list[tuple[str, int, int]] = []
    view_losses, sft_losses = train.cache_view_losses, train.sft_token_losses

    def record_views(model, ids, *args, **kwargs):
        calls.append(("views", len(ids), args[-1]))
        return view_losses(model, ids, *args, **kwargs)

    def record_plain(model, ids, *args, **kwargs):
        calls.append(("plain", len(ids), 0))
        return sft_losses(model, ids, *args, **kwargs)

    monkeypatch.setattr(train, "cache_view_losses", record_views)
    monkeypatch.setattr(train, "sft_token_losses", record_plain)
    argv = f"--init {DEFAULT_MODEL_DIR} --out {tmp_path} --tasks arrange --steps 1 --batch-size 4"
    argv += f" --eval-every 100 --eval-n 1 --cache-views 0.5 --cache-view-hard {hard}"
    train.main(argv.split())
    assert calls == [("views", 2 * hard, hard), ("plain", 2, 0)]
