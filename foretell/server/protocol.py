"""The wire format of the OpenAI-compatible endpoints: request bodies and their mapping to
DecodeParams, and the pieces of a response (finish reason, usage, what a failure is called).

Bodies are parsed strictly (unknown fields are refused) so that a mistyped diffusion field such
as ``step`` gets a 400 naming it instead of being silently ignored. OpenAI fields foretell cannot
honour are accepted only at their neutral values, for the same reason. Types are strict too: a
number must be a JSON number (``"32"`` is refused, not coerced), a boolean a JSON boolean, and no
float may be NaN or infinite.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from foretell.params import DecodeParams
from foretell.server.errors import FIELD_RE, APIError

if TYPE_CHECKING:
    from foretell.engine.async_engine import AsyncEngine, RequestHandle
    from foretell.engine.outputs import RequestOutput

logger = logging.getLogger("foretell.server")


MAX_STOPS, MAX_STOP_CHARS = 16, 256  # OpenAI takes at most 4 stop strings
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
# JSON object keys are strings: a constraint position is a key, written as a plain decimal
# (the pattern the published schema states), read as an int by ``to_params``.
POSITION_PATTERN = r"^(0|[1-9][0-9]{0,8})$"
Position = Annotated[str, Field(pattern=POSITION_PATTERN)]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False


class DiffusionFields(BaseModel):
    """foretell's extra body fields (``extra_body=`` in the openai client); see DecodeParams."""

    model_config = STRICT

    gen_length: int | None = None
    steps: int | None = None
    block_length: int | None = None
    remasking: str | None = None
    threshold: float | None = None
    cfg_scale: float | None = None
    constraints: dict[Position, int | str] | None = None
    early_commit: str | dict[str, Any] | None = None
    top_k: int | None = None
    alg_temp: float | None = None
    eps: float | None = None
    kv_cache: str | None = None
    skip_special_tokens: bool | None = None
    confidence_dtype: str | None = None
    logits_eos_inf: bool | None = None
    confidence_eos_eot_inf: bool | None = None
    # vLLM's stop_token_ids / ignore_eos; LLaDA2's eos_early_stop / minimal_topk.
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    eos_early_stop: bool | None = None
    minimal_topk: int | None = None
    block_cache: bool | None = None
    # Streaming only: also send a chunk every step carrying the whole canvas (masks shown).
    stream_canvas: bool = False

    # OpenAI fields shared by both endpoints.
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        """Refuse OpenAI options that would be silently wrong for a diffusion decoder."""
        if self.n not in (None, 1):
            raise APIError(f"n: only n=1 is supported, got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(f"{name}: not supported by diffusion decoding", param=name)
        if self.logit_bias:
            raise APIError("logit_bias: not supported", param="logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in stops):
            # Every step of a stream checks each stop string against the text: bounded work.
            raise APIError(
                f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
                param="stop",
            )

    def length_field(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens

    def to_params(self, max_gen_length: int | None = None) -> DecodeParams:
        """DecodeParams for this body; an APIError (400) naming the field if invalid. Without
        a length in the body the canvas is DecodeParams' default, or ``max_gen_length`` (the
        server's longest) if that is shorter: a body that names no length is never refused
        for one."""
        self.check_supported()
        length_name, length = self.length_field()
        kwargs: dict[str, Any] = {}
        default = DecodeParams.gen_length
        if length is None and self.gen_length is None and max_gen_length is not None:
            kwargs["gen_length"] = min(default, max_gen_length)
        if length is not None:
            if self.gen_length is not None and self.gen_length != length:
                raise APIError(
                    f"{length_name}: {length} conflicts with gen_length {self.gen_length}",
                    param=length_name,
                )
            kwargs["gen_length"] = length
        for name in (
            "gen_length",
            "steps",
            "block_length",
            "remasking",
            "threshold",
            "cfg_scale",
            "constraints",
            "temperature",
            "top_p",
            "top_k",
            "alg_temp",
            "eps",
            "kv_cache",
            "seed",
            "skip_special_tokens",
            "confidence_dtype",
            "logits_eos_inf",
            "confidence_eos_eot_inf",
            "stop_token_ids",
            "ignore_eos",
            "eos_early_stop",
            "minimal_topk",
            "block_cache",
        ):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.constraints is not None:
            kwargs["constraints"] = {int(pos): v for pos, v in self.constraints.items()}
        if "early_commit" in self.model_fields_set:
            kwargs["early_commit"] = self.early_commit
        if self.stop is not None:
            kwargs["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        rename = {"gen_length": length_name} if self.gen_length is None else None
        try:
            return DecodeParams(**kwargs)
        except (ValueError, TypeError) as err:
            if isinstance(err, TypeError) or not FIELD_RE.match(str(err)):
                # Only the policy's own conversions fail without naming a field, e.g.
                # early_commit={"thresholds": 3}.
                err = ValueError(f"early_commit: {err}")
            raise APIError.from_value_error(err, rename) from None


class CompletionRequest(DiffusionFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError("echo: not supported", param="echo")
        if self.logprobs is not None:
            raise APIError("logprobs: not supported", param="logprobs")
        if self.best_of not in (None, 1):
            raise APIError(f"best_of: only 1 is supported, got {self.best_of}", param="best_of")
        if self.suffix:
            raise APIError("suffix: not supported (no infilling endpoint)", param="suffix")

    def prompts(self) -> list[str | list[int]]:
        """One prompt per choice: OpenAI's batch forms (a list of texts or of id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError("prompt: is empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Clients echo back e.g. refusal=None.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(DiffusionFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise APIError("logprobs: not supported", param="logprobs")
        if self.top_logprobs not in (None, 0):  # 0 asks for none: the neutral value
            raise APIError("top_logprobs: not supported (only 0)", param="top_logprobs")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise APIError(
                "max_completion_tokens: conflicts with max_tokens",
                param="max_completion_tokens",
            )

    def length_field(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """Messages as the tokenizer's chat template expects them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


# -- responses ----------------------------------------------------------------------------
def finish_reason(out: RequestOutput, handle: RequestHandle, engine: AsyncEngine) -> str:
    """OpenAI's finish_reason: "stop" when the model ended its text inside the canvas (an EOS
    token, or a stop string), "length" when it filled the canvas; "abort"/"error" otherwise."""
    if out.finish_reason == "aborted":
        return "abort"
    if out.finish_reason == "error":
        return "error"
    if out.finish_reason == "stop":  # a stop id ended a block-causal generation
        return "stop"
    eos = set(getattr(engine.engine.model, "eos_token_ids", ()) or ())
    return "stop" if handle.stop_hit or eos & set(out.token_ids) else "length"


def diffusion_info(out: RequestOutput) -> dict[str, Any]:
    """The ``foretell`` object of a choice: how the diffusion decoder finished."""
    return {
        "finish_reason": out.finish_reason,
        "num_forward_passes": out.num_forward_passes,
        "committed_early": out.committed_early,
        "commit_step": out.commit_step,
    }


def usage(outputs: list[RequestOutput]) -> dict[str, int]:
    """OpenAI's usage object; the completion is the whole canvas."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def failure_message(error: str | None) -> str:
    """What a client is told of a failed request: the stage that failed, not the exception
    text (which may hold allocator or library internals); the server log has the details."""
    stage = (error or "").split(":", 1)[0].strip()
    if stage not in ("forward pass failed", "decoding failed"):
        stage = "internal error"
    return f"generation failed: {stage} (see the server log)"


def check_outputs(outputs: list[RequestOutput]) -> None:
    """Raise the APIError (500 or 503) a failed or aborted output is answered with."""
    for out in outputs:
        if out.finish_reason == "error":
            logger.warning("request %s failed: %s", out.request_id, out.error)
            message = failure_message(out.error)
            raise APIError(message, status=500, type="server_error", code="error")
        if out.finish_reason == "aborted":
            raise APIError(
                "request aborted (server shutting down?)",
                status=503,
                type="server_error",
                code="aborted",
            )


def prompt_error(err: ValueError, rename: dict[str, str] | None = None) -> APIError:
    """A 400 for a refused prompt; a batch's ``prompts[i]: prompt: why`` becomes
    ``prompt[i]: why`` (OpenAI's field is ``prompt``)."""
    if str(err).startswith("prompts: "):  # the batch as a whole
        return APIError(f"prompt: {str(err)[len('prompts: ') :]}", param="prompt")
    match = re.match(r"^prompts\[(\d+)\]: (.*)$", str(err), re.S)
    if match is None:
        return APIError.from_value_error(err, rename)
    index, inner = match.groups()
    api = APIError.from_value_error(ValueError(inner), rename)
    if api.param == "prompt":
        return APIError(f"prompt[{index}]: {inner[len('prompt: ') :]}", param="prompt")
    return api
