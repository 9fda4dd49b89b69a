"""The server's admission limits and their defaults, and the ``foretell serve`` options that
set them (importable without the server extra)."""

from __future__ import annotations

import argparse

# Sized so that no single client can exhaust the machine; docs/serving.md explains each.
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_PROMPTS_PER_REQUEST = 64
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_MAX_QUEUED_REQUESTS = 256
QUEUED_TOKENS_PER_BATCH_BUDGET = 4  # default max_queued_tokens: 4 x max_num_batched_tokens
DEFAULT_MAX_GEN_LENGTH = 1024
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_SHUTDOWN_GRACE = 10.0
RETRY_AFTER_SECONDS = 1


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Security and admission options of ``foretell serve`` (0 lifts a numeric limit)."""
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
    g = p.add_argument_group("limits (0: no limit)")
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
        "--shutdown-grace",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE,
        help="seconds requests in flight get to finish on Ctrl-C",
    )
