"""The decoding the shipped model was trained for, as DecodeParams."""

from __future__ import annotations

from foretell.params import DecodeParams, Prophet


def default_decode_params(tokenizer: object) -> DecodeParams:
    """Full decoding of the default model's layout: the ``answer:`` marker forced by
    constraints, so that Prophet (when switched on) knows the answer span."""
    from foretell.models.default import (
        BLOCK_LENGTH,
        GEN_LENGTH,
        STEPS,
        answer_constraints,
    )

    return DecodeParams(
        gen_length=GEN_LENGTH,
        block_length=BLOCK_LENGTH,
        steps=STEPS,
        constraints=answer_constraints(tokenizer),
    )


def default_prophet() -> Prophet:
    """Prophet over the default model's answer span (the reference's placement)."""
    from foretell.models.default import ANSWER_START, PROPHET_ANSWER_LENGTH

    return Prophet(answer_start=ANSWER_START, answer_length=PROPHET_ANSWER_LENGTH)
