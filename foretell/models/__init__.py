"""Model families (LLaDA, Dream; block-causal SDAR, LLaDA2), attention and checkpoint loading."""

from foretell.models.block_causal import BlockCausalLM, PastKV
from foretell.models.dream import DreamModel
from foretell.models.llada import LLaDAModelLM
from foretell.models.llada2 import LLaDA2Model
from foretell.models.registry import LoadedModel, load_model, save_model
from foretell.models.sdar import SDARModel
from foretell.models.transformer import DiffusionLM, TransformerConfig

__all__ = [
    "BlockCausalLM",
    "DiffusionLM",
    "DreamModel",
    "LLaDA2Model",
    "LLaDAModelLM",
    "LoadedModel",
    "PastKV",
    "SDARModel",
    "TransformerConfig",
    "load_model",
    "save_model",
]
