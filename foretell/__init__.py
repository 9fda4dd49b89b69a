"""foretell: a continuous-batching inference engine for diffusion language models.

Prophet early commit turns the steps a dLLM does not need into throughput: each request leaves
the batch the moment its answer has converged, and a waiting request takes its slot.
"""

from foretell.engine import AsyncEngine, Engine, RequestOutput
from foretell.models import load_model
from foretell.params import DecodeParams, Prophet

__version__ = "0.1.0"
__all__ = ["AsyncEngine", "DecodeParams", "Engine", "Prophet", "RequestOutput", "load_model"]
