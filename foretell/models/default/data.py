"""Prompts and evaluation for the default model's tasks (training batches: ``training/data.py``)."""

from __future__ import annotations

import torch

from foretell.tasks import GEN_LENGTH, Example, Task, chat_prompt


def encode_prompt(tokenizer: object, prompt: str) -> list[int]:
    """The chat-formatted prompt as ids (no BOS: the template has none)."""
    return tokenizer(chat_prompt(prompt), add_special_tokens=False)["input_ids"]  # type: ignore[operator]


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
