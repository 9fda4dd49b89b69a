"""What a finished (or streamed) request hands back to the caller."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """The result of one request.

    ``token_ids`` is the generated part of the final canvas (``gen_length`` ids, special
    tokens included), ending after the first stop id when ``stop_token_ids`` (or a
    block-causal model's EOS) hold one, as the official block decoders return it; ``text``
    is its decoding, with special tokens skipped as the params say and cut at the first
    ``stop`` string. ``num_forward_passes`` counts the steps this request took
    part in; ``commit_step`` is the step at which Prophet committed (None if it did not; for a
    block-causal model, the step of the latest block it committed).
    """

    request_id: str
    prompt: object
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    num_forward_passes: int
    # "steps" | "early_commit" | "stop" (a block-causal stop id) | "aborted" | "error";
    # None: running
    finish_reason: str | None
    committed_early: bool = False
    commit_step: int | None = None
    # Prophet's gap statistic at the last step it was measured (LLaDA and Dream's mean: summed
    # in float64; docs/guide.md)
    last_gap: float | None = None
    error: str | None = None
    stop_string: str | None = None  # the ``stop`` string that cut ``text``, if one did
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    finished_time: float | None = None
    revealed: list[int] = field(default_factory=list)  # positions revealed in the last step

    def summary(self, token_ids: bool = False) -> dict:
        """The fields a bulk job writes per row (JSONL, Parquet), token ids if asked."""
        row: dict = {"text": self.text}
        if token_ids:
            row["token_ids"] = self.token_ids
        row.update(
            num_forward_passes=self.num_forward_passes,
            committed_early=self.committed_early,
            commit_step=self.commit_step,
            finish_reason=self.finish_reason,
            error=self.error,
        )
        return row

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to finish."""
        if self.finished_time is None or self.arrival_time is None:
            return None
        return self.finished_time - self.arrival_time
