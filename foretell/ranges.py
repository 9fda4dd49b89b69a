"""Integer ranges laid end to end: how a batch's per-request spans become one index array."""

from __future__ import annotations

import numpy as np


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The integers of every ``[starts[i], ends[i])`` in order, as one array: a batch's rows
    in a fixed number of NumPy calls, not one ``arange`` per request."""
    lens = ends - starts
    first = lens.cumsum() - lens  # where each range begins in the result
    # (array methods, not their ``np.`` functions: no Python-level call)
    return (starts - first).repeat(lens) + np.arange(int(lens.sum()))
