"""lm-evaluation-harness model ``foretell``: the harness's requests through foretell's engine.

- ``generate_until``: the whole request list goes to the engine at once (continuous batching,
  eviction on commit, backfill); outputs come back in request order.
- ``loglikelihood``: the Monte-Carlo estimate of LLaDA's ``eval_llada.py`` (Dream models: Dream's
  ``nll_type=mc``), see :mod:`foretell.likelihood`, with LLaDA's greedy check.
- ``loglikelihood_rolling``: not available (neither reference has it).

Importing this module registers the model (the installed harness, 0.4.13, does not discover
models through package entry points). Command line: ``python -m foretell.integrations.lm_eval
--model foretell --model_args ... --tasks ...`` registers it, then runs the harness's CLI.
docs/evaluation.md lists the ``model_args``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import fields

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from foretell.engine import Engine
from foretell.likelihood import LikelihoodParams, greedy_matches, loglikelihoods
from foretell.params import DecodeParams, Prophet

log = logging.getLogger(__name__)

# A lazy target, so that running this file as __main__ and importing it register the same thing.
model_registry.register("foretell", target="foretell.integrations.lm_eval:ForetellLM")

DECODE_FIELDS = {f.name for f in fields(DecodeParams)}
# The harness's default for requests that do not set max_gen_toks (lm_eval's LM default).
DEFAULT_MAX_GEN_TOKS = 256


def parse_constraints(value: object) -> dict[int, int | str]:
    """``"200:The|201:answer|202:is"`` (Prophet's evaluation format) or a mapping."""
    if isinstance(value, dict):
        return {int(k): v for k, v in value.items()}
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"constraints: expected 'POS:TEXT|POS:TEXT...', got {value!r}")
    out: dict[int, int | str] = {}
    for part in value.split("|"):
        pos, sep, text = part.partition(":")
        if not sep or not pos.strip().isdigit() or not text.strip():
            raise ValueError(f"constraints: {part!r} is not POS:TEXT (in {value!r})")
        out[int(pos)] = text.strip()
    return out


def parse_numbers(name: str, value: object, count: int) -> tuple[float, ...]:
    """``"7.5|5|2.5"`` (commas separate model_args, so ``|`` or ``/`` separate the numbers)."""
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = str(value).replace("/", "|").split("|")
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"{name}: expected {count} numbers like '7.5|5|2.5', got {value!r}"
        ) from None
    if len(numbers) != count:
        raise ValueError(f"{name}: expected {count} numbers, got {value!r}")
    return numbers


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"{name}: expected true or false, got {value!r}")


class ForetellLM(LM):
    """foretell as an lm-evaluation-harness model (``--model foretell``).

    ``gen_length`` given: every request uses it (as LLaDA's and Prophet's evaluations do).
    Otherwise each request's ``max_gen_toks`` is its generation length, rounded up to a multiple
    of ``block_length``. ``steps`` defaults to the generation length (one token per step).
    ``batch_size`` is the Monte-Carlo mini-batch of the likelihood estimate, as in the references
    (generation batches by ``max_num_seqs`` / ``max_num_batched_tokens`` instead).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 16384,
        attention_backend: str = "auto",
        forward_chunk_tokens: int | str | None = "auto",
        threads: int | None = None,
        # decoding defaults
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        constraints: str | dict | None = None,
        early_commit: str | bool | None = None,
        thresholds: str | None = None,
        bounds: str | None = None,
        answer_start: int | None = None,
        answer_length: int | None = None,
        statistic: str | None = None,
        seed: int = 0,
        cfg: float | None = None,
        # log-likelihood
        mc_num: int = 128,
        batch_size: int | str | None = 32,
        is_check_greedy: bool = True,
        mc_scheme: str | None = None,
        sampling_eps: float = 1e-3,
        add_bos_token: bool = False,
        max_batch_size: int | None = None,  # passed by the harness; unused
        **decode_fields: object,
    ) -> None:
        super().__init__()
        unknown = sorted(set(decode_fields) - DECODE_FIELDS)
        if unknown:
            raise ValueError(
                f"{unknown[0]}: unknown model_args for foretell (see docs/evaluation.md)"
            )
        if cfg is not None:
            decode_fields.setdefault("cfg_scale", cfg)
        if isinstance(batch_size, str):
            if not batch_size.isdigit():
                raise ValueError(
                    f"batch_size: the Monte-Carlo mini-batch must be an integer, got {batch_size!r}"
                )
            batch_size = int(batch_size)
        self.likelihood_params = LikelihoodParams(
            mc_num=mc_num,
            batch_size=32 if batch_size is None else batch_size,
            cfg_scale=float(decode_fields.get("cfg_scale", 0.0)),
            seed=seed,
            scheme=mc_scheme,
            sampling_eps=sampling_eps,
        )
        self.is_check_greedy = _flag("is_check_greedy", is_check_greedy)
        self.add_bos_token = _flag("add_bos_token", add_bos_token)
        if early_commit in (None, False) or str(early_commit).lower() in ("none", "off", "false"):
            wants_prophet = False
        elif early_commit is True or str(early_commit).lower() in ("prophet", "true"):
            wants_prophet = True
        else:
            raise ValueError(f"early_commit: unknown policy {early_commit!r}; use 'prophet'")
        prophet_changes: dict[str, object] = {}
        if thresholds is not None:
            prophet_changes["thresholds"] = parse_numbers("thresholds", thresholds, 3)
        if bounds is not None:
            prophet_changes["bounds"] = parse_numbers("bounds", bounds, 2)
        for name, value in (
            ("answer_start", answer_start),
            ("answer_length", answer_length),
            ("statistic", statistic),
        ):
            if value is not None:
                prophet_changes[name] = value
        if prophet_changes and not wants_prophet:
            raise ValueError(
                f"{sorted(prophet_changes)[0]}: a Prophet setting without early_commit=prophet"
            )
        parsed_constraints = None if constraints is None else parse_constraints(constraints)
        if threads:
            torch.set_num_threads(int(threads))
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # The harness's CLI passes --device cuda unless told otherwise (as HFLM, fall back).
            log.warning("foretell: CUDA is not available; running on the CPU")
            device = "cpu"

        self.engine = Engine(
            pretrained,
            max_num_seqs=int(max_num_seqs),
            max_num_batched_tokens=int(max_num_batched_tokens),
            dtype=dtype,
            device=device,
            attention_backend=attention_backend,
            forward_chunk_tokens=forward_chunk_tokens,
        )
        # The estimator follows the model's family unless mc_scheme names one.
        self.likelihood_params = self.likelihood_params.for_model(self.engine.model)
        self._device = torch.device(device)
        self.tokenizer = self.engine.tokenizer
        self.pretrained = pretrained
        base = self.engine.default_params
        self.gen_length = gen_length
        # The shipped model's own block layout is the default block length; other models
        # decode the generation as one block unless told.
        self.block_length = block_length or (base.block_length if pretrained is None else None)
        self.steps = steps
        # Applied on top of the model's defaults for every request (validated per request,
        # once its generation length is known).
        self.decode_changes: dict[str, object] = {"seed": seed, **decode_fields}
        if parsed_constraints is not None:
            self.decode_changes["constraints"] = parsed_constraints
        self.policy: Prophet | None = None
        if wants_prophet:
            policy = self.engine.default_prophet
            if "answer_start" not in prophet_changes and parsed_constraints:
                # The reference's placement: two positions after the last constraint token.
                prophet_changes["answer_start"] = self._last_constraint_position() + 2
            self.policy = Prophet(**{**policy.__dict__, **prophet_changes})
        self.stats = {
            "generate_requests": 0,
            "forward_passes": 0,
            "step_budget": 0,
            "committed_early": 0,
            "generate_seconds": 0.0,
            "loglikelihood_requests": 0,
            "loglikelihood_seconds": 0.0,
        }
        # Validate the decoding defaults now, not at the first request.
        self.request_params({"max_gen_toks": gen_length or DEFAULT_MAX_GEN_TOKS})

    # -- what the harness asks of a model ---------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "foretell")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return ""
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict:
        """Reported by the harness in results["config"]: the run's diffusion statistics."""
        return {"foretell": self.summary()}

    def summary(self) -> dict:
        s = dict(self.stats)
        n = s["generate_requests"]
        s["mean_forward_passes"] = s["forward_passes"] / n if n else None
        s["mean_step_budget"] = s["step_budget"] / n if n else None
        s["share_committed_early"] = s["committed_early"] / n if n else None
        return s

    # -- generation ---------------------------------------------------------------------------
    def _last_constraint_position(self) -> int:
        # Text constraints are placed word by word, each tokenized with a leading space, as the
        # engine does (RequestBuilder.constraint_ids).
        last = 0
        for pos, value in self.decode_changes["constraints"].items():  # type: ignore[union-attr]
            end = pos
            if isinstance(value, str):
                end = pos - 1
                for word in value.split():
                    end += len(self.tokenizer.encode(" " + word, add_special_tokens=False))
            last = max(last, end)
        return last

    def request_params(self, gen_kwargs: dict) -> DecodeParams:
        """The DecodeParams of one generate_until request (its ``until`` and ``max_gen_toks``).

        ``do_sample`` true takes the request's ``temperature``/``top_p``/``top_k``; otherwise
        decoding is greedy unless ``temperature`` was given in model_args. Other keys that name
        a DecodeParams field override it for the request; the rest are ignored.
        """
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        max_gen = int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        do_sample = kw.pop("do_sample", None)
        sampling = {k: kw.pop(k) for k in ("temperature", "top_p", "top_k") if k in kw}
        changes: dict[str, object] = {}
        if do_sample:
            changes.update(sampling)
            changes.setdefault("temperature", 1.0)
        elif do_sample is not None and not do_sample:
            changes["temperature"] = 0.0
        for key, value in kw.items():
            if key in DECODE_FIELDS:
                changes[key] = value
            else:
                log.debug("foretell: ignoring generation kwarg %s=%r", key, value)
        block = changes.get("block_length", self.block_length)
        if getattr(self.engine.model, "block_causal", False):
            # SDAR / LLaDA2: the model's block and per-block steps unless given; any length
            # (the generation ends at a stop id or is cut to it).
            changes["gen_length"] = int(self.gen_length or max_gen)
            for name, value in (("block_length", block), ("steps", self.steps)):
                if value is not None:
                    changes.setdefault(name, value)
            return self._finish_params(changes, until, changes["gen_length"])
        if self.gen_length is not None:
            length = int(self.gen_length)
        elif block:
            length = math.ceil(max_gen / int(block)) * int(block)
        else:
            length = max_gen
        changes["gen_length"] = length
        changes["block_length"] = block or length
        changes.setdefault("steps", self.steps or length)
        return self._finish_params(changes, until, length)

    def _finish_params(self, changes: dict, until: object, length: int) -> DecodeParams:
        if until is not None:
            changes["stop"] = tuple(s for s in ([until] if isinstance(until, str) else until) if s)
        # As LLaDA's and Prophet's evaluations: cut at the stop strings in the text with its
        # special tokens, then drop them (``_clean``).
        changes["skip_special_tokens"] = False
        base = self.engine.default_params
        merged = {**self.decode_changes, **changes}
        if "constraints" not in merged and base.constraints and max(base.constraints) >= length:
            merged["constraints"] = None  # the model's own layout does not fit this length
        if self.policy is not None:
            merged["early_commit"] = self.policy
        return self.engine.resolve_params(base.replace(**merged))

    def _encode(self, text: str) -> list[int]:
        # A chat-templated context already starts with BOS: do not add another.
        bos = getattr(self.tokenizer, "bos_token", None)
        special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        start = time.perf_counter()
        prompts, params = [], []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            try:
                params.append(self.request_params(gen_kwargs))
                prompts.append(self._encode(context))
            except ValueError as err:
                raise ValueError(f"requests[{i}]: {err}") from None
        outputs = self.engine.generate(prompts, params, use_tqdm=not disable_tqdm)
        failed = [(i, o.error) for i, o in enumerate(outputs) if o.finish_reason == "error"]
        if failed:
            i, error = failed[0]
            raise RuntimeError(f"foretell: request {i} failed ({len(failed)} in all): {error}")
        s = self.stats
        s["generate_requests"] += len(outputs)
        s["forward_passes"] += sum(o.num_forward_passes for o in outputs)
        s["step_budget"] += sum(p.steps for p in params)
        s["committed_early"] += sum(o.committed_early for o in outputs)
        s["generate_seconds"] += time.perf_counter() - start
        summary = self.summary()
        print(
            f"foretell: {len(outputs)} requests, {summary['mean_forward_passes']:.1f} forward "
            f"passes per request (budget {summary['mean_step_budget']:.1f}), "
            f"{100 * summary['share_committed_early']:.1f}% committed early",
            file=sys.stderr,
        )
        return [self._clean(o.text) for o in outputs]

    def _clean(self, text: str) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- likelihood ---------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return self.likelihood_params.scheme  # type: ignore[return-value]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as the family's reference evaluation makes them:
        trailing spaces of the context move to the continuation, and the continuation is the
        tail of the whole text's encoding (Dream: with EOS appended, optional BOS)."""
        tok = self.tokenizer
        if self.scheme == "dream" and self.add_bos_token:
            context = tok.bos_token + context
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        if self.scheme == "dream":
            whole = [*tok.encode(context + continuation), tok.eos_token_id]
            prefix = list(tok.encode(context))
        else:
            whole = list(tok(context + continuation)["input_ids"])
            prefix = list(tok(context)["input_ids"])
        return prefix, whole[len(prefix) :]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if getattr(self.engine.model, "block_causal", False):
            raise NotImplementedError(
                f"foretell: loglikelihood is not defined for {self.engine.model.family} "
                "(block-causal) models: their official evaluations generate only "
                "(generate_until tasks work)"
            )
        if not requests:
            return []
        start = time.perf_counter()
        pairs = [self.encode_pair(*req.args) for req in requests]
        runner = self.engine.runner
        budget = self.engine.scheduler.max_num_batched_tokens
        if runner.forward_chunk_tokens:
            budget = min(budget, runner.forward_chunk_tokens)
        values = loglikelihoods(self.engine.model, pairs, self.likelihood_params, max_tokens=budget)
        greedy = [False] * len(pairs)
        if self.is_check_greedy and self.scheme == "llada":
            greedy = greedy_matches(self.engine, pairs, self.likelihood_params.cfg_scale)
        self.stats["loglikelihood_requests"] += len(pairs)
        self.stats["loglikelihood_seconds"] += time.perf_counter() - start
        return list(zip(values, greedy, strict=True))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "foretell: loglikelihood_rolling (perplexity tasks such as wikitext) is not "
            "supported: a diffusion LM gives no left-to-right likelihood, and neither LLaDA's "
            "nor Dream's evaluation implements it"
        )


def main(argv: list[str] | None = None) -> None:
    """Run the harness's CLI with ``foretell`` registered (``python -m ...lm_eval --model
    foretell ...``)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
