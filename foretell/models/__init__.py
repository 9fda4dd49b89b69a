"""Model families (LLaDA, Dream), the attention interface and checkpoint loading."""

from foretell.models.dream import DreamModel
from foretell.models.llada import LLaDAModelLM
from foretell.models.registry import LoadedModel, load_model, save_model
from foretell.models.transformer import DiffusionLM, TransformerConfig

__all__ = [
    "DiffusionLM",
    "DreamModel",
    "LLaDAModelLM",
    "LoadedModel",
    "TransformerConfig",
    "load_model",
    "save_model",
]
