"""Tokenised batches and evaluation for the default model's tasks (shared by train and evaluate)."""

from __future__ import annotations

import torch

from foretell.tasks import GEN_LENGTH, Example, Task, chat_prompt


def encode_prompt(tokenizer: object, prompt: str) -> list[int]:
    """The chat-formatted prompt as ids (no BOS: the template has none)."""
    return tokenizer(chat_prompt(prompt), add_special_tokens=False)["input_ids"]  # type: ignore[operator]


def encode_generation(tokenizer: object, example: Example) -> list[int]:
    """The generation ids, EOS-filled to ``GEN_LENGTH`` as LLaDA-Instruct's SFT data is."""
    ids = tokenizer(example.generation, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return ids + [tokenizer.eos_token_id] * (GEN_LENGTH - len(ids))  # type: ignore[attr-defined]


def make_batch(
    tokenizer: object, examples: list[Example]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, L], attention mask [B, L], generation mask [B, L]); prompts are left-padded."""
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    gens = [encode_generation(tokenizer, ex) for ex in examples]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    ids = torch.full((len(examples), width + GEN_LENGTH), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (p, g) in enumerate(zip(prompts, gens, strict=True)):
        ids[row, width - len(p) :] = torch.tensor(p + g)
        attention[row, width - len(p) :] = 1
    is_gen = torch.zeros_like(ids, dtype=torch.bool)
    is_gen[:, width:] = True
    return ids, attention, is_gen


def accuracy(
    model: torch.nn.Module,
    tokenizer: object,
    task: Task,
    examples: list[Example],
    *,
    steps: int,
    block_length: int,
    constraints: dict[int, int] | None,
    kv_cache: str | None = None,
) -> tuple[float, list[str]]:
    """Fraction of ``examples`` whose greedy generation the task's checker accepts.

    Decodes with the engine itself (one decoder in the project), on the model being trained.
    """
    from foretell.engine import Engine
    from foretell.models.registry import LoadedModel
    from foretell.params import DecodeParams

    was_training = model.training
    engine = Engine(LoadedModel(model=model, tokenizer=tokenizer, path=None), max_num_seqs=128)
    params = DecodeParams(
        gen_length=GEN_LENGTH,
        block_length=block_length,
        steps=steps,
        constraints=constraints,
        kv_cache=kv_cache,
    )
    with torch.no_grad():
        outputs = engine.generate(
            [encode_prompt(tokenizer, ex.prompt) for ex in examples], params, use_tqdm=False
        )
    model.train(was_training)
    texts = [out.text for out in outputs]
    correct = sum(task.check(ex, t) for ex, t in zip(examples, texts, strict=True))
    return correct / len(examples), texts
