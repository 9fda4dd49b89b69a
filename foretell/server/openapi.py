"""The published OpenAPI schema: what the server really accepts and answers.

The request bodies come from the pydantic models of ``protocol`` (their fields, which are
required, nested objects); each field's schema is then written here with the bounds the server
enforces, including the limits this server runs with (``max_tokens`` up to the longest canvas
it admits, the model's name, its vocabulary, its remasking rules). A rule that spans fields
(``block_length`` must divide ``max_tokens``, a prompt must fit next to its canvas, ...) cannot
be written in JSON Schema: the field's description says so, the field carries
``x-cross-field: true``, and the server answers 400 naming the field. tests/test_server_openapi.py
fuzzes the server against this schema with schemathesis, both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from foretell.params import (
    KV_CACHE_MODES,
    REMASKING,
    REMASKING_ALIASES,
    SEED_MAX,
    SEED_MIN,
    DecodeParams,
)
from foretell.server.limits import MAX_INT_DIGITS
from foretell.server.metrics import PROMETHEUS_TEXT
from foretell.server.protocol import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    POSITION_PATTERN,
    ChatCompletionRequest,
    CompletionRequest,
)

BIG_INT = 10**MAX_INT_DIGITS - 1  # the longest integer the server reads as one
CROSS = "x-cross-field"
NULL = {"type": "null"}
SECURITY_SCHEME = "bearer"


@dataclass(frozen=True)
class ServedLimits:
    """What the schema needs to know of the running server."""

    model_name: str
    max_gen_length: int  # the longest canvas any request can have (no cfg)
    vocab_size: int
    mask_token_id: int | None
    family: str
    has_eos: bool
    max_prompts_per_request: int | None
    max_prompt_tokens: int
    api_key: bool
    block_size: int | None = None  # a block-causal model's (SDAR, LLaDA2); None otherwise
    error_statuses: tuple[int, ...] = (400, 403, 404, 408, 413, 415, 429, 500, 503, 504)


def served_limits(engine: Any, model_name: str, **app: Any) -> ServedLimits:
    """The limits of an ``AsyncEngine``'s engine as the API exposes them."""
    core = engine.engine
    longest = [core.max_gen_length, core.scheduler.max_num_batched_tokens - 1]
    if core.max_model_len is not None:
        longest.append(core.max_model_len - 1)
    model = core.model
    return ServedLimits(
        model_name=model_name,
        max_gen_length=min(longest),
        vocab_size=model.vocab_size,
        mask_token_id=core.mask_token_id,
        family=model.family,
        has_eos=bool(getattr(model, "eos_token_ids", None)),
        block_size=model.block_size if getattr(model, "block_causal", False) else None,
        max_prompt_tokens=core.max_prompt_tokens,
        **app,
    )


def _opt(schema: dict[str, Any], description: str, cross: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"anyOf": [schema, NULL], "default": None, "description": description}
    if cross:
        out[CROSS] = True
    return out


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _token(limits: ServedLimits) -> dict[str, Any]:
    schema = _int(0, limits.vocab_size - 1)
    if limits.mask_token_id is not None:
        schema["not"] = {"const": limits.mask_token_id}
    return schema


def _false(description: str) -> dict[str, Any]:
    return _opt({"type": "boolean", "const": False}, description)


def _null(description: str) -> dict[str, Any]:
    return {"type": "null", "default": None, "description": description}


def _block_fields(lim: ServedLimits) -> dict[str, dict[str, Any]]:
    """What a block-causal model (SDAR, LLaDA2) reads differently, or refuses."""
    g, block = lim.max_gen_length, lim.block_size
    llada2 = lim.family == "llada2"
    return {
        "block_cache": _opt(
            {"type": "boolean"},
            "keep finished blocks' keys (default), or false: re-encode the window every step "
            "as LLaDA2's official generate does (slower; bitwise its numbers in bfloat16)",
        ),
        "steps": _opt(
            _int(1, BIG_INT),
            "denoising steps per block (default: block_length). Cross-field: at most "
            "block_length" + ("; LLaDA2 caps it at gen_length // minimal_topk." if llada2 else "."),
            cross=True,
        ),
        "block_length": _opt(
            _int(1, BIG_INT),
            f"decoding block, aligned at position 0 (default: the model's {block}). "
            "Cross-field: the prompt's whole blocks and the first block to denoise must fit "
            "the batch token budget, and the canvas to its last block's end the model length.",
            cross=True,
        ),
        "remasking": _opt(
            {"type": "string", "enum": ["low_confidence", "confidence_threshold", "maskgit_plus"]},
            "'low_confidence': the static schedule; 'confidence_threshold': the dynamic one",
        ),
        "top_k": _opt(_int(1, BIG_INT), "sampling: keep the k most likely tokens"),
        "alg_temp": _null("Dream's option"),
        "cfg_scale": _opt({"type": "number", "minimum": 0, "maximum": 0}, "no guidance"),
        "kv_cache": _null("block-causal models always cache their finished blocks"),
        "confidence_dtype": _null("the confidence is in the logits' dtype"),
        "logits_eos_inf": _false("LLaDA's generate.py option"),
        "confidence_eos_eot_inf": _false("LLaDA's generate.py option"),
        "max_tokens": _opt(
            _int(1, g),
            f"gen_length: the generation's length at most (default "
            f"{min(DecodeParams.gen_length, g)}); it ends earlier at a stop id. Cross-field: "
            "as block_length.",
            cross=True,
        ),
        "eos_early_stop": _opt(
            {"type": "boolean"},
            "LLaDA2's option: end as soon as everything before the first revealed stop id is "
            "decoded. Cross-field: needs a stop id (not ignore_eos without stop_token_ids).",
            cross=True,
        ),
        "minimal_topk": (
            _opt(
                _int(1, BIG_INT),
                "LLaDA2's option: steps <= gen_length // minimal_topk. Cross-field: must "
                "leave a step.",
                cross=True,
            )
            if llada2
            else _opt(_int(1, 1), "LLaDA2's option; only 1 here")
        ),
    }


def _remasking(limits: ServedLimits) -> list[str]:
    rules = [r for r in REMASKING if limits.family == "dream" or r != "origin"]
    return rules + sorted(REMASKING_ALIASES)


def _common_fields(lim: ServedLimits) -> dict[str, dict[str, Any]]:
    """The schema of every field both endpoints share (``DiffusionFields``)."""
    g = lim.max_gen_length
    llada_only = lim.family != "dream" and lim.has_eos
    stop = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    ec_object = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "thresholds": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 3,
                "maxItems": 3,
                "description": "gap thresholds of the early, middle and late phase; must not "
                "rise (t1 >= t2 >= t3)",
            },
            "bounds": {
                "type": "array",
                "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "minItems": 2,
                "maxItems": 2,
                "description": "phase bounds as fractions of the steps, b1 <= b2",
            },
            "answer_start": _opt(_int(0, g - 1), "answer span start; below gen_length"),
            "answer_length": _int(1, BIG_INT),
            "statistic": {"type": "string", "enum": ["mean", "min"]},
            "policy": {"type": "string", "const": "prophet"},
        },
    }
    policy_names = "^([Pp][Rr][Oo][Pp][Hh][Ee][Tt]|[Nn][Oo][Nn][Ee]|[Oo][Ff][Ff])?$"
    return {
        "model": {
            "type": "string",
            "enum": [lim.model_name],
            "description": "the served model (GET /v1/models); another name gets 404",
        },
        "max_tokens": _opt(
            _int(1, g),
            f"the canvas length (gen_length): a diffusion model denoises exactly this many "
            f"positions (default {min(DecodeParams.gen_length, g)}). Cross-field: equal to "
            "gen_length (and max_completion_tokens) when both are given; the prompt's tokens "
            "plus this must fit the model length, twice over with cfg_scale > 0.",
            cross=True,
        ),
        "gen_length": _opt(_int(1, g), "same as max_tokens (cross-field likewise)", cross=True),
        "steps": _opt(
            _int(1, g),
            "forward passes budget (default: gen_length). Cross-field: at most gen_length, "
            "and a multiple of the number of blocks (gen_length / block_length); with "
            "kv_cache at least 2 per block.",
            cross=True,
        ),
        "block_length": _opt(
            _int(1, g),
            "semi-autoregressive block size (default: gen_length). Cross-field: must divide "
            "gen_length"
            + ("; Dream models take blocks only with kv_cache." if lim.family == "dream" else "."),
            cross=True,
        ),
        "remasking": _opt(
            {"type": "string", "enum": _remasking(lim)},
            "which masked tokens to reveal each step. Cross-field: with kv_cache only some "
            "rules (see kv_cache).",
            cross=True,
        ),
        "threshold": _opt(
            {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "confidence for remasking 'confidence_threshold'",
        ),
        "cfg_scale": _opt(
            {"type": "number", "minimum": 0},
            "classifier-free guidance scale (0: off). Cross-field: doubles the tokens a "
            "request takes (see max_tokens); not with kv_cache.",
            cross=True,
        ),
        "constraints": _opt(
            {
                "type": "object",
                "propertyNames": {"pattern": POSITION_PATTERN},
                "additionalProperties": {
                    "anyOf": [_token(lim), {"type": "string", "minLength": 1}]
                },
            },
            "{position: token id or text} forced into the generation. Cross-field: every "
            "position, and every token of a text (its words tokenized with a leading space), "
            "must fall inside gen_length; a text must not encode to the mask token.",
            cross=True,
        ),
        "early_commit": _opt(
            {"anyOf": [{"type": "string", "pattern": policy_names}, ec_object]},
            "'prophet' (Prophet early commit), 'none'/'off'/'' or null (off), or Prophet's "
            "settings. Cross-field: thresholds must not rise, bounds must be ordered, "
            "answer_start must be below gen_length"
            + ("; not with kv_cache on Dream models." if lim.family == "dream" else "."),
            cross=True,
        ),
        "top_k": _opt(_int(1, BIG_INT), "Dream's sampling: keep the k most likely tokens"),
        "alg_temp": _opt(
            {"type": "number", "minimum": 0},
            "Dream's confidence-sampling temperature"
            + (" (Cross-field: not with kv_cache.)" if lim.family == "dream" else ""),
            cross=lim.family == "dream",
        ),
        "eps": _opt(
            {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "Dream's time-schedule epsilon",
        ),
        "kv_cache": _opt(
            {"type": "string", "enum": list(KV_CACHE_MODES)},
            "Fast-dLLM's block KV cache. Cross-field: no cfg_scale; remasking "
            + (
                "'entropy' or 'confidence_threshold', no early_commit, no alg_temp"
                if lim.family == "dream"
                else "'low_confidence', 'random' or 'confidence_threshold'"
            )
            + "; at least 2 steps per block unless confidence_threshold.",
            cross=True,
        ),
        "skip_special_tokens": _opt({"type": "boolean"}, "leave special tokens out of the text"),
        "confidence_dtype": _opt(
            {"type": "string", "enum": ["model", "float64"]},
            "dtype of the confidence softmax (null: the rule's reference)",
        ),
        "logits_eos_inf": (
            _opt({"type": "boolean"}, "LLaDA's generate.py option")
            if llada_only
            else _false("LLaDA's generate.py option; this model has none")
        ),
        "confidence_eos_eot_inf": (
            _opt({"type": "boolean"}, "LLaDA's generate.py option")
            if llada_only
            else _false("LLaDA's generate.py option; this model has none")
        ),
        "stream_canvas": {
            "type": "boolean",
            "default": False,
            "description": "streaming only: also send one chunk per step with the whole canvas",
        },
        "temperature": _opt({"type": "number", "minimum": 0}, "sampling temperature (0: greedy)"),
        "top_p": _opt({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "nucleus mass"),
        "n": _opt(_int(1, 1), "choices per prompt: only 1"),
        "stream": _opt({"type": "boolean"}, "server-sent events, one chunk per step"),
        "stream_options": _opt(
            {"$ref": "#/components/schemas/StreamOptions"},
            "with stream: include_usage adds a last chunk with the usage (ignored otherwise)",
        ),
        "stop": _opt(
            {"anyOf": [stop, {"type": "array", "items": stop, "maxItems": MAX_STOPS}]},
            "cut the text at the first of these strings",
        ),
        "seed": _opt(_int(SEED_MIN, SEED_MAX), "the request's own random stream"),
        "user": _opt({"type": "string"}, "an end-user id (unused)"),
        "presence_penalty": _opt({"type": "number", "minimum": 0, "maximum": 0}, "only 0"),
        "frequency_penalty": _opt({"type": "number", "minimum": 0, "maximum": 0}, "only 0"),
        "logit_bias": _opt({"type": "object", "maxProperties": 0}, "only empty"),
        "stop_token_ids": _opt(
            {"type": "array", "items": _token(lim)},
            "token ids that end the generation (returned ids stop after the first)"
            + ("; the model's EOS ids too unless ignore_eos" if lim.block_size else ""),
        ),
        "ignore_eos": _opt({"type": "boolean"}, "do not stop at the model's EOS ids"),
        "eos_early_stop": _false("LLaDA2's option; block-causal models only"),
        "minimal_topk": _opt(_int(1, 1), "LLaDA2's option; block-causal models only"),
        "block_cache": _opt({"type": "boolean", "const": True}, "block-causal models only"),
        **(_block_fields(lim) if lim.block_size else {}),
    }


def _prompt(lim: ServedLimits) -> dict[str, Any]:
    text = {"type": "string", "minLength": 1}
    ids = {"type": "array", "items": _token(lim), "minItems": 1, "maxItems": lim.max_prompt_tokens}
    many: dict[str, Any] = {"minItems": 1}
    if lim.max_prompts_per_request is not None:
        many["maxItems"] = lim.max_prompts_per_request
    return {
        "anyOf": [
            text,
            {"type": "array", "items": text, **many},
            ids,
            {"type": "array", "items": ids, **many},
        ],
        "description": "a text, token ids, or a list of either (one choice each). Cross-field: "
        "each prompt must tokenize to at least one token, and its tokens plus max_tokens must "
        "fit the model length and the batch token budget; a batch must fit the queue.",
        CROSS: True,
    }


def request_schemas(lim: ServedLimits) -> dict[str, dict[str, Any]]:
    """Component schemas of the two request bodies and their parts."""
    out: dict[str, dict[str, Any]] = {}
    common = _common_fields(lim)
    specific = {
        "CompletionRequest": {
            "prompt": _prompt(lim),
            "echo": _false("only false"),
            "logprobs": {"type": "null", "default": None, "description": "not supported"},
            "best_of": _opt(_int(1, 1), "only 1"),
            "suffix": _opt({"type": "string", "maxLength": 0}, "not supported: empty only"),
        },
        "ChatCompletionRequest": {
            "messages": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/ChatMessage"},
                "minItems": 1,
                "description": "rendered with the model's chat template. Cross-field: the "
                "rendered prompt must fit next to max_tokens as for prompt, and the template "
                "must accept the conversation.",
                CROSS: True,
            },
            "max_completion_tokens": _opt(
                _int(1, lim.max_gen_length), "same as max_tokens (cross-field likewise)", True
            ),
            "logprobs": _false("only false"),
            "top_logprobs": _opt(_int(0, 0), "only 0"),
        },
    }
    for model in (CompletionRequest, ChatCompletionRequest):
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, schema in generated.pop("$defs", {}).items():
            out[name] = schema
        fields = {**common, **specific[model.__name__]}
        missing = set(generated["properties"]) ^ set(fields)
        if missing:  # a field added to the model must be described here too
            raise RuntimeError(f"openapi: no schema for the fields {sorted(missing)}")
        generated["properties"] = {name: fields[name] for name in generated["properties"]}
        out[model.__name__] = generated
    return out


SSE_EVENT = {  # one event of a stream (OpenAPI 3.1: a text/event-stream schema is per event)
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a chunk (a completion or chat.completion.chunk object) as JSON, an "
            "error object as JSON, or [DONE]",
        }
    },
}
ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_WHY = {
    400: "invalid input; error.param names the field",
    401: "missing or wrong API key",
    403: "a browser Origin not in --allowed-origins",
    404: "a model not served here",
    408: "headers and body not received within --request-read-timeout",
    413: "body larger than --max-body-bytes",
    415: "Content-Type other than application/json",
    429: "the queue is full (--max-queued-requests / --max-queued-tokens); retry later",
    500: "generation failed (error.message names the stage)",
    503: "shutting down, or too many open connections (--max-connections)",
    504: "--request-timeout passed; the request was aborted",
}
_FORETELL = {
    "type": "object",
    "required": ["finish_reason", "num_forward_passes", "committed_early", "commit_step"],
    "properties": {
        "finish_reason": {
            "type": "string",
            "enum": ["steps", "early_commit", "stop", "aborted", "error"],
        },
        "num_forward_passes": {"type": "integer"},
        "committed_early": {"type": "boolean"},
        "commit_step": {"type": ["integer", "null"]},
    },
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}


def _completion(chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "type": "object",
        "required": ["index", "logprobs", "finish_reason", "foretell"],
        "properties": {
            "index": {"type": "integer"},
            "logprobs": {"type": "null"},
            "finish_reason": {"type": "string", "enum": ["stop", "length", "abort", "error"]},
            "foretell": _FORETELL,
        },
    }
    if chat:
        choice["required"].append("message")
        choice["properties"]["message"] = {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
        }
    else:
        choice["required"].append("text")
        choice["properties"]["text"] = {"type": "string"}
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion" if chat else "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _USAGE,
        },
    }


def _errors(statuses: tuple[int, ...]) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Error"}
    return {
        str(s): {"description": ERROR_WHY[s], "content": {"application/json": {"schema": ref}}}
        for s in statuses
    }


def openapi_schema(lim: ServedLimits, title: str, version: str) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document of the server."""
    v1_errors = (401, *lim.error_statuses) if lim.api_key else lim.error_statuses
    security = [{SECURITY_SCHEME: []}] if lim.api_key else []

    def post(name: str, summary: str, chat: bool) -> dict[str, Any]:
        body = {
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
        }
        return {
            "post": {
                "summary": summary,
                "operationId": "chat_completions" if chat else "completions",
                "requestBody": {"required": True, **body},
                "responses": {
                    "200": {
                        "description": "the completion, or with stream=true server-sent events "
                        "(a final data: [DONE])",
                        "content": {
                            "application/json": {"schema": _completion(chat)},
                            "text/event-stream": {"schema": SSE_EVENT},
                        },
                    },
                    **_errors(tuple(sorted(v1_errors))),
                },
                **({"security": security} if security else {}),
            }
        }

    models = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                    },
                },
            },
        },
    }
    health = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok", "stopped"]}},
    }
    models_errors = tuple(s for s in v1_errors if s in (401, 403, 408, 503))
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": {
            "/v1/completions": post("CompletionRequest", "Text completion", chat=False),
            "/v1/chat/completions": post("ChatCompletionRequest", "Chat completion", chat=True),
            "/v1/models": {
                "get": {
                    "summary": "The served model",
                    "operationId": "models",
                    "responses": {
                        "200": {
                            "description": "the one served model",
                            "content": {"application/json": {"schema": models}},
                        },
                        **_errors(tuple(sorted(models_errors))),
                    },
                    **({"security": security} if security else {}),
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness, for load balancers (no key needed)",
                    "operationId": "health",
                    "responses": {
                        "200": {
                            "description": "serving",
                            "content": {"application/json": {"schema": health}},
                        },
                        "503": {
                            "description": "the engine is shut down, or too many connections",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "anyOf": [health, {"$ref": "#/components/schemas/Error"}]
                                    }
                                }
                            },
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (no key needed)",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format 0.0.4",
                            "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}},
                        },
                        **_errors((503,)),
                    },
                }
            },
        },
        "components": {"schemas": {**request_schemas(lim), "Error": ERROR}},
    }
    if lim.api_key:
        doc["components"]["securitySchemes"] = {
            SECURITY_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": "the server's --api-key, as 'Authorization: Bearer KEY'",
            }
        }
    return doc
