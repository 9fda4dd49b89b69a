"""The benchmark's workload: one seeded list of requests that every mode runs unchanged.

Requests are held-out task prompts (never trained on), chat-templated as the default model was
trained, with a seeded mix of block lengths, step budgets and (where the model allows it)
generation lengths. For speed alone (a random-weights model, long generations) prompts can
instead be seeded random token ids of a given length range: no task, no accuracy. A workload can
also be read from, and written to, JSONL, so that a run can be repeated on exactly the same
requests. Each request carries its task so that accuracy can be checked exactly; the
early-commit policy and the KV cache mode are *not* part of a request: they belong to the mode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from foretell.models.default import HELDOUT_SEED, TASK_NAMES, check_heldout_size
from foretell.params import DecodeParams, as_params
from foretell.tasks import get_task

Prompt = str | list[int] | list[dict]


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload: what the engine gets, plus what the checker needs."""

    prompt: Prompt
    params: DecodeParams  # without an early-commit policy: the mode decides that
    task: str | None = None  # name in foretell.tasks, for accuracy
    task_prompt: str | None = None  # the raw task prompt the checker parses
    # Per-request overrides of what the mode sets (a mixed workload, e.g. ``varied``): the cache
    # mode (``"none"``, ``"prefix"``, ``"dual"``) and whether Prophet is on. None: the mode's.
    kv_cache: str | None = None
    prophet: bool | None = None

    def to_json(self) -> dict:
        fields = params_dict(self.params)
        out = {
            "prompt": self.prompt,
            "params": fields,
            "task": self.task,
            "task_prompt": self.task_prompt,
        }
        # Only when set, so that files of unmixed workloads stay as they were.
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache
        if self.prophet is not None:
            out["prophet"] = self.prophet
        return out


# DecodeParams fields a mode sets (``--modes``, ``--kv-cache``), never a workload.
MODE_FIELDS = ("early_commit", "kv_cache")


def params_dict(params: DecodeParams) -> dict:
    """DecodeParams as plain JSON-able fields, without what the mode sets (``MODE_FIELDS``)."""
    fields = dataclasses.asdict(params)
    for name in MODE_FIELDS:
        fields.pop(name, None)
    fields["stop"] = list(fields["stop"])
    if fields.get("constraints") is not None:
        fields["constraints"] = {str(k): v for k, v in sorted(fields["constraints"].items())}
    return fields


def request_hash(requests: Sequence[tuple[Prompt, DecodeParams]]) -> str:
    """sha256 of the (prompt, params-without-mode-fields) list, in order: equal hashes mean two
    modes ran exactly the same requests."""
    payload = [[prompt, params_dict(params)] for prompt, params in requests]
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_workload(
    base: DecodeParams,
    n: int,
    *,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    block_lengths: Sequence[int] | None = None,
    step_budgets: Sequence[int] | None = None,
    gen_lengths: Sequence[int] | None = None,
    remaskings: Sequence[str] | None = None,
    heldout_seed: int = HELDOUT_SEED,
    prompt_tokens: tuple[int, int] | None = None,
    prompt_vocab: Sequence[int] | None = None,
    per_block_steps: bool = False,
) -> list[BenchRequest]:
    """``n`` seeded requests over ``tasks``' held-out prompts (default: the shipped model's).

    With ``prompt_tokens=(lo, hi)`` each prompt is instead ``lo..hi`` (uniform) token ids drawn
    from ``prompt_vocab``, with no task: a speed workload of long prompts for a random-weights
    model, on which accuracy means nothing.

    Each request draws its task, generation length, block length, step budget and remasking
    rule uniformly from the given choices (combinations the model's family refuses, e.g. a
    block length that does not divide the generation, are never drawn). ``base`` supplies
    everything else (the model's own layout and constraints). The draws are sequential, so the
    first ``k`` requests of a workload of ``n > k`` are the workload of ``k``: scaling runs grow
    one list. ``per_block_steps``: a block-causal model's budgets, steps per block (at most
    the block), any generation length.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if tasks is None:
        tasks = TASK_NAMES
    if not tasks:
        raise ValueError("tasks: need at least one task")
    if prompt_tokens is not None:
        lo, hi = prompt_tokens
        if not 1 <= lo <= hi:
            raise ValueError(f"prompt_tokens: need 1 <= min <= max, got {prompt_tokens}")
        if not prompt_vocab:
            raise ValueError("prompt_vocab: random prompts need token ids to draw from")
        tasks = tasks[:1]  # not used for prompts; keeps the draws below unchanged in shape
    task_objs = [get_task(name) for name in tasks]
    if prompt_tokens is None:
        check_heldout_size(n, heldout_seed)
    gen_lengths = list(gen_lengths or [base.gen_length])
    block_lengths = list(block_lengths or [base.block_length])
    step_budgets = list(step_budgets or [base.steps])
    remaskings = list(remaskings or [base.remasking])
    rng = random.Random(f"foretell-bench/{seed}")
    # Held-out streams are distinct by key and prefix-stable, so drawing from them in order
    # never repeats a problem.
    pools = {} if prompt_tokens else {t.name: iter(t.heldout(n, heldout_seed)) for t in task_objs}
    out: list[BenchRequest] = []
    for _ in range(n):
        task = rng.choice(task_objs)
        example = next(pools[task.name]) if pools else None
        gen = rng.choice(gen_lengths)
        combos = [
            (b, s)
            for b in block_lengths
            for s in step_budgets
            if (s <= b if per_block_steps else gen % b == 0 and s <= gen and s % (gen // b) == 0)
        ]
        if not combos:
            raise ValueError(
                f"block_lengths {block_lengths} x step_budgets {step_budgets}: no valid "
                f"combination for gen_length {gen} (block lengths must divide it: "
                f"{_divisors(gen)}; steps must be a multiple of the number of blocks)"
            )
        block, steps = rng.choice(combos)
        remasking = rng.choice(remaskings) if len(remaskings) > 1 else remaskings[0]
        constraints = base.constraints
        if constraints and gen != base.gen_length:
            # The model's layout (e.g. a forced answer marker) is tied to its own length.
            constraints = None
        params = base.replace(
            gen_length=gen,
            block_length=block,
            steps=steps,
            remasking=remasking,
            constraints=constraints,
            early_commit=None,
            kv_cache=None,
            seed=rng.randrange(2**31),
        )
        if example is None:
            length = rng.randint(*prompt_tokens)  # type: ignore[misc]
            ids = [rng.choice(prompt_vocab) for _ in range(length)]  # type: ignore[arg-type]
            out.append(BenchRequest(ids, params))
            continue
        prompt = [{"role": "user", "content": example.prompt}]
        out.append(BenchRequest(prompt, params, task.name, example.prompt))
    return out


# ``--workload-preset varied``: long, varied requests for a random-weights model (speed only):
# prompts of 16-512 random token ids, generations of 64-256 in blocks of 32 at full steps, each
# request with its own cache mode (a third each of none / prefix / dual) and Prophet on exactly
# half, so that one engine batch mixes every kind of step.
VARIED_PROMPT_TOKENS = (16, 512)
VARIED_BLOCK_LENGTH = 32
VARIED_GEN_LENGTHS = tuple(range(64, 257, VARIED_BLOCK_LENGTH))
VARIED_KV_CACHES = ("none", "prefix", "dual")
VARIED_THRESHOLDS = (100.0, 100.0, 0.1)  # Prophet commits in its late phase (random weights)


def make_varied_workload(
    base: DecodeParams, n: int, *, seed: int = 0, prompt_vocab: Sequence[int]
) -> list[BenchRequest]:
    """``n`` seeded requests of the ``varied`` preset (see ``VARIED_*``): cache modes and
    Prophet are set per request, so every mode runs the same mix. Cache modes and Prophet are
    dealt out in equal shares and shuffled (not drawn independently), so that even a small
    workload mixes all of them."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if not prompt_vocab:
        raise ValueError("prompt_vocab: random prompts need token ids to draw from")
    rng = random.Random(f"foretell-bench-varied/{seed}")
    caches = [VARIED_KV_CACHES[i % len(VARIED_KV_CACHES)] for i in range(n)]
    prophets = [i % 2 == 1 for i in range(n)]
    rng.shuffle(caches)
    rng.shuffle(prophets)
    out: list[BenchRequest] = []
    for cache, prophet in zip(caches, prophets, strict=True):
        gen = rng.choice(VARIED_GEN_LENGTHS)
        params = base.replace(
            gen_length=gen,
            block_length=VARIED_BLOCK_LENGTH,
            steps=gen,
            constraints=None,
            early_commit=None,
            kv_cache=None,
            seed=rng.randrange(2**31),
        )
        ids = [rng.choice(prompt_vocab) for _ in range(rng.randint(*VARIED_PROMPT_TOKENS))]
        out.append(BenchRequest(ids, params, kv_cache=cache, prophet=prophet))
    return out


def save_workload(requests: Sequence[BenchRequest], path: str | Path) -> None:
    """Write the workload as JSONL (one request a line), readable by ``load_workload``."""
    with open(path, "w") as f:
        for req in requests:
            f.write(json.dumps(req.to_json()) + "\n")


def load_workload(
    path: str | Path, base: DecodeParams, *, chat_template: bool = True
) -> list[BenchRequest]:
    """Read a JSONL workload: ``{"prompt": ..., "params": {...}, "task": ..., "task_prompt":
    ...}`` a line; only ``prompt`` is required.

    ``params`` override the model's defaults (``base``); ``early_commit`` and ``kv_cache`` are
    refused (the mode sets them); a line's own top-level ``kv_cache`` and ``prophet`` (a mixed
    workload, as ``save_workload`` writes it) override the mode's for that request. A text
    prompt is wrapped as a chat message when the model has a chat template, unless the line says
    ``"raw": true`` (as ``foretell generate --file`` does). With a ``task``, accuracy is
    checked against ``task_prompt`` (default: the text prompt).
    """
    out: list[BenchRequest] = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON: {err}") from None
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise ValueError(f"{where}: prompt: missing")
        fields = dict(rec.get("params") or {})
        for name in MODE_FIELDS:
            if name in fields:
                raise ValueError(f"{where}: params.{name}: set by the mode, not the workload")
        if fields.get("constraints") is not None:
            fields["constraints"] = {int(k): v for k, v in fields["constraints"].items()}
        if "stop" in fields:
            fields["stop"] = tuple(fields["stop"])
        try:
            own = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
            params = as_params({**own, **fields, "early_commit": None, "kv_cache": None})
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: params: {err}") from None
        kv_cache = rec.get("kv_cache")
        if kv_cache is not None and kv_cache not in VARIED_KV_CACHES:
            raise ValueError(f"{where}: kv_cache: need one of {', '.join(VARIED_KV_CACHES)}")
        prophet = rec.get("prophet")
        if prophet is not None and not isinstance(prophet, bool):
            raise ValueError(f"{where}: prophet: need true or false, got {prophet!r}")
        prompt = rec["prompt"]
        task = rec.get("task")
        task_prompt = rec.get("task_prompt")
        if task is not None:
            get_task(task)  # unknown names fail here, not after the run
            if task_prompt is None and isinstance(prompt, str):
                task_prompt = prompt
        if isinstance(prompt, str) and chat_template and not rec.get("raw", False):
            prompt = [{"role": "user", "content": prompt}]
        out.append(BenchRequest(prompt, params, task, task_prompt, kv_cache, prophet))
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def describe(requests: Sequence[BenchRequest]) -> dict:
    """What the workload is made of (for the JSON): counts of each drawn choice."""

    def counts(values: list) -> dict:
        return {str(k): v for k, v in sorted(Counter(values).items(), key=lambda kv: str(kv[0]))}

    return {
        "n": len(requests),
        "tasks": counts([r.task for r in requests]),
        "gen_lengths": counts([r.params.gen_length for r in requests]),
        "block_lengths": counts([r.params.block_length for r in requests]),
        "steps": counts([r.params.steps for r in requests]),
        "remasking": counts([r.params.remasking for r in requests]),
        "kv_cache_per_request": counts([r.kv_cache or "mode" for r in requests]),
        "prophet_per_request": counts(
            ["mode" if r.prophet is None else str(r.prophet).lower() for r in requests]
        ),
        "request_hash": request_hash([(r.prompt, r.params) for r in requests]),
    }
