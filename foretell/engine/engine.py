"""Engine: continuous batching of diffusion requests with early-commit eviction.

One ``step()`` = the scheduler picks the batch (admitting waiting requests into free slots),
the runner does one packed forward pass, each request applies its own decoding rule, and every
request that finished (steps spent, or Prophet committed) is evicted at once so the next step
backfills its slot.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from foretell.decoding import advance
from foretell.decoding.unmask import confidence_dtype
from foretell.engine import kv_cache
from foretell.engine.metrics import EngineMetrics
from foretell.engine.outputs import RequestOutput
from foretell.engine.runner import ModelRunner, resolve_forward_chunk_tokens
from foretell.models.registry import LoadedModel, load_model, resolve_dtype
from foretell.models.transformer import DiffusionLM
from foretell.params import DecodeParams, Prophet, as_params
from foretell.scheduler import Request, Scheduler

Prompt = str | list[int] | list[dict]
# A text longer than this many characters per token of room is refused before tokenizing it:
# a generous bound (subword vocabularies average a few characters per token), so that a huge
# text costs no tokenizer time.
MAX_CHARS_PER_TOKEN = 32

logger = logging.getLogger(__name__)


def _check_unicode(name: str, text: str) -> None:
    """Refuse what no tokenizer can encode: a lone surrogate (JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name}: not valid Unicode at character {err.start}") from None


def _resolve_model(model, tokenizer, dtype, device, attention_backend) -> LoadedModel:
    if model is None:
        from foretell.models.default import DEFAULT_MODEL_DIR

        model = DEFAULT_MODEL_DIR
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, dtype=dtype, device=device, attention_backend=attention_backend)
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, DiffusionLM):
        loaded = LoadedModel(model=model, tokenizer=tokenizer, path=None)
    else:
        raise ValueError(f"model: expected a path, a LoadedModel or a DiffusionLM, got {model!r}")
    if tokenizer is not None:
        loaded.tokenizer = tokenizer
    loaded.model = loaded.model.to(device=device, dtype=resolve_dtype(dtype)).eval()
    loaded.model.set_attention_backend(attention_backend)
    return loaded


def _check_kv_cache(family: str, params: DecodeParams) -> None:
    """What Fast-dLLM's cached decoders define for each family (the rest is refused)."""
    if family == "dream":
        # Fast-dLLM's Dream block loop ranks by negative entropy unless it runs the threshold.
        if params.remasking not in ("entropy", "confidence_threshold"):
            raise ValueError(
                "kv_cache: Dream's cached decoding ranks by entropy: use remasking 'entropy' "
                f"or 'confidence_threshold', got {params.remasking!r}"
            )
        if params.early_commit is not None:
            raise ValueError("kv_cache: early commit with a cache is LLaDA only for now")
        if params.alg_temp:
            raise ValueError("kv_cache: alg_temp is not supported with a cache")
    elif params.remasking == "entropy":
        raise ValueError(
            "kv_cache: LLaDA's cached decoding (Fast-dLLM) ranks by 'low_confidence', 'random' "
            "or 'confidence_threshold', not 'entropy'"
        )


class Engine:
    """Offline and embedded generation over one model.

    ``model`` is a checkpoint directory (or hub id), a ``LoadedModel``, a ``DiffusionLM`` (with
    ``tokenizer``), or None for the small model shipped with foretell.
    ``forward_chunk_tokens`` runs each step's packed batch through the model in chunks of whole
    sequences of at most that many tokens (``"auto"``: 640 on a CPU, where it keeps activations
    in cache, none on a GPU; None: never). Sequences never attend across chunks, so results are
    the same up to floating-point rounding, as with any other batch composition.
    ``kv_cache_memory`` is the byte budget of all requests' KV caches (``DecodeParams.kv_cache``):
    ``"auto"`` sizes it from the device's free memory (half of MemAvailable on a CPU, 80% of the
    free memory on CUDA, measured once the weights are loaded), an int is bytes, None is no
    limit. Admission reserves each cached request's whole cache; a request that would not fit
    waits, and one that could never fit is refused by ``add_request``.
    ``max_model_len`` caps a request's canvas (prompt + ``gen_length``) below the model's own
    maximum length, and ``max_gen_length`` its ``gen_length`` (and so its ``steps``); None: no
    cap but the model's and ``max_num_batched_tokens``. Every limit is checked before a request
    allocates anything.
    """

    def __init__(
        self,
        model: str | os.PathLike | LoadedModel | DiffusionLM | None = None,
        *,
        tokenizer: object | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 16384,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        attention_backend: str = "auto",
        forward_chunk_tokens: int | str | None = "auto",
        kv_cache_memory: int | str | None = "auto",
        max_gen_length: int | None = None,
        max_model_len: int | None = None,
    ) -> None:
        for name, value in (("max_gen_length", max_gen_length), ("max_model_len", max_model_len)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 2
            ):
                raise ValueError(f"{name}: must be an integer >= 2, got {value!r}")
        # Resolved (and validated) before the model loads, so a bad value fails at once.
        chunk_tokens = resolve_forward_chunk_tokens(forward_chunk_tokens, torch.device(device))
        # "auto" reads the free memory, so only once the weights are loaded.
        auto_budget = kv_cache_memory == "auto"
        if not auto_budget:
            kv_budget = kv_cache.resolve_kv_cache_memory(kv_cache_memory, torch.device(device))
        loaded = _resolve_model(model, tokenizer, dtype, device, attention_backend)
        if auto_budget:
            kv_budget = kv_cache.resolve_kv_cache_memory("auto", torch.device(device))
        # What ``generate`` uses when given no params: the shipped model's own layout, else
        # DecodeParams' defaults.
        self.default_params = DecodeParams()
        self.default_prophet = Prophet()  # what "early_commit: prophet" means for this model
        if model is None:
            from foretell.models.default.params import default_decode_params, default_prophet

            self.default_params = default_decode_params(loaded.tokenizer)
            self.default_prophet = default_prophet()
        self.model: DiffusionLM = loaded.model
        self.tokenizer = loaded.tokenizer
        self.mask_token_id: int = self.model.mask_token_id
        self.model_path = loaded.path
        self.kv_bytes_per_token = kv_cache.bytes_per_token(self.model)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, kv_budget)
        # The longest canvas (prompt + generation) a request may have; None: no bound but the
        # batch's token budget.
        limits = [self.model.max_length, max_model_len]
        self.max_model_len: int | None = min((x for x in limits if x is not None), default=None)
        limits = [max_num_batched_tokens, self.max_model_len, max_gen_length]
        self.max_gen_length: int = min(x for x in limits if x is not None)
        self.runner = ModelRunner(self.model, device, forward_chunk_tokens=chunk_tokens)
        self.metrics = EngineMetrics()
        self._ids = itertools.count()
        self._live: dict[str, Request] = {}
        self._ready: list[RequestOutput] = []  # aborted or unclaimed, returned by next step()

    # -- requests ------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: is empty")
            if len(prompt) > MAX_CHARS_PER_TOKEN * self.max_prompt_tokens:
                raise ValueError(
                    f"prompt: {len(prompt)} characters cannot fit in the longest prompt "
                    f"{self.max_prompt_tokens} tokens"
                )
            self._need_tokenizer("a text prompt")
            _check_unicode("prompt", prompt)
            ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            chars = sum(len(str(v)) for m in prompt if isinstance(m, dict) for v in m.values())
            if chars > MAX_CHARS_PER_TOKEN * self.max_prompt_tokens:
                raise ValueError(
                    f"prompt: {chars} characters of messages cannot fit in the longest prompt "
                    f"{self.max_prompt_tokens} tokens"
                )
            self._need_tokenizer("a chat prompt")
            try:
                encoded = self.tokenizer.apply_chat_template(
                    list(prompt), add_generation_prompt=True, tokenize=True
                )
            except Exception as err:
                raise ValueError(f"prompt: cannot apply the chat template: {err}") from err
            ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        elif isinstance(prompt, (list, tuple)):
            if len(prompt) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt: {len(prompt)} tokens exceed the longest prompt "
                    f"{self.max_prompt_tokens} tokens"
                )
            ids = list(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.model.vocab_size for t in ids):
                raise ValueError(
                    f"prompt: token ids must be integers in [0, {self.model.vocab_size})"
                )
        else:
            raise ValueError(
                f"prompt: expected text, token ids or chat messages, got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError("prompt: is empty")
        if self.mask_token_id in ids:
            raise ValueError(f"prompt: contains the mask token {self.mask_token_id}")
        return ids

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt any request can have (with gen_length 1 and no cfg)."""
        limits = [self.scheduler.max_num_batched_tokens, self.max_model_len]
        return min(x for x in limits if x is not None) - 1

    def _check_gen_length(self, params: DecodeParams) -> None:
        """Refuse a canvas too long for any prompt, before anything is tokenized or allocated."""
        if params.gen_length > self.max_gen_length:
            raise ValueError(
                f"gen_length: {params.gen_length} exceeds this engine's maximum "
                f"{self.max_gen_length}"
            )
        if self.max_model_len is not None and params.gen_length >= self.max_model_len:
            raise ValueError(
                f"gen_length: {params.gen_length} leaves no room for a prompt in the maximum "
                f"length {self.max_model_len}"
            )
        copies = 2 if params.cfg_scale > 0 else 1
        if (params.gen_length + 1) * copies > self.scheduler.max_num_batched_tokens:
            cfg = " (x2 for cfg)" if copies == 2 else ""
            raise ValueError(
                f"gen_length: {params.gen_length}{cfg} leaves no room for a prompt in "
                f"max_num_batched_tokens {self.scheduler.max_num_batched_tokens}"
            )

    def _check_length(self, ids: list[int], params: DecodeParams) -> None:
        limit = self.max_model_len
        if limit is not None and len(ids) + params.gen_length > limit:
            raise ValueError(
                f"prompt: {len(ids)} prompt tokens + gen_length {params.gen_length} exceed the "
                f"maximum length {limit}"
            )
        copies = 2 if params.cfg_scale > 0 else 1
        cost = (len(ids) + params.gen_length) * copies
        budget = self.scheduler.max_num_batched_tokens
        if cost > budget:
            what = "prompt + gen_length" + (" (x2 for cfg)" if copies == 2 else "")
            raise ValueError(
                f"prompt: {what} = {cost} tokens exceeds max_num_batched_tokens {budget}"
            )

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"prompt: {what} needs a tokenizer; pass token ids instead")

    def _constraint_ids(self, params: DecodeParams) -> dict[int, int]:
        out: dict[int, int] = {}
        for pos, value in (params.constraints or {}).items():
            if isinstance(value, int):
                out[pos] = value
                continue
            self._need_tokenizer("a text constraint")
            _check_unicode("constraints", value)
            offset = pos
            for word in value.split():
                # As Prophet's evaluation: each word tokenized with a leading space.
                for token in self.tokenizer.encode(" " + word, add_special_tokens=False):
                    if offset >= params.gen_length:
                        raise ValueError(
                            f"constraints: {value!r} at {pos} runs past gen_length "
                            f"{params.gen_length}"
                        )
                    out[offset] = token
                    offset += 1
        if any(t >= self.model.vocab_size or t == self.mask_token_id for t in out.values()):
            raise ValueError("constraints: token ids must be in the vocabulary and not the mask")
        return out

    def _special_ids(self) -> tuple[int | None, int | None]:
        """The model's EOS id (its config's ``eos_token_id``: 126081 for LLaDA-8B) and EOT id
        (the tokenizer's ``<|eot_id|>``: 126348), as LLaDA's ``generate.py`` hard-codes them."""
        eos = self.model.eos_token_ids[0] if self.model.eos_token_ids else None
        eot = None
        convert = getattr(self.tokenizer, "convert_tokens_to_ids", None)
        if convert is not None:
            found = convert("<|eot_id|>")
            unknown = getattr(self.tokenizer, "unk_token_id", None)
            if isinstance(found, int) and found != unknown and 0 <= found < self.model.vocab_size:
                eot = found
        return eos, eot

    def _suppressed_ids(self, params: DecodeParams) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Columns set to -inf in the logits, and left out of the confidence softmax.

        As LLaDA's ``generate.py``: ``logits_eos_inf`` sets EOS's logit to -inf before the
        token is chosen; ``confidence_eos_eot_inf`` then sets EOT's logit to -inf in the logits
        the confidence softmax reads, and EOS's in the (noisy) logits the token was drawn from,
        which at temperature 0 are the same tensor: so EOS and EOT greedily, EOT alone when
        sampling. A prediction of a left-out token keeps its place with probability 0.
        """
        wanted = params.logits_eos_inf or params.confidence_eos_eot_inf
        if not wanted:
            return (), ()
        name = "logits_eos_inf" if params.logits_eos_inf else "confidence_eos_eot_inf"
        if self.model.family == "dream":
            raise ValueError(f"{name}: an option of LLaDA's generate.py; Dream's has none")
        eos, eot = self._special_ids()
        if eos is None:
            raise ValueError(f"{name}: the model's config names no eos_token_id")
        logits = (eos,) if params.logits_eos_inf else ()
        confidence: tuple[int, ...] = ()
        if params.confidence_eos_eot_inf:
            # A tokenizer without <|eot_id|> (foretell's small models) leaves out EOS alone.
            left_out = (eos, eot) if params.temperature == 0 else (eot,)
            confidence = tuple(dict.fromkeys(t for t in left_out if t is not None))
        return logits, confidence

    def _confidence_dtype(self, params: DecodeParams, family: str) -> torch.dtype | None:
        """The request's confidence dtype, None where it is the model's (the common case)."""
        model_dtype = self.model.embed.weight.dtype
        chosen = confidence_dtype(params, family, model_dtype)
        return None if chosen == model_dtype else chosen

    def make_request(
        self, prompt: Prompt, params: DecodeParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and build a request without queueing it (errors name the field)."""
        params = params if params is not None else self.default_params
        if isinstance(params, dict):
            params = as_params(params)
        if not isinstance(params, DecodeParams):
            raise ValueError(f"params: expected DecodeParams, got {type(params).__name__}")
        family = self.model.family
        if params.kv_cache is not None:
            _check_kv_cache(family, params)
        elif family == "dream" and params.block_length != params.gen_length:
            raise ValueError(
                "block_length: Dream decodes the whole generation as one block (blocks need "
                "kv_cache, Fast-dLLM's block decoding)"
            )
        if family != "dream" and params.remasking == "origin":
            raise ValueError("remasking: 'origin' is Dream's rule; LLaDA models use the others")
        logits_suppress, confidence_suppress = self._suppressed_ids(params)
        self._check_gen_length(params)
        ids = self._encode(prompt)
        self._check_length(ids, params)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._live:
            raise ValueError(f"request_id: {request_id!r} is already running")
        req = Request(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=ids,
            params=params,
            mask_token_id=self.mask_token_id,
            family=family,
            constraint_ids=self._constraint_ids(params),
            logits_suppress=logits_suppress,
            confidence_suppress=confidence_suppress,
            confidence_dtype=self._confidence_dtype(params, family),
        )
        if params.kv_cache is not None:
            req.kv_reserved = req.canvas_len * self.kv_bytes_per_token
        self.scheduler.check_fits(req)
        return req

    def add_request(
        self, prompt: Prompt, params: DecodeParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; it joins the batch at the next ``step()`` with a free slot."""
        return self.enqueue(self.make_request(prompt, params, request_id))

    def enqueue(self, req: Request) -> str:
        """Queue a request built (and validated) by ``make_request``."""
        if req.request_id in self._live:
            raise ValueError(f"request_id: {req.request_id!r} is already running")
        self.scheduler.add(req)
        self._live[req.request_id] = req
        return req.request_id

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; its slot is free at the next step. Idempotent."""
        req = self.scheduler.abort(str(request_id))
        if req is not None:
            self._live.pop(req.request_id, None)
            self.metrics.finished[req.finish_reason] += 1
            self._ready.append(self.output(req))
            self._track_kv_cache()

    def _track_kv_cache(self) -> None:
        used = self.scheduler.kv_cache_bytes
        self.metrics.kv_cache_bytes = used
        self.metrics.kv_cache_peak_bytes = max(self.metrics.kv_cache_peak_bytes, used)

    def snapshot(self, request_id: str) -> RequestOutput | None:
        """The current state of a request still in flight (``finish_reason`` None): its
        partly denoised canvas and the positions revealed in its last step. None if unknown or
        finished."""
        req = self._live.get(str(request_id))
        return None if req is None or req.is_finished else self.output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._ready)

    # -- stepping ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one forward pass for the whole batch; returns the requests that finished."""
        start = time.perf_counter()
        ready, self._ready = self._ready, []
        batch = self.scheduler.schedule()
        if batch:
            self._step_batch(batch)
            # Peak: while the pass's caches are all alive, before the finished ones are freed.
            self._track_kv_cache()
        for req in self.scheduler.update():
            self._live.pop(req.request_id, None)
            self.metrics.finished[req.finish_reason] += 1
            if req.finish_reason in ("steps", "early_commit"):
                self.metrics.generated_tokens += req.params.gen_length
            ready.append(self.output(req))
        self._track_kv_cache()
        self.metrics.step_seconds += time.perf_counter() - start
        return ready

    def _step_batch(self, batch: list[Request]) -> None:
        self.metrics.steps += 1
        self.metrics.sequences_in_passes += len(batch)
        self._run_group(batch)

    def _run_group(self, group: list[Request]) -> None:
        """One forward pass for ``group`` and its decoding step. If the pass fails, its halves
        are retried on their own, recursively, so that only a request that fails alone ends
        with "error"; every other request still takes this step once, from the sub-pass that
        succeeded (sequences never attend across each other, so its result is the same)."""
        try:
            result = self.runner.run(group)
        except Exception as err:
            if len(group) == 1:
                logger.warning("request %s: forward pass failed: %r", group[0].request_id, err)
                group[0].finish("error", f"forward pass failed: {err!r}")
                return
            result = None  # leave the except block first: its traceback holds the pass' memory
        if result is None:
            half = len(group) // 2
            self._run_group(group[:half])
            self._run_group(group[half:])
            return
        for req, res in result.per_request:
            try:
                advance(req, res.positions, res.logits, res.more, res.stats)
            except Exception as err:  # one request's failure must not stop the others
                req.finish("error", f"decoding failed: {err!r}")
        if result.batched is not None:
            result.batched.advance()  # errors are attributed inside, per request where possible
        # Counted after decoding: a commit's read-only rows of a cached request run then.
        self.metrics.tokens_in_passes += result.query_tokens

    def output(self, req: Request) -> RequestOutput:
        """The caller's view of a request (finished or in flight)."""
        token_ids = req.generated_ids
        text, stop_string = "", None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(
                token_ids, skip_special_tokens=req.params.skip_special_tokens
            )
            cuts = [(text.find(s), s) for s in req.params.stop if s in text]
            if cuts:
                cut, stop_string = min(cuts)
                text = text[:cut]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_token_ids),
            token_ids=token_ids,
            text=text,
            num_forward_passes=req.global_step,
            finish_reason=req.finish_reason,
            committed_early=req.finish_reason == "early_commit",
            commit_step=req.commit_step,
            last_gap=req.last_gap,
            error=req.error,
            stop_string=stop_string,
            arrival_time=req.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            finished_time=req.finished_time,
            revealed=[] if req.revealed_last_step is None else req.revealed_last_step.tolist(),
        )

    # -- offline -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: DecodeParams | Sequence[DecodeParams] | None = None,
        *,
        use_tqdm: bool = True,
        errors: str = "raise",
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        ``errors="raise"``: all-or-nothing admission, if any prompt or params is invalid, none
        runs and the error names its index. ``errors="return"``: an invalid one gets an output
        with ``finish_reason`` "error" and the message, and the others run (bulk jobs, where
        one bad row must not stop the rest).
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors: expected 'raise' or 'return', got {errors!r}")
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, DecodeParams):
            params_list = [params] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"params: {len(params_list)} params for {len(prompts)} prompts")
        results: list[RequestOutput | None] = [None] * len(prompts)
        order: dict[str, int] = {}
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            request_id = f"gen-{next(self._ids)}"
            try:
                requests.append(self.make_request(prompt, p, request_id=request_id))
            except ValueError as err:
                if errors == "raise":
                    raise ValueError(f"prompts[{i}]: {err}") from None
                results[i] = _invalid_output(request_id, prompt, str(err))
                continue
            order[request_id] = i
        for req in requests:
            self.enqueue(req)
        bar = tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm)
        bar.update(len(prompts) - len(requests))
        start, passes, tokens, remaining = time.perf_counter(), 0, 0, len(requests)
        unclaimed = []
        try:
            while remaining:
                outputs = self.step()
                passes += 1
                for out in outputs:
                    if out.request_id not in order:
                        unclaimed.append(out)
                        continue
                    results[order[out.request_id]] = out
                    remaining -= 1
                    tokens += len(out.token_ids)
                    bar.update(1)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{tokens / elapsed:.0f}", passes_s=f"{passes / elapsed:.1f}")
        finally:
            bar.close()
            self._ready.extend(unclaimed)
        return results


def _invalid_output(request_id: str, prompt: object, error: str) -> RequestOutput:
    """What ``generate(errors="return")`` hands back for a request that never ran."""
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=[],
        token_ids=[],
        text="",
        num_forward_passes=0,
        finish_reason="error",
        error=error,
    )
