"""The server's admission limits and their defaults, the ``foretell serve`` options that set
them, and the body parsing and JSON guards that enforce the per-request ones (importable without
the server extra: fastapi and pydantic are only needed to call the parsing functions)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from foretell.server.errors import APIError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from starlette.requests import Request

# Sized so that no single client can exhaust the machine; docs/serving.md explains each.
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_PROMPTS_PER_REQUEST = 64
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_MAX_QUEUED_REQUESTS = 256
QUEUED_TOKENS_PER_BATCH_BUDGET = 4  # default max_queued_tokens: 4 x max_num_batched_tokens
DEFAULT_MAX_GEN_LENGTH = 1024
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_SHUTDOWN_GRACE = 10.0
# Connections (enforced by ``connections``): safe on the open internet, and far above what the
# engine's queue admits (--max-num-seqs + --max-queued-requests requests).
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
RETRY_AFTER_SECONDS = 1
# Set by the connection guard (``connections``): the loop time by which a request's body must
# have arrived, in the ASGI scope's extensions.
READ_DEADLINE_KEY = "foretell.read_deadline"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Security and admission options of ``foretell serve`` (0 lifts a numeric limit, except
    where the help says otherwise)."""
    g = p.add_argument_group("security")
    g.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $FORETELL_API_KEY, else none)",
    )
    g.add_argument(
        "--allowed-origins",
        nargs="*",
        default=[],
        metavar="ORIGIN",
        help="browser origins allowed to call the API (CORS); default none",
    )
    g.add_argument("--disable-docs", action="store_true", help="do not serve /docs, /openapi.json")
    g = p.add_argument_group("limits (0: no limit, unless said otherwise)")
    g.add_argument("--max-num-batched-tokens", type=int, default=16384)
    g.add_argument(
        "--max-gen-length",
        type=int,
        default=DEFAULT_MAX_GEN_LENGTH,
        help="longest canvas (max_tokens) a request may ask for",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=DEFAULT_MAX_MODEL_LEN,
        help="longest prompt + max_tokens of a request (below the model's own maximum)",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="requests waiting for a batch slot before new ones get 429",
    )
    g.add_argument(
        "--max-queued-tokens",
        type=int,
        help="canvas tokens waiting for a slot before new requests get 429 "
        f"(default: {QUEUED_TOKENS_PER_BATCH_BUDGET} x --max-num-batched-tokens)",
    )
    g.add_argument("--max-prompts-per-request", type=int, default=DEFAULT_MAX_PROMPTS_PER_REQUEST)
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies get 413",
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="seconds before a request is aborted (504, or a final SSE error)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="open client connections; a new one beyond evicts the oldest idle or half-open "
        "connection, else gets 503 (lowered to fit the open-file limit)",
    )
    g.add_argument(
        "--request-read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds a request's headers and body may take to arrive (then closed, or 408)",
    )
    g.add_argument(
        "--keep-alive-timeout",
        type=_positive_seconds,
        default=DEFAULT_KEEP_ALIVE_TIMEOUT,
        help="seconds an idle connection is kept open for its next request (not 0)",
    )
    g.add_argument(
        "--shutdown-grace",
        type=shutdown_grace,
        default=DEFAULT_SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, seconds requests in flight get to finish before they are "
        "aborted; 0 aborts them at once, -1 (or inf) waits without limit "
        f"(default {DEFAULT_SHUTDOWN_GRACE:g})",
    )


def shutdown_grace(text: str) -> float | None:
    """``--shutdown-grace``: seconds >= 0; -1 or inf is None (wait without limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value == -1 or value == math.inf:
        return None
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(
            f"must be >= 0 seconds, or -1 to wait without limit; got {text}"
        )
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


# -- body parsing and JSON guards ------------------------------------------------------
MAX_DEPTH = 32  # JSON nesting; the deepest valid body (early_commit) is 3 levels
MAX_INT_DIGITS = 40  # longer integers are read as floats, which every integer field refuses
JSON_TYPES = ("application/json",)
# Names pydantic puts in an error's location for the member of a union that failed.
_UNION_TAGS = re.compile(r"^(str|int|float|bool|dict|list|none|constrained-\w+)$|[\[\]\-]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
# Body fields whose keys are data: errors inside them name the field itself.
MAPPING_FIELDS = ("constraints", "logit_bias", "early_commit")


def _parse_int(text: str) -> int | float:
    """A JSON integer; a longer one than MAX_INT_DIGITS is read as the float it also is (so
    integer fields refuse it and number fields take it as they take ``1e41``)."""
    digits = len(text) - text.startswith("-")
    return int(text) if digits <= MAX_INT_DIGITS else float(text)


def _parse_float(text: str) -> int | float:
    """A JSON number with a fraction or exponent: a whole one is the integer it is (JSON Schema
    counts ``2.0`` and ``1e3`` as integers, and so does the published schema), read exactly;
    any other one a float."""
    if "." in text or "e" in text or "E" in text:
        try:
            exact = Decimal(text)
        except ArithmeticError:
            return float(text)
        if exact == exact.to_integral_value() and exact.adjusted() < MAX_INT_DIGITS:
            return int(exact)
    return float(text)


def _max_depth(raw: bytes) -> int:
    """An upper bound of the body's nesting depth, at C speed (brackets inside strings count
    too, so only a high value needs the exact walk)."""
    brackets = raw.translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= MAX_DEPTH:
        return MAX_DEPTH
    import torch

    steps = torch.frombuffer(bytearray(brackets), dtype=torch.uint8)
    opening = (steps == ord("[")) | (steps == ord("{"))
    return int(torch.cumsum(opening.to(torch.int32) * 2 - 1, 0).max())


def _check_tree(raw: bytes, data: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings no encoder can take (lone surrogates),
    naming the field. The common case costs two C-speed scans of the raw body."""
    if _max_depth(raw) > MAX_DEPTH:
        stack = [(v, 1) for v in data.values() if isinstance(v, (dict, list))]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise APIError(f"body: nested deeper than {MAX_DEPTH} levels")
            values = node.values() if isinstance(node, dict) else node
            stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))
    # A lone surrogate can only come from a \uD800-\uDFFF escape: look further only then.
    if not _SURROGATE_ESCAPE.search(raw):
        return
    for key, value in data.items():
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            param = key.encode("utf-8", "replace").decode()
            raise APIError(f"{param}: not valid Unicode (a lone surrogate)", param=param) from None


def field_name(loc: tuple) -> str | None:
    """A pydantic error location as an API field name, e.g. ``messages.0.role``; the union
    member tags pydantic adds (``prompt.list[int]``) are left out, and so are the keys of
    mapping fields (``constraints``), which are data, not field names."""
    if loc and loc[0] in MAPPING_FIELDS:
        return str(loc[0])
    parts = []
    for part in loc:
        if isinstance(part, str) and _UNION_TAGS.search(part):
            break
        parts.append(str(part))
    return ".".join(parts) or None


async def _read_body(request: Request, limit: int | None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_big = APIError(
        f"body: larger than the server's limit of {limit} bytes",
        status=413,
        code="request_too_large",
    )
    length = request.headers.get("content-length")
    if limit is not None and length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    from starlette.requests import ClientDisconnect

    deadline = request.scope.get("extensions", {}).get(READ_DEADLINE_KEY)
    chunks, size = [], 0
    stream = request.stream()
    loop = asyncio.get_running_loop()
    try:
        while True:
            if deadline is None:
                chunk = await anext(stream, None)
            else:
                remaining = deadline - loop.time()
                chunk = await asyncio.wait_for(anext(stream, None), max(remaining, 0.0))
            if chunk is None:
                return b"".join(chunks)
            size += len(chunk)
            if limit is not None and size > limit:
                raise too_big
            chunks.append(chunk)
    except asyncio.TimeoutError:
        raise APIError(
            "body: not received within the server's read timeout (--request-read-timeout)",
            status=408,
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:  # nobody to answer; not a server error
        raise APIError("body: the client disconnected", status=400) from None


async def parse_body(request: Request, model: type[BaseModel], limit: int | None = None) -> Any:
    """The body as ``model``: 415 unless JSON, 413 past ``limit`` bytes, 400 naming the field."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES:
        raise APIError(
            f"content-type: expected application/json, got {media or 'none'!r}",
            status=415,
            code="unsupported_media_type",
        )
    raw = await _read_body(request, limit)
    # Decoding and validating up to max_body_bytes takes a while: not on the event loop.
    return await asyncio.to_thread(_decode, raw, model)


def _decode(raw: bytes, model: type[BaseModel]) -> Any:
    from pydantic import ValidationError

    try:
        data = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(f"body: malformed JSON ({err})") from None
    except RecursionError:
        raise APIError(f"body: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:
        raise APIError(f"body: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError("body: expected a JSON object")
    _check_tree(raw, data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = field_name(first["loc"])
        why = first["msg"]
        if first["type"] == "extra_forbidden":
            why = "unknown or unsupported parameter"
        raise APIError(f"{param or 'body'}: {why}", param=param) from None
