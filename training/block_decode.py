"""Decode and score the block-diffusion default model during and after training.

The engine does not decode block-causal models yet (issue #25), so training measures its model
with this batch-1 decoder, which follows SDAR's own ``bd3`` decoding: blocks are aligned at
position 0; the prompt's whole blocks go into the KV cache in one pass; each later block starts
fully masked (or holding the prompt's tail) and is denoised over ``steps`` passes that see the
cached clean blocks, each revealing the ``k`` most confident masked positions (``k`` from the
static schedule, ``block // steps`` plus one for the first ``block % steps`` steps), or, with a
``threshold``, every position above it when there are at least ``k``; a finished block costs
one more pass that stores its clean keys. Decoding stops after the block holding a stop token.
Greedy (argmax), confidence = the argmax's softmax probability.
tests/test_block_default.py checks it against tests/reference_sdar.py token for token.

``python -m training.block_decode`` measures the shipped checkpoint on the held-out prompts
under every policy (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from foretell.models.block_default import (
    BLOCK_DEFAULT_MODEL_DIR,
    GEN_LENGTH,
    HELDOUT_SEED,
    STEPS,
    TASK_NAMES,
    THRESHOLD,
    chat_prompt,
    check_heldout_size,
)
from foretell.tasks import Example, Task, get_task

# name: (steps per block, threshold). "full" reveals one token per pass; "threshold" is SDAR's
# dynamic decoding; "half" reveals two per pass and "one_step" a whole block in one pass (what
# parallel decoding risks).
POLICIES: dict[str, tuple[int, float | None]] = {
    "full": (STEPS, None),
    "threshold": (STEPS, THRESHOLD),
    "half": (STEPS // 2, None),
    "one_step": (1, None),
}


@dataclass(frozen=True)
class Decoded:
    tokens: list[int]  # the generation, cut after the first stop token and at gen_length
    passes: int  # forward passes, the store passes included


def reveal_schedule(block_length: int, steps: int) -> list[int]:
    """Positions revealed at each of a block's ``steps`` (summing to ``block_length``)."""
    if not 0 < steps <= block_length:
        raise ValueError(f"steps: {steps} is not in [1, block length {block_length}]")
    return [block_length // steps + (i < block_length % steps) for i in range(steps)]


def positions_to_reveal(conf: torch.Tensor, k: int, threshold: float | None) -> torch.Tensor:
    """Indices into ``conf`` (``-inf`` where not masked): all above ``threshold`` if at least
    ``k`` are, else the ``k`` most confident (fewer when fewer are masked)."""
    if threshold is not None:
        above = (conf > threshold).nonzero().flatten()
        if len(above) >= k:
            return above
    return conf.topk(min(k, int(torch.isfinite(conf).sum()))).indices


@torch.no_grad()
def block_decode(
    model: torch.nn.Module,
    prompt: list[int],
    *,
    gen_length: int = GEN_LENGTH,
    steps: int = STEPS,
    threshold: float | None = None,
    stop_ids: tuple[int, ...] | None = None,
) -> Decoded:
    """Greedy block decoding of one prompt with a block-causal model and its KV cache.

    ``stop_ids`` None: the model's EOS ids.
    """
    block, mask = int(model.block_size), int(model.mask_token_id)
    stops = set(model.eos_token_ids if stop_ids is None else stop_ids)
    schedule = reveal_schedule(block, steps)
    n = len(prompt)
    blocks = -(-(n + gen_length) // block)
    canvas = torch.full((1, blocks * block), mask, dtype=torch.long)
    canvas[0, :n] = torch.tensor(prompt, dtype=torch.long)
    positions = torch.arange(blocks * block)[None]
    first = n // block
    past, passes = None, 0
    if first:
        end = first * block
        _, past = model(canvas[:, :end], positions=positions[:, :end], return_kv=True)
        passes += 1
    for b in range(first, blocks):
        span = slice(b * block, (b + 1) * block)
        for k in schedule:
            masked = canvas[0, span] == mask
            if not masked.any():
                break
            logits = model(canvas[:, span], positions=positions[:, span], past=past)[0]
            passes += 1
            best = logits.argmax(-1)
            conf = logits.softmax(-1).gather(-1, best[:, None])[:, 0].float()
            reveal = positions_to_reveal(conf.masked_fill(~masked, float("-inf")), k, threshold)
            canvas[0, span.start + reveal] = best[reveal]
        _, kv = model(canvas[:, span], positions=positions[:, span], past=past, return_kv=True)
        past = kv if past is None else past.cat(kv)
        passes += 1
        if stops & set(canvas[0, n : span.stop].tolist()):
            break
    tokens = canvas[0, n : n + gen_length].tolist()
    for i, t in enumerate(tokens):
        if t in stops:
            tokens = tokens[: i + 1]
            break
    return Decoded(tokens=tokens, passes=passes)


def encode_prompt(tokenizer: object, prompt: str) -> list[int]:
    """The prompt's ids as the model was trained on them (the chat template adds nothing)."""
    return tokenizer(chat_prompt(prompt), add_special_tokens=False)["input_ids"]  # type: ignore[operator]


def score(
    model: torch.nn.Module,
    tokenizer: object,
    task: Task,
    examples: list[Example],
    policy: str,
) -> tuple[float, float, list[str]]:
    """(accuracy, mean forward passes, generated texts) of ``examples`` under ``policy``."""
    steps, threshold = POLICIES[policy]
    was_training = model.training
    model.eval()
    texts, passes, right = [], 0, 0
    for ex in examples:
        prompt = encode_prompt(tokenizer, ex.prompt)
        out = block_decode(model, prompt, steps=steps, threshold=threshold)
        text = tokenizer.decode(out.tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
        texts.append(text)
        passes += out.passes
        right += task.check(ex, text)
    model.train(was_training)
    return right / len(examples), passes / len(examples), texts


def main(argv: list[str] | None = None) -> None:
    """Accuracy and mean forward passes of a checkpoint on held-out prompts, per policy."""
    from foretell.models import load_model

    p = argparse.ArgumentParser(description="Score a block-diffusion checkpoint per policy.")
    p.add_argument("--model", type=Path, default=BLOCK_DEFAULT_MODEL_DIR)
    p.add_argument("--task", default=TASK_NAMES[0])
    p.add_argument("--n", type=int, default=500, help="held-out prompts (the first n)")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, help="held-out stream seed")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    check_heldout_size(args.n, args.seed)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    task = get_task(args.task)
    examples = task.heldout(args.n, args.seed)
    report: dict = {"model": str(args.model), "task": task.name, "n": args.n, "seed": args.seed}
    for policy in args.policies.split(","):
        if policy not in POLICIES:
            p.error(f"--policies: unknown policy {policy!r}; choose from {sorted(POLICIES)}")
        start = time.perf_counter()
        acc, passes, _ = score(loaded.model, loaded.tokenizer, task, examples, policy)
        report[policy] = {
            "accuracy": acc,
            "mean_forward_passes": passes,
            "seconds": time.perf_counter() - start,
        }
        print(f"{policy:<10} accuracy {acc:.1%}  passes {passes:.2f}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
