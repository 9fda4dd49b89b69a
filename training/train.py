"""Train the default model: ``python -m training.train`` (docs/training.md).

LLaDA's SFT masking: per example t ~ U(eps, 1), every generation token is masked with
probability t (the prompt never is). The loss is the cross-entropy on masked positions, either
averaged over them (``--loss-weighting uniform``, the default) or LLaDA's ELBO form, weighted by
1/t and divided by the generation length (``elbo``). At this model size the 1/t weights let a
few nearly unmasked examples dominate each clipped gradient, and ``elbo`` learned the default
task measurably slower (docs/training.md). AdamW with linear warmup and cosine decay; every
random choice comes from ``--seed``.

``--cache-views F`` trains a fraction F of every batch on views of cached decoding
(:mod:`training.cache_views`), so that the model tolerates the block KV cache;
``--init DIR`` starts from a checkpoint (the shipped model is the base run fine-tuned so).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from foretell.models.default import (
    BLOCK_LENGTH,
    DEFAULT_MODEL_DIR,
    HELDOUT_SEED,
    HELDOUT_SIZE,
    STEPS,
    answer_constraints,
)
from foretell.models.default.data import accuracy
from foretell.models.llada import LLaDAModelLM
from foretell.models.registry import load_model, save_model
from foretell.models.tiny import build_default_model
from foretell.models.tokenizer import build_char_tokenizer
from foretell.tasks import ALPHABET, CHAT_TEMPLATE, GEN_LENGTH, get_task
from training.cache_views import VIEW_BLOCK_LENGTHS, CacheViews, cache_view_batch
from training.data import make_batch

MASK_EPS = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--tasks", default="shuffle", help="name:weight,...")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--loss-weighting", choices=("uniform", "elbo"), default="uniform")
    p.add_argument(
        "--cache-views",
        type=float,
        default=0.0,
        help="fraction of each batch trained on views of cached decoding (0: none)",
    )
    p.add_argument(
        "--cache-view-dual",
        type=float,
        default=0.5,
        help="fraction of the cached-decoding views that are dual-cache steps (else prefix)",
    )
    p.add_argument(
        "--cache-view-blocks",
        default=",".join(map(str, VIEW_BLOCK_LENGTHS)),
        help="block lengths the views are drawn from (uniformly)",
    )
    p.add_argument(
        "--cache-view-where",
        choices=("uncertain", "uniform"),
        default="uncertain",
        help="which block a view is of: drawn by the model's entropy at the block's refresh, "
        "or uniformly",
    )
    p.add_argument(
        "--cache-view-certain-first",
        type=float,
        default=0.0,
        help="fraction of the views whose revealed positions are those the model was surest of "
        "at the refresh (lowest entropy first: about the order low-confidence remasking reveals "
        "in), else random; "
        "needs --cache-view-where uncertain",
    )
    p.add_argument(
        "--cache-view-distill",
        type=float,
        default=0.0,
        help="weight of the KL divergence from the model's own uncached prediction of a view's "
        "step canvas to the cached step's, added to the cross-entropy (0: none)",
    )
    p.add_argument(
        "--cache-view-teacher",
        type=Path,
        default=None,
        help="checkpoint whose uncached prediction --cache-view-distill targets (default: the "
        "model being trained)",
    )
    p.add_argument(
        "--cache-view-hard",
        type=int,
        default=1,
        help="draw K times as many views and train on the 1/K whose cached step disagrees most "
        "with a full pass over the same canvas (1: every view drawn)",
    )
    p.add_argument(
        "--init", type=Path, default=None, help="start from this checkpoint (fine-tuning)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument(
        "--heldout",
        type=int,
        default=HELDOUT_SIZE,
        help=f"held-out prompts per task, never trained on (default {HELDOUT_SIZE})",
    )
    p.add_argument("--eval-every", type=int, default=600)
    p.add_argument("--eval-n", type=int, default=100, help="held-out prompts per task per eval")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--log-json", type=Path, default=None)
    args = p.parse_args(argv)
    for dest in ("cache_views", "cache_view_dual", "cache_view_certain_first"):
        if not 0.0 <= getattr(args, dest) <= 1.0:
            flag = "--" + dest.replace("_", "-")
            p.error(f"{flag}: {getattr(args, dest)} is not a fraction in [0, 1]")
    try:
        args.cache_view_blocks = tuple(int(n) for n in args.cache_view_blocks.split(","))
    except ValueError:
        p.error(f"--cache-view-blocks: {args.cache_view_blocks!r} is not a list of integers")
    if any(n <= 0 or GEN_LENGTH % n for n in args.cache_view_blocks):
        p.error(f"--cache-view-blocks: each of {args.cache_view_blocks} must divide {GEN_LENGTH}")
    if args.cache_view_certain_first > 0 and args.cache_view_where != "uncertain":
        p.error("--cache-view-certain-first: needs --cache-view-where uncertain")
    if not args.cache_view_distill >= 0.0:
        p.error(f"--cache-view-distill: {args.cache_view_distill} is not a weight >= 0")
    if args.cache_view_teacher is not None and not args.cache_view_distill > 0:
        p.error("--cache-view-teacher: needs --cache-view-distill > 0")
    if args.cache_view_hard < 1:
        p.error(f"--cache-view-hard: {args.cache_view_hard} is not a pool factor >= 1")
    if args.cache_view_hard > 1 and not args.cache_views > 0:
        p.error("--cache-view-hard: needs --cache-views > 0 (it chooses among views)")
    if args.cache_views > 0 and args.loss_weighting != "uniform":
        p.error("--cache-views: needs --loss-weighting uniform (a view has no single t)")
    return args


def build_model(args: argparse.Namespace, tokenizer: object) -> LLaDAModelLM:
    """A LLaDA-architecture model of the shape ``args`` asks for, freshly initialised."""
    return build_default_model(
        tokenizer,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
    )


def sft_token_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    attention: torch.Tensor,
    is_gen: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA's SFT masking of one batch: (per-token cross-entropy, masked [B, L], p_mask [B, 1])."""
    t = torch.rand(ids.shape[0], 1, generator=generator)
    p_mask = (1 - MASK_EPS) * t + MASK_EPS
    masked = (torch.rand(ids.shape, generator=generator) < p_mask) & is_gen
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = model(noisy, attention_mask=attention)
    return F.cross_entropy(logits[masked], ids[masked], reduction="none"), masked, p_mask


def masked_diffusion_loss(
    model: torch.nn.Module,
    ids: torch.Tensor,
    attention: torch.Tensor,
    is_gen: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    weighting: str = "uniform",
) -> torch.Tensor:
    """Masked-diffusion loss for one batch (see the module docstring)."""
    token_loss, masked, p_mask = sft_token_losses(model, ids, attention, is_gen, mask_id, generator)
    if weighting == "uniform":
        return token_loss.mean()
    weights = p_mask.expand_as(ids)[masked]
    gen_length = is_gen.sum(1, keepdim=True).expand_as(ids)[masked]
    return (token_loss / weights / gen_length).sum() / ids.shape[0]


def forced_positions(is_gen: torch.Tensor, constraints: dict[int, int]) -> torch.Tensor:
    """``[B, S]`` generation positions that decoding forces (the ``answer:`` marker): a view
    keeps them in its canvases, as constraints keep them when decoding."""
    gen_index = torch.arange(is_gen.shape[1]) - (is_gen.shape[1] - GEN_LENGTH)
    return is_gen & torch.isin(gen_index, torch.tensor(sorted(constraints)))[None, :]


def cache_view_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    attention: torch.Tensor,
    is_gen: torch.Tensor,
    keep: torch.Tensor,
    mask_id: int,
    generator: torch.Generator,
    dual_fraction: float = 0.5,
    block_lengths: tuple[int, ...] = VIEW_BLOCK_LENGTHS,
    where: str = "uncertain",
    certain_first: float = 0.0,
    distill: float = 0.0,
    teacher: torch.nn.Module | None = None,
    hard: int = 1,
) -> torch.Tensor:
    """Per-token cross-entropy of a batch of cached-decoding views: the step copy's masked rows
    (the block, and after it the rows a prefix step recomputes or dual reads for Prophet).

    The refresh copy is not scored: it is a plain full pass, which the plain examples train.
    ``distill`` adds that weight times the KL divergence from the model's own uncached
    prediction of the same canvas (a full pass, no gradient) to the cached step's: the target
    of the cache is to decode as the uncached model does, and the uncached route generalizes
    to unseen prompts better than the cached one learned alone. ``teacher`` (a frozen model)
    makes the uncached prediction its instead of the model's own. ``hard`` > 1: the batch is a
    pool ``hard`` times the views trained; a view is drawn for each, and only the
    ``len(ids) // hard`` of :func:`hardest_views` are scored."""
    if hard < 1 or len(ids) % hard:
        raise ValueError(f"hard: {hard} is not a pool factor >= 1 dividing the batch ({len(ids)})")
    if distill < 0:
        raise ValueError(f"distill: {distill} is not a weight >= 0")
    if teacher is not None and distill == 0:
        raise ValueError("teacher: needs distill > 0 (it is only the distillation's target)")
    g = int(is_gen[0].sum())

    def entropy(canvases: torch.Tensor, canvas_attention: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(canvases, attention_mask=canvas_attention)[:, -g:]
        logp = logits.float().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)

    views = cache_view_batch(
        ids,
        attention,
        is_gen,
        keep,
        mask_id,
        generator,
        dual_fraction,
        block_lengths,
        entropy if where == "uncertain" else None,
        certain_first,
    )
    s = ids.shape[1]
    if hard > 1:
        top = hardest_views(model, views, ids, attention, len(ids) // hard)
        views = CacheViews(*(t[top] for t in views))
        ids, attention = ids[top], attention[top]
    logits = model(views.ids, attention_mask=views.allowed, positions=views.positions)
    rows = views.masked[:, s:]
    cached = logits[:, s:][rows]
    losses = F.cross_entropy(cached, ids[:, s - g :][rows], reduction="none")
    if distill > 0:
        with torch.no_grad():
            source = teacher if teacher is not None else model
            uncached = uncached_logits(source, views, ids, attention)[rows]
        losses = losses + distill * kl_from(uncached, cached)
    return losses


def uncached_logits(
    model: torch.nn.Module, views: CacheViews, ids: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """``[B, G, V]``: a full pass over each view's step canvas, what decoding without a cache
    would predict where the cached step predicts."""
    s, g = ids.shape[1], views.ids.shape[1] - ids.shape[1]
    step_canvas = ids.clone()
    step_canvas[:, s - g :] = views.ids[:, s:]
    return model(step_canvas, attention_mask=attention)[:, s - g :]


def kl_from(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row, KL(softmax(target) || softmax(logits)): how far a cached step's prediction is
    from the full pass's. In float32, so that the small disagreements between two confident
    predictions, which are what tell the views apart, are not lost to a half-precision softmax."""
    target_logp = target_logits.float().log_softmax(-1)
    return (target_logp.exp() * (target_logp - logits.float().log_softmax(-1))).sum(-1)


def hardest_views(
    model: torch.nn.Module,
    views: CacheViews,
    ids: torch.Tensor,
    attention: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """Indices of the ``n`` views whose cached step disagrees most with the model's own full
    pass over the same step canvas (the mean KL from it over the view's scored rows).

    On training prompts the fine-tuned model's cached step mostly decodes as its full pass does,
    so uniformly drawn views mostly teach what it already does; the held-out `dual` failures are
    letter sets where the cached step is unsure and the full pass is not (docs/training.md)."""
    s = ids.shape[1]
    with torch.no_grad():
        rows = views.masked[:, s:]
        cached = model(views.ids, attention_mask=views.allowed, positions=views.positions)[:, s:]
        kl = kl_from(uncached_logits(model, views, ids, attention), cached) * rows
        score = kl.sum(1) / rows.sum(1).clamp(min=1)
    return score.topk(n).indices


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98) with weight decay on the matrices only (not norms or biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup over ``args.warmup`` steps, then cosine from ``args.lr`` down to 10%."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    tokenizer = build_char_tokenizer(ALPHABET)
    tokenizer.chat_template = CHAT_TEMPLATE
    if args.init is None:
        model = build_model(args, tokenizer)
    else:
        model = load_model(args.init, dtype="float32").model.requires_grad_(True)
    teacher = None
    if args.cache_view_teacher is not None:
        teacher = load_model(args.cache_view_teacher, dtype="float32").model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())

    weights = {}
    for item in args.tasks.split(","):
        name, _, w = item.partition(":")
        weights[name] = float(w or 1)
    tasks = {name: get_task(name) for name in weights}
    heldout = {name: t.heldout(args.heldout, HELDOUT_SEED) for name, t in tasks.items()}
    streams = {
        name: t.train_stream(args.seed, {t.key(ex.prompt) for ex in heldout[name]})
        for name, t in tasks.items()
    }
    constraints = answer_constraints(tokenizer)
    names = list(weights)
    probs = [weights[n] for n in names]

    opt = make_optimizer(model, args.lr, args.weight_decay)
    print(f"params {n_params} tasks {weights} args {vars(args)}", flush=True)
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params}
    log["curve"] = []
    start = time.time()
    running: list[float] = []
    last_loss: float | None = None

    def evaluate(step: int, loss: float | None) -> None:
        model.eval()
        row: dict = {"step": step, "loss": loss, "minutes": (time.time() - start) / 60}
        for name, task in tasks.items():
            subset = heldout[name][: args.eval_n]
            # name: (steps, block length, kv_cache); the cached modes only when training for them.
            settings = {"full": (STEPS, BLOCK_LENGTH, None), "one_step": (1, STEPS, None)}
            if args.cache_views > 0:
                settings.update(
                    prefix=(STEPS, BLOCK_LENGTH, "prefix"), dual=(STEPS, BLOCK_LENGTH, "dual")
                )
            row[name] = {
                key: accuracy(
                    model,
                    tokenizer,
                    task,
                    subset,
                    steps=steps,
                    block_length=block,
                    constraints=constraints,
                    kv_cache=kv_cache,
                )[0]
                for key, (steps, block, kv_cache) in settings.items()
            }
        model.train()
        save_model(model, args.out, tokenizer)  # a usable checkpoint at every eval
        log["curve"].append(row)
        print("eval", json.dumps(row), flush=True)

    model.train()
    for step in range(args.steps):
        name = rng.choices(names, probs)[0]
        # Plain examples first, then the views' (a pool --cache-view-hard times the views).
        n_views = round(args.cache_views * args.batch_size)
        n_plain = args.batch_size - n_views
        batch = [next(streams[name]) for _ in range(n_plain + n_views * args.cache_view_hard)]
        ids, attention, is_gen = make_batch(tokenizer, batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        mask_id = tokenizer.mask_token_id
        if n_views == 0:
            loss = masked_diffusion_loss(
                model, ids, attention, is_gen, mask_id, generator, args.loss_weighting
            )
        else:
            # The views' rows and the plain examples' tokens, one mean each: the views'
            # rows are many (a whole step copy each) and most are easy (spaces, EOS); in one
            # mean with the plain tokens they would set its scale alone.
            keep = forced_positions(is_gen, constraints)
            v = slice(n_plain, None)
            loss = cache_view_losses(
                model,
                ids[v],
                attention[v],
                is_gen[v],
                keep[v],
                mask_id,
                generator,
                args.cache_view_dual,
                args.cache_view_blocks,
                args.cache_view_where,
                args.cache_view_certain_first,
                args.cache_view_distill,
                teacher,
                args.cache_view_hard,
            ).mean()
            if n_plain > 0:
                p = slice(0, n_plain)
                plain, _, _ = sft_token_losses(
                    model, ids[p], attention[p], is_gen[p], mask_id, generator
                )
                loss = loss + plain.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % args.log_every == 0:
            mean = sum(running) / len(running)
            running.clear()
            elapsed = (time.time() - start) / 60
            print(
                f"step {step + 1} loss {mean:.4f} lr {lr_at(step, args):.2e} min {elapsed:.1f}",
                flush=True,
            )
            last_loss = mean
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1, last_loss)
    log["minutes"] = (time.time() - start) / 60
    save_model(model, args.out, tokenizer)
    print(f"saved {args.out} after {log['minutes']:.1f} min", flush=True)
    if args.log_json is not None:
        args.log_json.write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
