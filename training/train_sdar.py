"""Train the block-diffusion default model: ``python -m training.train_sdar`` (docs/training.md).

The model is foretell's own :class:`~foretell.models.sdar.SDARModel` (so the checkpoint loads
with ``foretell.models.load_model``), trained with the block-diffusion objective: it learns to
denoise one block given the *clean* blocks before it, which is what it sees when decoding
(earlier blocks are final and cached).

Every block of the generation is trained in one pass over two copies of each sequence, a noisy
copy and the clean one (BD3-LM's layout). In the noisy copy each generation block gets its own
t ~ U(eps, 1) and each of its generation tokens is masked with probability t (the prompt never
is). Noisy tokens attend to the noisy tokens of their own block and to the clean tokens of the
blocks before it; clean tokens attend block-causally to clean tokens only, so their keys are
exactly the KV cache a decoder holds. The loss is the mean cross-entropy over the masked
tokens. Optimizer and schedule are the LLaDA default's (:mod:`training.train`): AdamW, linear
warmup, cosine decay; every random choice comes from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from foretell.models.block_causal import masked_attention, rotary_angles
from foretell.models.block_default import (
    BLOCK_DEFAULT_MODEL_DIR,
    BLOCK_LENGTH,
    GEN_LENGTH,
    HELDOUT_SEED,
    HELDOUT_SIZE,
    TASK_NAMES,
    generation_text,
)
from foretell.models.registry import load_model, save_model
from foretell.models.sdar import SDARConfig, SDARModel
from foretell.models.tiny import init_weights
from foretell.models.tokenizer import build_char_tokenizer
from foretell.tasks import ALPHABET, CHAT_TEMPLATE, Example, get_task
from training.block_decode import POLICIES, encode_prompt, score
from training.train import MASK_EPS, lr_at, make_optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=BLOCK_DEFAULT_MODEL_DIR)
    p.add_argument("--task", default=TASK_NAMES[0])
    p.add_argument("--steps", type=int, default=2800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--init", type=Path, default=None, help="continue from this checkpoint (its shape wins)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block-size", type=int, default=BLOCK_LENGTH)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument(
        "--heldout",
        type=int,
        default=HELDOUT_SIZE,
        help=f"held-out prompts, never trained on (default {HELDOUT_SIZE})",
    )
    p.add_argument("--eval-every", type=int, default=700)
    p.add_argument("--eval-n", type=int, default=100, help="held-out prompts per eval")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--log-json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.block_size <= 0:
        p.error(f"--block-size: {args.block_size} is not a positive block length")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--heads: must divide --hidden and be a multiple of --kv-heads")
    return args


def build_sdar_model(
    tokenizer: object,
    *,
    block_size: int = BLOCK_LENGTH,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 384,
) -> SDARModel:
    """An SDAR model for the character tokenizer, initialised as the LLaDA default is (std
    0.02, residual projections scaled by 1/sqrt(2 layers)) from torch's global generator."""
    cfg = SDARConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
    )
    model = SDARModel(
        cfg,
        block_size=block_size,
        mask_token_id=tokenizer.mask_token_id,  # type: ignore[attr-defined]
        eos_token_ids=(tokenizer.eos_token_id,),  # type: ignore[attr-defined]
    )
    init_weights(model, layers)
    return model


def make_block_batch(
    tokenizer: object, examples: list[Example], block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], generation mask [B, T]): each row is its prompt, its generation and EOS up
    to ``T``, the block-aligned length of the longest prompt plus ``GEN_LENGTH``. Rows are not
    padded: position 0 is every row's first token, as blocks are aligned at 0."""
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    gens = [
        tokenizer(generation_text(ex), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        for ex in examples
    ]
    longest = max(len(p) for p in prompts)
    width = -(-(longest + GEN_LENGTH) // block_size) * block_size
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    ids = torch.full((len(examples), width), eos, dtype=torch.long)
    is_gen = torch.ones_like(ids, dtype=torch.bool)
    for row, (p, g) in enumerate(zip(prompts, gens, strict=True)):
        ids[row, : len(p) + len(g)] = torch.tensor(p + g)
        is_gen[row, : len(p)] = False
    return ids, is_gen


def noise_blocks(
    ids: torch.Tensor,
    is_gen: torch.Tensor,
    block_size: int,
    mask_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy ids, masked [B, T]): per row and block t ~ U(0, 1), p = (1 - eps) t + eps, each
    generation token masked with probability p."""
    b, length = ids.shape
    t = torch.rand(b, -(-length // block_size), generator=generator)
    p_mask = ((1 - MASK_EPS) * t + MASK_EPS).repeat_interleave(block_size, dim=1)[:, :length]
    masked = (torch.rand(ids.shape, generator=generator) < p_mask) & is_gen
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked


def two_copy_mask(start: int, length: int, block_size: int) -> torch.Tensor:
    """``[Ln + length, Ln + length]`` booleans over the noisy copy of positions
    ``[start, length)`` followed by the clean copy of ``[0, length)``: query row may see key
    column. Noisy: its own block's noisy tokens and the clean tokens of earlier blocks. Clean:
    clean tokens of its own and earlier blocks (the block-causal mask)."""
    pos = torch.cat([torch.arange(start, length), torch.arange(length)])
    blk = torch.div(pos, block_size, rounding_mode="floor")
    noisy = torch.arange(len(pos)) < length - start
    q_blk, k_blk = blk[:, None], blk[None, :]
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    seen_by_noisy = (k_noisy & (k_blk == q_blk)) | (~k_noisy & (k_blk < q_blk))
    seen_by_clean = ~k_noisy & (k_blk <= q_blk)
    return torch.where(q_noisy, seen_by_noisy, seen_by_clean)


def two_copy_logits(
    model: SDARModel, noisy: torch.Tensor, clean: torch.Tensor, start: int
) -> torch.Tensor:
    """``[B, T - start, V]``: the model's logits at the noisy positions ``[start, T)`` given
    the clean sequence, in one pass (see the module docstring); ``start`` is a block start."""
    if start % model.block_size:
        raise ValueError(f"start: {start} is not a multiple of block size {model.block_size}")
    length = clean.shape[1]
    pos = torch.cat([torch.arange(start, length), torch.arange(length)])[None]
    allowed = two_copy_mask(start, length, model.block_size)[None]
    x = model.embed(torch.cat([noisy[:, start:], clean], dim=1))
    cos, sin = rotary_angles(pos, model.rotary_dim, model.rope_theta, x.dtype)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return masked_attention(q, k, v, allowed)

    for layer in model.layers:
        x = layer(x, cos, sin, attend)
    return model.lm_logits(model.norm(x[:, : length - start]))


def block_diffusion_loss(
    model: SDARModel,
    ids: torch.Tensor,
    is_gen: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Mean cross-entropy over the masked generation tokens of one batch, every block
    denoised given the clean blocks before it."""
    block = model.block_size
    noisy, masked = noise_blocks(ids, is_gen, block, model.mask_token_id, generator)
    # The noisy copy starts at the first block that holds a generation token in some row.
    first_gen = int(is_gen.float().argmax(1).min())
    start = first_gen // block * block
    logits = two_copy_logits(model, noisy, ids, start)
    rows = masked[:, start:]
    if not rows.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[rows], ids[:, start:][rows])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    tokenizer = build_char_tokenizer(ALPHABET)
    tokenizer.chat_template = CHAT_TEMPLATE
    if args.init is None:
        model = build_sdar_model(
            tokenizer,
            block_size=args.block_size,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
        )
    else:
        model = load_model(args.init, dtype="float32").model.requires_grad_(True)
        if model.block_size != args.block_size:
            raise SystemExit(f"--init: {args.init} has block size {model.block_size}")
    n_params = sum(p.numel() for p in model.parameters())
    task = get_task(args.task)
    heldout = task.heldout(args.heldout, HELDOUT_SEED)
    stream = task.train_stream(args.seed, {task.key(ex.prompt) for ex in heldout})
    opt = make_optimizer(model, args.lr, args.weight_decay)
    print(f"params {n_params} args {vars(args)}", flush=True)
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params}
    log["curve"] = []
    start = time.time()
    running: list[float] = []
    last_loss: float | None = None

    def evaluate(step: int) -> None:
        row: dict = {"step": step, "loss": last_loss, "minutes": (time.time() - start) / 60}
        subset = heldout[: args.eval_n]
        for policy in POLICIES:
            acc, passes, _ = score(model, tokenizer, task, subset, policy)
            row[policy] = {"accuracy": acc, "passes": passes}
        save_model(model, args.out, tokenizer)  # a usable checkpoint at every eval
        log["curve"].append(row)
        print("eval", json.dumps(row), flush=True)

    model.train()
    for step in range(args.steps):
        ids, is_gen = make_block_batch(
            tokenizer, [next(stream) for _ in range(args.batch_size)], args.block_size
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = block_diffusion_loss(model, ids, is_gen, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % args.log_every == 0:
            last_loss = sum(running) / len(running)
            running.clear()
            elapsed = (time.time() - start) / 60
            print(
                f"step {step + 1} loss {last_loss:.4f} lr {lr_at(step, args):.2e} "
                f"min {elapsed:.1f}",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evaluate(step + 1)
    log["minutes"] = (time.time() - start) / 60
    save_model(model, args.out, tokenizer)
    print(f"saved {args.out} after {log['minutes']:.1f} min", flush=True)
    if args.log_json is not None:
        args.log_json.write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
