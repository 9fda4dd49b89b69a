"""Prompt and params -> a validated :class:`Request`, before anything joins the batch.

Every check that can refuse a request runs here, against the model (families' rules, special
ids, vocabulary) and the engine's limits (canvas lengths, the token budget, the KV pool's
page size), so that a bad request is a ``ValueError`` naming its field and costs nothing: no
slot, no page, no tensor on the device.
"""

from __future__ import annotations

import torch

from foretell.decoding.unmask import confidence_dtype
from foretell.engine.kv_cache import KVPool
from foretell.models.transformer import DiffusionLM
from foretell.params import DecodeParams, as_params
from foretell.scheduler import Request
from foretell.scheduler.request import block_canvas

Prompt = str | list[int] | list[dict]
# A text longer than this many characters per token of room is refused before tokenizing it:
# a generous bound (subword vocabularies average a few characters per token), so that a huge
# text costs no tokenizer time.
MAX_CHARS_PER_TOKEN = 32
# The smallest sampling temperature of a block-causal step (vLLM takes anything below 1e-5 for
# greedy): dividing logits by less overflows them, and the draw would fail.
MIN_TEMPERATURE = 1e-5


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


def _check_unicode(name: str, text: str) -> None:
    """Refuse what no tokenizer can encode: a lone surrogate (JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name}: not valid Unicode at character {err.start}") from None


class RequestBuilder:
    """Builds requests for one model under one engine's limits.

    ``max_model_len`` caps a canvas (prompt + ``gen_length``), ``max_gen_length`` a
    ``gen_length``; ``max_num_batched_tokens`` is the token budget a request's largest pass
    (its whole canvas, twice with cfg) must fit in.
    """

    def __init__(
        self,
        model: DiffusionLM,
        tokenizer: object | None,
        kv_pool: KVPool,
        *,
        max_num_batched_tokens: int,
        max_model_len: int | None,
        max_gen_length: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kv_pool = kv_pool
        self.mask_token_id = model.mask_token_id
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_gen_length = max_gen_length

    def build(self, prompt: Prompt, params: DecodeParams | dict, request_id: str) -> Request:
        """Validate ``prompt`` and ``params`` and build the request (errors name the field);
        nothing is queued or allocated."""
        params = self.resolve_params(params)
        family = self.model.family
        block_causal = bool(getattr(self.model, "block_causal", False))
        logits_suppress, confidence_suppress = self._suppressed_ids(params)
        stop_ids = self._stop_ids(params, block_causal)
        self._check_gen_length(params)
        ids = self.encode(prompt)
        if block_causal:
            self._check_block_canvas(len(ids), params)
        else:
            self._check_length(ids, params)
        req = Request(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=ids,
            params=params,
            mask_token_id=self.mask_token_id,
            family=family,
            constraint_ids=self.constraint_ids(params),
            logits_suppress=logits_suppress,
            confidence_suppress=confidence_suppress,
            confidence_dtype=None if block_causal else self._confidence_dtype(params, family),
            block_causal=block_causal,
            stop_ids=stop_ids,
        )
        if block_causal:  # its first pass's pages; the rest a block at a time
            req.kv_pages_max = self.kv_pool.pages_for(req.canvas_len)
            req.kv_pages_needed = self.kv_pool.pages_for(req.block_bounds()[1])
        elif params.kv_cache is not None:
            req.kv_pages_needed = self.kv_pool.pages_for(req.canvas_len)
        return req

    def resolve_params(self, params: DecodeParams | dict) -> DecodeParams:
        """``params`` as this model reads them, checked against its family's rules (the
        prompt-independent checks of :meth:`build`): a block-causal model's block and
        per-block steps resolved, LLaDA's and Dream's block layout checked."""
        if isinstance(params, dict):
            params = as_params(params)
        if not isinstance(params, DecodeParams):
            raise ValueError(f"params: expected DecodeParams, got {type(params).__name__}")
        family = self.model.family
        block_causal = bool(getattr(self.model, "block_causal", False))
        if block_causal:
            params = self._block_params(params)
        else:
            params.check_canvas_blocks()
            for name in ("eos_early_stop", "minimal_topk", "block_cache"):
                if getattr(params, name) != DecodeParams.__dataclass_fields__[name].default:
                    raise ValueError(f"{name}: an option of block-causal models (SDAR, LLaDA2)")
        if not block_causal and params.kv_cache is not None:
            _check_kv_cache(family, params)
        elif family == "dream" and params.block_length != params.gen_length:
            raise ValueError(
                "block_length: Dream decodes the whole generation as one block (blocks need "
                "kv_cache, Fast-dLLM's block decoding)"
            )
        if family != "dream" and params.remasking == "origin":
            raise ValueError("remasking: 'origin' is Dream's rule; LLaDA models use the others")
        return params

    def _block_params(self, params: DecodeParams) -> DecodeParams:
        """What block-causal decoding defines (the official SDAR and LLaDA2 decoders, greedy),
        with ``block_length`` and ``steps`` (per block) resolved against the model."""
        family = self.model.family
        refused = {
            "kv_cache": (
                params.kv_cache is not None,
                "block-causal models always cache their "
                "finished blocks, exactly; leave kv_cache unset",
            ),
            "cfg_scale": (
                params.cfg_scale > 0,
                "classifier-free guidance is not defined for block-causal decoding",
            ),
            "alg_temp": (params.alg_temp is not None, "Dream's option"),
            "logits_eos_inf": (params.logits_eos_inf, "an option of LLaDA's generate.py"),
            "confidence_eos_eot_inf": (
                params.confidence_eos_eot_inf,
                "an option of LLaDA's generate.py",
            ),
            "confidence_dtype": (
                params.confidence_dtype is not None,
                "block-causal confidence is in the logits' dtype",
            ),
            "minimal_topk": (params.minimal_topk != 1 and family != "llada2", "LLaDA2's option"),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise ValueError(f"{name}: {why}")
        if params.remasking not in ("low_confidence", "confidence_threshold"):
            raise ValueError(
                f"remasking: block-causal models reveal by 'low_confidence' (the static "
                f"schedule) or 'confidence_threshold' (the dynamic one), not "
                f"{params.remasking!r}"
            )
        params = params.for_block_model(self.model.block_size)
        budget, limit = self.max_num_batched_tokens, self.max_model_len
        if params.block_length > min(x for x in (budget, limit) if x is not None):
            raise ValueError(
                f"block_length: {params.block_length} does not fit max_num_batched_tokens "
                f"{budget}" + ("" if limit is None else f" and the maximum length {limit}")
            )
        if 0 < params.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature: {params.temperature} would overflow the scaled logits; use 0 for "
                f"greedy decoding or at least {MIN_TEMPERATURE}"
            )
        if family == "llada2":
            # LLaDA2's generate caps the steps so that a step reveals minimal_topk tokens.
            steps = min(params.steps, params.gen_length // params.minimal_topk)
            if steps < 1:
                raise ValueError(
                    f"minimal_topk: {params.minimal_topk} leaves no step for gen_length "
                    f"{params.gen_length}"
                )
            params = params.replace(steps=steps)
        return params

    def _stop_ids(self, params: DecodeParams, block_causal: bool) -> tuple[int, ...]:
        """``stop_token_ids``, and a block-causal model's EOS ids unless ``ignore_eos``
        (LLaDA and Dream return the whole canvas, as their official decoders do)."""
        ids = list(params.stop_token_ids)
        if block_causal and not params.ignore_eos:
            ids += [t for t in self.model.eos_token_ids if t not in ids]
        vocab = self.model.vocab_size
        bad = [t for t in ids if t >= vocab or t == self.mask_token_id]
        if bad:
            raise ValueError(
                f"stop_token_ids: {bad[0]} is outside the vocabulary ({vocab}) or the mask token"
            )
        if params.eos_early_stop and not ids:
            raise ValueError("eos_early_stop: no stop ids (ignore_eos without stop_token_ids)")
        return tuple(dict.fromkeys(ids))

    def _check_block_canvas(self, prompt_len: int, params: DecodeParams) -> None:
        """A block-causal canvas runs to its last block's end, and its largest pass is its
        first (``Request.cost``); both checked by arithmetic, before anything is allocated."""
        block = params.block_length
        canvas, first = block_canvas(prompt_len, params)
        limit = self.max_model_len
        if limit is not None and canvas > limit:
            raise ValueError(
                f"prompt: {prompt_len} prompt tokens + gen_length {params.gen_length}, to the "
                f"end of the last block of {block} ({canvas}), exceed the maximum length {limit}"
            )
        if first > self.max_num_batched_tokens:
            raise ValueError(
                f"prompt: its largest pass ({first} tokens: the prompt's whole blocks and the "
                f"first block to denoise, or the window without the block cache) exceeds "
                f"max_num_batched_tokens {self.max_num_batched_tokens}"
            )

    def encode(self, prompt: Prompt) -> list[int]:
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
        limits = [self.max_num_batched_tokens, self.max_model_len]
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
        block_causal = getattr(self.model, "block_causal", False)  # a pass is ~2 blocks there
        if not block_causal and (params.gen_length + 1) * copies > self.max_num_batched_tokens:
            cfg = " (x2 for cfg)" if copies == 2 else ""
            raise ValueError(
                f"gen_length: {params.gen_length}{cfg} leaves no room for a prompt in "
                f"max_num_batched_tokens {self.max_num_batched_tokens}"
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
        budget = self.max_num_batched_tokens
        if cost > budget:
            what = "prompt + gen_length" + (" (x2 for cfg)" if copies == 2 else "")
            raise ValueError(
                f"prompt: {what} = {cost} tokens exceeds max_num_batched_tokens {budget}"
            )

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"prompt: {what} needs a tokenizer; pass token ids instead")

    def constraint_ids(self, params: DecodeParams) -> dict[int, int]:
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

    def special_ids(self) -> tuple[int | None, int | None]:
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
        eos, eot = self.special_ids()
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
