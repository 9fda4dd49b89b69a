"""EnginePredictor: the stateful class that Ray Data's ``map_batches`` runs, one engine per actor.

Each actor builds one :class:`~foretell.engine.Engine` and, per batch, submits every row at
once, so that the engine's continuous batching (evict on commit, backfill) works across the
whole batch. Rows go in and out as Arrow tables: every input column is carried through
unchanged (an index column, ids, ...) and the output columns are added, with fixed types, so
that batches from different replicas concatenate. A row that fails validation or decoding gets
``error`` and ``finish_reason`` "error"; the batch and the job go on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from foretell.params import DecodeParams, job_params, row_params

# The output columns and their Arrow types (built lazily: pyarrow comes with the ray extra).
OUTPUT_COLUMNS = (
    "text",
    "token_ids",
    "num_forward_passes",
    "committed_early",
    "commit_step",
    "finish_reason",
    "error",
)

# Fault injection for the tests: the path of a marker file. The first actor that finishes a
# batch after having delivered one already creates the file and dies before returning it, so
# Ray must restart the actor and retry the batch. Read in the actor, never set in production.
KILL_ENV = "FORETELL_FAULT_KILL_REPLICA"

ParamsSpec = DecodeParams | Mapping[str, Any] | Callable[[Any], DecodeParams] | None


def output_schema():
    import pyarrow as pa

    return {
        "text": pa.string(),
        "token_ids": pa.list_(pa.int64()),
        "num_forward_passes": pa.int64(),
        "committed_early": pa.bool_(),
        "commit_step": pa.int64(),
        "finish_reason": pa.string(),
        "error": pa.string(),
    }


class EnginePredictor:
    """One engine per Ray actor; ``__call__`` generates for one Arrow batch of rows.

    ``model``: a checkpoint directory or hub id (None: the shipped model), loaded in the actor.
    ``params``: the job's decoding params, a ``DecodeParams``, a mapping of fields applied over
    the engine's defaults, or a function ``engine -> DecodeParams`` (what the CLI passes, since
    its flags build on the model's own defaults); a row's ``params`` column applies over it.
    ``chat_template``: wrap text prompts as one user message in the tokenizer's chat template,
    as ``foretell generate`` does unless ``--raw``. ``threads``: torch threads of this actor.
    ``json_prompts``: the ``prompt`` column holds JSON text (how the CLI sends a file that mixes
    text, token-id and chat prompts, which one Arrow column cannot hold as they are).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        params: ParamsSpec = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        chat_template: bool = False,
        threads: int | None = None,
        json_prompts: bool = False,
    ) -> None:
        import torch

        from foretell.engine import Engine

        if threads is not None:
            torch.set_num_threads(threads)
        self.engine = Engine(model, **dict(engine_kwargs or {}))
        self.params = resolve_params(params, self.engine)
        self.chat_template = chat_template and bool(
            getattr(self.engine.tokenizer, "chat_template", None)
        )
        self.json_prompts = json_prompts
        self.batches_done = 0

    def __call__(self, batch):
        """Generate for every row of ``batch`` (a ``pyarrow.Table`` with a ``prompt`` column
        and optionally ``params``); returns it with the output columns added."""
        import pyarrow as pa

        n = batch.num_rows
        names = batch.column_names
        prompts = batch.column("prompt").to_pylist() if "prompt" in names else [None] * n
        changes = batch.column("params").to_pylist() if "params" in names else [None] * n
        outputs: list[dict | None] = [None] * n
        todo, todo_prompts, todo_params = [], [], []
        for i, (prompt, change) in enumerate(zip(prompts, changes, strict=True)):
            try:
                if prompt is None:
                    raise ValueError("prompt: missing")
                if self.json_prompts:
                    prompt = _json_prompt(prompt)
                params = row_params(self.params, change)
            except ValueError as err:
                outputs[i] = _error_row(str(err))
                continue
            todo.append(i)
            todo_prompts.append(self._prompt(prompt))
            todo_params.append(params)
        if todo:
            results = self.engine.generate(
                todo_prompts, todo_params, use_tqdm=False, errors="return"
            )
            for i, out in zip(todo, results, strict=True):
                outputs[i] = _row(out)
        self._maybe_die()
        self.batches_done += 1

        schema = output_schema()
        table = batch.drop_columns([c for c in OUTPUT_COLUMNS if c in names])
        for name in OUTPUT_COLUMNS:
            values = [row[name] for row in outputs]
            table = table.append_column(name, pa.array(values, type=schema[name]))
        return table

    def _prompt(self, prompt: object) -> object:
        if isinstance(prompt, str) and self.chat_template:
            return [{"role": "user", "content": prompt}]
        return prompt

    def _maybe_die(self) -> None:
        marker = os.environ.get(KILL_ENV)
        if not marker or self.batches_done < 1:
            return
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # some actor died already: once per job
        os.write(fd, f"pid {os.getpid()} after {self.batches_done} batches\n".encode())
        os.close(fd)
        os._exit(1)  # a crash, not a clean exit: Ray restarts the actor and retries the batch


def resolve_params(params: ParamsSpec, engine) -> DecodeParams:
    """The job's params for this engine (see :class:`EnginePredictor`)."""
    if params is None:
        return engine.default_params
    if isinstance(params, DecodeParams):
        return params
    if isinstance(params, Mapping):
        return job_params(engine.default_params, params)
    if callable(params):
        return params(engine)
    raise ValueError(
        f"params: expected DecodeParams, a mapping or a function, got {type(params).__name__}"
    )


def _row(out) -> dict:
    return out.summary(token_ids=True)


def _error_row(message: str) -> dict:
    return {
        "text": "",
        "token_ids": [],
        "num_forward_passes": 0,
        "committed_early": False,
        "commit_step": None,
        "finish_reason": "error",
        "error": message,
    }


def _json_prompt(text: str) -> object:
    import json

    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"prompt: not valid JSON: {err}") from None
