"""Bulk generation on Ray Data: one foretell engine per replica (``pip install 'foretell[ray]'``).

See docs/distributed.md. Nothing here imports Ray until it is used.
"""

from foretell.distributed.dataset import generate_dataset
from foretell.distributed.predictor import OUTPUT_COLUMNS, EnginePredictor

__all__ = ["OUTPUT_COLUMNS", "EnginePredictor", "generate_dataset"]
