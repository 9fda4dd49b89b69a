"""Per-request decoding parameters and the early-commit policy, validated on construction.

Every request carries its own ``DecodeParams``, so one batch can mix lengths, step budgets,
remasking rules and policies. Errors are ``ValueError``s that name the offending field, raised
before the request can join a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

REMASKING = ("low_confidence", "random", "margin", "entropy", "confidence_threshold", "origin")
# Dream's names for the same confidence rules.
REMASKING_ALIASES = {"maskgit_plus": "low_confidence", "topk_margin": "margin"}
STATISTICS = ("mean", "min")
# The dtype of the low-confidence softmax: None follows the reference of the rule in use.
CONFIDENCE_DTYPES = (None, "model", "float64")
# Fast-dLLM's block KV cache modes (``DecodeParams.kv_cache``), and the reveal rules they run.
KV_CACHE_MODES = ("prefix", "dual")
KV_CACHE_RULES = ("low_confidence", "random", "entropy", "confidence_threshold")
# What torch.Generator.manual_seed takes.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# A Prophet policy as numbers (``Prophet.columns``), one row per request where a whole batch's
# decisions are array arithmetic: its three thresholds, their two bounds, and whether its
# statistic is the mean (1.0) or the minimum (0.0).
PROPHET_COLUMNS = 6
MEAN_COLUMN = 5


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Prophet:
    """Prophet's early-commit rule (arXiv 2508.19982).

    At each step the top-1 minus top-2 logit gap is taken over the answer region; once its
    ``statistic`` reaches the threshold of the current phase, every remaining mask is filled
    with its prediction and decoding stops. Phases are thirds of the step budget by default:
    progress ``p = step / steps`` below ``bounds[0]`` uses ``thresholds[0]``, below
    ``bounds[1]`` ``thresholds[1]``, else ``thresholds[2]``.

    ``answer_start`` (relative to the generation) and ``answer_length`` give an explicit span,
    as the reference does (it puts the span two positions after the last constraint); with
    ``answer_start=None`` the region is every still-masked position of the generation, i.e.
    commit once the model is confident about everything left.
    """

    thresholds: tuple[float, float, float] = (7.5, 5.0, 2.5)
    bounds: tuple[float, float] = (0.33, 0.67)
    answer_start: int | None = None
    answer_length: int = 5
    statistic: str = "mean"

    def __post_init__(self) -> None:
        for name in ("thresholds", "bounds"):
            values = getattr(self, name)
            iterable = hasattr(values, "__iter__") and not isinstance(values, (str, bytes))
            if not iterable or not all(_is_real(v) for v in values):
                raise ValueError(f"early_commit.{name}: need numbers, got {values!r}")
        thresholds = tuple(float(t) for t in self.thresholds)
        bounds = tuple(float(b) for b in self.bounds)
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "bounds", bounds)
        if len(thresholds) != 3 or not all(math.isfinite(t) for t in thresholds):
            raise ValueError(f"early_commit.thresholds: need 3 finite numbers, got {thresholds}")
        if not thresholds[0] >= thresholds[1] >= thresholds[2]:
            raise ValueError(
                f"early_commit.thresholds: must not rise as decoding progresses, got {thresholds}"
            )
        if len(bounds) != 2 or not 0.0 < bounds[0] <= bounds[1] <= 1.0:
            raise ValueError(f"early_commit.bounds: need 0 < b1 <= b2 <= 1, got {bounds}")
        if self.answer_start is not None and (
            not isinstance(self.answer_start, int)
            or isinstance(self.answer_start, bool)
            or self.answer_start < 0
        ):
            raise ValueError(
                f"early_commit.answer_start: must be a position >= 0 or None, "
                f"got {self.answer_start!r}"
            )
        if (
            not isinstance(self.answer_length, int)
            or isinstance(self.answer_length, bool)
            or self.answer_length < 1
        ):
            raise ValueError(f"early_commit.answer_length: must be >= 1, got {self.answer_length}")
        if self.statistic not in STATISTICS:
            raise ValueError(
                f"early_commit.statistic: unknown {self.statistic!r}; choose one of {STATISTICS}"
            )

    def answer_span(self, prompt_len: int, canvas_len: int) -> tuple[int, int] | None:
        """The explicit answer span's canvas positions ``[start, end)``, clipped to the canvas
        (possibly empty), or None when the region is every still-masked generated position."""
        if self.answer_start is None:
            return None
        start = prompt_len + self.answer_start
        return start, min(start + self.answer_length, canvas_len)

    def threshold(self, step: int, steps: int) -> float:
        """The gap needed at global step ``step`` (counted from 1) of a budget of ``steps``."""
        progress = step / steps
        if progress < self.bounds[0]:
            return self.thresholds[0]
        if progress < self.bounds[1]:
            return self.thresholds[1]
        return self.thresholds[2]

    def columns(self) -> tuple[float, ...]:
        """The policy as one row of ``PROPHET_COLUMNS`` numbers."""
        return (*self.thresholds, *self.bounds, float(self.statistic == "mean"))

    @staticmethod
    def thresholds_at(columns: np.ndarray, step: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """:meth:`threshold` of a batch of policies (rows of :meth:`columns`) at their steps
        ``step`` (from 1) of their budgets ``steps``: the same float64 comparisons."""
        progress = step / steps
        return np.where(
            progress < columns[:, 3],
            columns[:, 0],
            np.where(progress < columns[:, 4], columns[:, 1], columns[:, 2]),
        )


EarlyCommit = Prophet | str | dict | None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_policy(value: EarlyCommit) -> Prophet | None:
    if value is None or isinstance(value, Prophet):
        return value
    if isinstance(value, str):
        if value.lower() == "prophet":
            return Prophet()
        if value.lower() in ("none", "off", ""):
            return None
        raise ValueError(f"early_commit: unknown policy {value!r}; use 'prophet' or None")
    if isinstance(value, dict):
        known = {"thresholds", "bounds", "answer_start", "answer_length", "statistic"}
        unknown = set(value) - known - {"policy"}
        if unknown:
            raise ValueError(f"early_commit: unknown fields {sorted(unknown)}")
        if value.get("policy", "prophet") != "prophet":
            raise ValueError(f"early_commit.policy: unknown policy {value['policy']!r}")
        return Prophet(**{k: v for k, v in value.items() if k in known})
    raise ValueError(f"early_commit: expected 'prophet', a Prophet or None, got {value!r}")


@dataclass(frozen=True)
class DecodeParams:
    """How to denoise one request's canvas.

    ``steps`` defaults to ``gen_length`` (one token per step), ``block_length`` to
    ``gen_length`` (no semi-autoregressive blocks). The reveal schedule follows the model's
    family: LLaDA's per-block schedule, or Dream's ``eps`` schedule over the whole generation.
    **Block-causal models (SDAR, LLaDA2) read two fields differently**, as their official
    decoders do: ``block_length`` defaults to the model's block size, and ``steps`` is the
    number of denoising steps *per block* (default: one token a step); ``remasking`` is
    ``"low_confidence"`` (the static schedule) or ``"confidence_threshold"`` (the dynamic one,
    with ``threshold``), and Prophet's test runs block by block (docs/guide.md).
    ``remasking`` accepts Dream's names too (``maskgit_plus``, ``topk_margin``); ``origin`` is
    Dream's random-transfer rule. ``constraints`` maps generation positions to a token id or a
    text whose words are tokenized with a leading space and placed from that position on (the
    Prophet evaluation's "The answer is" trick).

    ``confidence_dtype`` is the dtype of the softmax that scores candidates: None follows the
    reference of the rule (the model's dtype for LLaDA's rules and Prophet, as LLaDA's current
    ``generate.py``; float64 where Fast-dLLM's rules are matched); ``"model"`` or
    ``"float64"`` force one. ``logits_eos_inf`` and ``confidence_eos_eot_inf`` are LLaDA's
    ``generate.py`` options of the same names (keep EOS from being predicted; zero the
    confidence of EOS/EOT predictions).
    ``kv_cache`` is Fast-dLLM's block cache: ``"prefix"`` (later steps of a block recompute
    only the canvas from the block on, reading the cached keys/values before it) or ``"dual"``
    (only the block, reading the cached rest of the canvas); each block's first step is a full
    forward that refreshes the cache. None (the default) recomputes the whole canvas every step.
    With a cache, Dream models decode in blocks too (Fast-dLLM's Dream block decoding).
    ``seed`` (as vLLM's): an integer gives the request its own random stream, the one the
    official code draws when seeded the same way, so its output is the same whatever shares
    its batch; None (the default) draws from the engine's shared stream, in one draw a step for
    every such request, so its output depends on the batch (docs/guide.md).
    ``stop_token_ids`` (as vLLM's) end a block-causal generation after the block that holds
    one, and cut every family's returned ids after the first; a block-causal model's EOS ids
    stop it too unless ``ignore_eos``. ``eos_early_stop`` and ``minimal_topk`` are LLaDA2's
    ``generate`` options (stop as soon as everything before a revealed EOS is decoded; cap
    ``steps`` at ``gen_length // minimal_topk``). ``block_cache=False`` makes a block-causal
    model re-encode its window (the prompt through the current block) every step, as LLaDA2's
    official ``generate`` does: slower, and bitwise its numbers in bfloat16, where the cache's
    rounding differs.
    """

    gen_length: int = 64
    steps: int | None = None
    block_length: int | None = None
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float = 0.9
    cfg_scale: float = 0.0
    constraints: dict[int, int | str] | None = None
    early_commit: EarlyCommit = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    skip_special_tokens: bool = True
    # Dream's knobs.
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    # Fidelity knobs (LLaDA's generate.py options; the confidence softmax's dtype).
    confidence_dtype: str | None = None
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    kv_cache: str | None = None
    # Stopping (as vLLM's SamplingParams): token ids that end the generation, the model's EOS
    # ids too unless ``ignore_eos``; LLaDA2's ``eos_early_stop`` and ``minimal_topk``.
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    eos_early_stop: bool = False
    minimal_topk: int = 1
    # Block-causal models: keep finished blocks' keys (the exact block cache) or re-encode the
    # window every step, as LLaDA2's official generate does.
    block_cache: bool = True

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name}: {why}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.gen_length) or self.gen_length < 1:
            fail("gen_length", f"must be a positive integer, got {self.gen_length!r}")
        # Which of steps / block_length the caller left to the defaults: a block-causal model
        # fills them from its own block size (``for_block_model``), not from gen_length.
        unset = frozenset(n for n in ("steps", "block_length") if getattr(self, n) is None)
        object.__setattr__(self, "_unset", unset)
        steps = self.gen_length if self.steps is None else self.steps
        block = self.gen_length if self.block_length is None else self.block_length
        if not is_int(block) or block < 1:
            fail("block_length", f"must be a positive integer, got {block!r}")
        if not is_int(steps) or steps < 1:
            fail("steps", f"must be a positive integer, got {steps!r}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "block_length", block)

        def finite(name: str, v: object) -> None:
            # bool is an int, but True as a temperature is a caller's mistake.
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok:
                fail(name, f"must be a finite number, got {v!r}")

        finite("temperature", self.temperature)
        if not self.temperature >= 0:
            fail("temperature", f"must be >= 0, got {self.temperature!r}")
        remasking = REMASKING_ALIASES.get(self.remasking, self.remasking)
        if remasking not in REMASKING:
            fail("remasking", f"unknown rule {self.remasking!r}; choose one of {REMASKING}")
        object.__setattr__(self, "remasking", remasking)
        finite("threshold", self.threshold)
        if not 0.0 < self.threshold <= 1.0:
            fail("threshold", f"must be in (0, 1], got {self.threshold!r}")
        finite("cfg_scale", self.cfg_scale)
        if not self.cfg_scale >= 0:
            fail("cfg_scale", f"must be >= 0, got {self.cfg_scale!r}")
        if self.constraints is not None:
            for pos, value in self.constraints.items():
                if not is_int(pos) or not 0 <= pos < self.gen_length:
                    fail(
                        "constraints",
                        f"position {pos!r} is outside the generation [0, {self.gen_length})",
                    )
                if not ((is_int(value) and value >= 0) or (isinstance(value, str) and value)):
                    fail("constraints", f"position {pos}: need a token id or text, got {value!r}")
        object.__setattr__(self, "early_commit", _as_policy(self.early_commit))
        policy = self.early_commit
        start = None if policy is None else policy.answer_start
        if start is not None and start >= self.gen_length:
            fail("early_commit.answer_start", f"{start} is outside the generation")
        if self.seed is not None and (
            not is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            fail(
                "seed",
                f"must be None or an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}",
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            fail("stop", f"must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.alg_temp is not None:
            finite("alg_temp", self.alg_temp)
            if not self.alg_temp >= 0:
                fail("alg_temp", f"must be >= 0, got {self.alg_temp!r}")
        if self.top_p is not None:
            finite("top_p", self.top_p)
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            fail("top_k", f"must be a positive integer, got {self.top_k!r}")
        finite("eps", self.eps)
        if not 0.0 < self.eps < 1.0:
            fail("eps", f"must be in (0, 1), got {self.eps!r}")
        if self.confidence_dtype not in CONFIDENCE_DTYPES:
            fail(
                "confidence_dtype",
                f"unknown {self.confidence_dtype!r}; choose one of {CONFIDENCE_DTYPES}",
            )
        for name in (
            "logits_eos_inf",
            "confidence_eos_eot_inf",
            "ignore_eos",
            "eos_early_stop",
            "block_cache",
        ):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be true or false, got {getattr(self, name)!r}")
        ids = self.stop_token_ids
        ids = (ids,) if is_int(ids) else ids
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            fail("stop_token_ids", f"must be a list of token ids, got {ids!r}")
        ids = tuple(ids)
        if not all(is_int(t) and t >= 0 for t in ids):
            fail("stop_token_ids", f"must be token ids (integers >= 0), got {list(ids)!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not is_int(self.minimal_topk) or self.minimal_topk < 1:
            fail("minimal_topk", f"must be a positive integer, got {self.minimal_topk!r}")
        self._check_kv_cache(fail)

    def check_canvas_blocks(self) -> None:
        """LLaDA's and Dream's layout: blocks tile the generation and the step budget splits
        evenly among them (LLaDA's ``generate.py`` asserts both). Block-causal models count
        steps per block instead (:meth:`for_block_model`); the engine checks whichever applies
        when it builds the request, since only the model says which."""
        if self.gen_length % self.block_length:
            raise ValueError(
                f"block_length: gen_length {self.gen_length} is not a multiple of "
                f"{self.block_length}"
            )
        if self.steps > self.gen_length:
            raise ValueError(f"steps: {self.steps} is more than gen_length {self.gen_length}")
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps: {self.steps} is not a multiple of the number of blocks {self.num_blocks}"
            )

    def for_block_model(self, block_size: int) -> DecodeParams:
        """These params as a block-causal model (SDAR, LLaDA2) reads them: ``block_length``
        defaults to the model's ``block_size`` and ``steps`` counts denoising steps *per
        block* (their official meaning), defaulting to one token a step; checked here."""
        block = block_size if "block_length" in self.unset_fields else self.block_length
        steps = block if "steps" in self.unset_fields else self.steps
        if steps > block:
            raise ValueError(
                f"steps: {steps} denoising steps per block is more than block_length {block} "
                "(block-causal models count steps per block)"
            )
        return replace(self, block_length=block, steps=steps)

    def _check_kv_cache(self, fail) -> None:
        """The combinations Fast-dLLM's cached decoders define; anything else is refused."""
        mode = self.kv_cache
        if mode is None:
            return
        if mode not in KV_CACHE_MODES:
            fail("kv_cache", f"unknown mode {mode!r}; choose one of {KV_CACHE_MODES} or None")
        if self.cfg_scale > 0:
            fail("kv_cache", "classifier-free guidance (cfg_scale > 0) is not supported")
        if self.remasking not in KV_CACHE_RULES:
            fail(
                "kv_cache",
                f"remasking {self.remasking!r} is not supported with a cache; "
                f"choose one of {KV_CACHE_RULES}",
            )
        tiled = self.gen_length % self.block_length == 0  # else check_canvas_blocks refuses
        if tiled and self.remasking != "confidence_threshold" and self.steps_per_block < 2:
            # Fast-dLLM's cached loop always runs a step after the block's first (refresh) one.
            fail(
                "kv_cache",
                f"needs at least 2 steps per block (steps {self.steps} over "
                f"{self.num_blocks} blocks gives {self.steps_per_block})",
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def replace(self, **changes: object) -> DecodeParams:
        """A copy with some fields changed (validated again); fields left to their defaults
        stay so unless changed."""
        return replace(self, **self._keep_unset(changes))

    def _keep_unset(self, changes: dict) -> dict:
        return {**dict.fromkeys(self.unset_fields - set(changes)), **changes}

    @property
    def unset_fields(self) -> frozenset[str]:
        """Which of ``steps`` / ``block_length`` were left to their defaults (not a field:
        a plain attribute, so that ``asdict`` and equality ignore it)."""
        return getattr(self, "_unset", frozenset())

    def override(self, **changes: object) -> DecodeParams:
        """Like ``replace``, but a new ``gen_length`` brings ``steps`` (capped) and
        ``block_length`` (one block) along unless they are given, and drops constraints that
        fall outside it: how command-line flags and job-level settings apply over a model's
        defaults. ``steps`` / ``block_length`` still at their defaults stay so, and follow the
        new length (``DecodeParams(gen_length=64).override(gen_length=128)`` has 128 steps,
        as ``DecodeParams(gen_length=128)`` has)."""
        if changes.get("gen_length") is not None:
            length = changes["gen_length"]
            # Left to the defaults, they follow the new length (or the model's block size).
            if "steps" not in self.unset_fields:
                changes.setdefault("steps", min(self.steps, length) if _is_int(length) else None)
            if "block_length" not in self.unset_fields:
                changes.setdefault("block_length", length)
            if (
                "constraints" not in changes
                and self.constraints
                and _is_int(length)
                and max(self.constraints) >= length
            ):
                changes["constraints"] = None
        return replace(self, **self._keep_unset(changes))


def as_params(fields: dict) -> DecodeParams:
    """DecodeParams from a plain mapping (JSON bodies, JSONL files); unknown keys are errors."""
    known = DecodeParams.__dataclass_fields__
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown decoding parameter (known: {sorted(known)})")
    return DecodeParams(**fields)


def row_params(base: DecodeParams, changes: object) -> DecodeParams:
    """One input row's params: ``changes`` (a mapping, a JSON object as text, or None) set
    over ``base`` field by field, as ``foretell generate --file`` reads a line's ``params``.

    In a mapping, a None value means "not given": Arrow struct columns (Parquet, Ray Data) fill
    the keys a row lacks with nulls. JSON text is taken as written. Unknown keys are errors.
    """
    return _checked(base.replace, _param_fields(changes))


def job_params(base: DecodeParams, changes: object) -> DecodeParams:
    """A job's settings over a model's defaults: as :func:`row_params`, but through
    ``DecodeParams.override``, as command-line flags are (a new ``gen_length`` brings
    ``steps`` and ``block_length`` along)."""
    return _checked(base.override, _param_fields(changes))


def _checked(build, fields: dict) -> DecodeParams:
    try:
        return build(**fields)
    except TypeError as err:  # a value of the wrong type that a comparison tripped on
        raise ValueError(f"params: {err}") from None


def _param_fields(changes: object) -> dict:
    if changes is None:
        return {}
    if isinstance(changes, (str, bytes)):
        import json

        try:
            fields = json.loads(changes) if changes.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"params: not valid JSON: {err}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"params: expected a JSON object, got {type(fields).__name__}")
    elif hasattr(changes, "items"):
        fields = {k: v for k, v in dict(changes).items() if v is not None}
        if isinstance(fields.get("early_commit"), dict):
            policy = fields["early_commit"]
            fields["early_commit"] = {k: v for k, v in policy.items() if v is not None}
    else:
        raise ValueError(
            f"params: expected a mapping or a JSON object, got {type(changes).__name__}"
        )
    unknown = sorted(str(k) for k in set(fields) - set(DecodeParams.__dataclass_fields__))
    if unknown:
        raise ValueError(f"params.{unknown[0]}: unknown decoding parameter")
    constraints = fields.get("constraints")
    if isinstance(constraints, dict):  # JSON and Arrow keys are text
        fields["constraints"] = {
            int(k) if isinstance(k, str) and k.isdigit() else k: v
            for k, v in constraints.items()
            if v is not None
        }
    return fields
