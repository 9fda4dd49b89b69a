"""Decoding rules: reveal schedules, remasking, and Prophet early commit; per request
(``advance``) and, for every batchable request, for a whole pass at once (``BatchedStep``)."""

from foretell.decoding.step import advance, positions_needed

__all__ = ["advance", "positions_needed"]
