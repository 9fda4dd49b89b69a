"""Adapters that let other tools drive foretell (each needs its own extra)."""
