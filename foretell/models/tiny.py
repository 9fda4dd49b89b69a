"""Tiny randomly initialised models of each family, for tests, examples and benchmarks.

No weights can be downloaded in CI, so every test builds its models here: real architectures,
real checkpoint format, random (seeded) weights. The output head is scaled up so that logits
spread over a useful range (top-1 minus top-2 gaps of several units), as a trained model's do;
otherwise decoding rules and Prophet's thresholds would see nothing but near-ties.
"""

from __future__ import annotations

import math
import string

import torch

from foretell.models.dream import DreamModel
from foretell.models.llada import LLaDAModelLM
from foretell.models.registry import LoadedModel, resolve_dtype
from foretell.models.sdar import SDARConfig, SDARModel
from foretell.models.tokenizer import build_char_tokenizer
from foretell.models.transformer import TransformerConfig

TINY_ALPHABET = string.ascii_lowercase + string.digits + " +-*=:.,?!\n"
FAMILIES = {"llada": LLaDAModelLM, "dream": DreamModel, "sdar": SDARModel}


def tiny_model(
    family: str = "llada",
    *,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    logit_scale: float = 8.0,
    block_size: int = 4,
) -> LoadedModel:
    """A seeded random model with a character tokenizer (vocabulary of about 50 tokens).
    ``block_size``: a block-causal family's (SDAR) block."""
    if family not in FAMILIES:
        raise ValueError(f"family: unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
    )
    special = dict(mask_token_id=tokenizer.mask_token_id, eos_token_ids=(tokenizer.eos_token_id,))
    if family == "sdar":
        sdar = SDARConfig(**shape, head_dim=hidden_size // num_heads)
        model = SDARModel(sdar, block_size=block_size, **special)
    else:
        cfg = TransformerConfig(
            **shape,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            qkv_bias=family == "dream",
            rope_full_precision=family == "llada",  # LLaDA-8B's setting; Dream has none
        )
        model = FAMILIES[family](cfg, **special)
    return _randomised(model, tokenizer, seed, dtype, logit_scale)


def _randomised(
    model: torch.nn.Module, tokenizer: object, seed: int, dtype: str | torch.dtype, scale: float
) -> LoadedModel:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        model.lm_head.weight.mul_(scale)
    model = model.to(resolve_dtype(dtype)).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, path=None)


def build_default_model(
    tokenizer: object,
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 384,
) -> LLaDAModelLM:
    """A LLaDA-architecture model of the shipped default's shape with small-transformer init
    (std 0.02, residual projections scaled by 1/sqrt(2 layers)), drawn from torch's global
    generator: what training starts from, and the random stand-in the benchmarks use."""
    cfg = TransformerConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        rope_full_precision=True,  # LLaDA's default (a no-op in float32)
    )
    model = LLaDAModelLM(
        cfg,
        mask_token_id=tokenizer.mask_token_id,  # type: ignore[attr-defined]
        eos_token_ids=(tokenizer.eos_token_id,),  # type: ignore[attr-defined]
    )
    init_weights(model, layers)
    return model


def init_weights(model: torch.nn.Module, layers: int) -> None:
    """GPT-2-style initialisation for training from scratch: normal(0, 0.02) weights, the
    residual projections scaled by 1/sqrt(2 * layers), norms left at one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * layers)
            p.normal_(0.0, std)
