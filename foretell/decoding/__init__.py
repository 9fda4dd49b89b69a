"""Per-request decoding rules: reveal schedules, remasking, and Prophet early commit."""

from foretell.decoding.step import advance, positions_needed

__all__ = ["advance", "positions_needed"]
