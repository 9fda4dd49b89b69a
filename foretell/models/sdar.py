"""SDAR (JetAstra/SDAR, ``SDARForCausalLM``): Qwen3 blocks under a block-causal mask.

Qwen3's layout: per-head RMSNorm of q and k (over ``head_dim``) before the rotary embedding,
grouped-query attention, an explicit ``head_dim`` (SDAR-4B: 2560 wide, 32 heads of 128), an
untied head. SDAR's RMSNorm is flash-attn's fused kernel: it normalises *and* multiplies by the
weight in float32 and casts once, unlike Qwen3/LLaMA, which cast before the weight; in bf16 the
two differ, so every norm of this family (layers, q/k, final) uses :class:`SDARRMSNorm`.

The released checkpoints decode in blocks of ``block_size`` (4) with ``mask_token_id`` 151669.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from foretell.models.block_causal import (
    Attend,
    BlockCausalLM,
    SwiGLU,
    apply_rotary,
    resolve_special_ids,
)
from foretell.models.config_keys import resolve_config

# configuration_sdar.SDARConfig's defaults (block_size and mask_token_id are not in the class;
# their defaults are the released checkpoints' values).
DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "block_size": 4,
    "hidden_act": "silu",
    "rope_scaling": None,
}
DEFAULT_MASK_ID = 151669
DEFAULT_EOS_IDS = (151645, 151643)  # the released generation_config.json: <|im_end|>, <|endoftext|>
HONOURED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "attention_bias",
    "block_size",
    "mask_token_id",
)
REQUIRED = {
    "hidden_act": ("silu",),
    "rope_scaling": (None, {"rope_type": "default"}, {"type": "default"}),
}
IGNORED = {
    "max_position_embeddings": "the longest sequence, checked at admission",
    "use_sliding_window": "SDAR's attention computes a window but never applies it",
    "sliding_window": "SDAR's attention computes a window but never applies it",
    "max_window_layers": "read only for the (unapplied) sliding window",
    "initializer_range": "initialisation",
    "attention_dropout": "dropout, training only",
    "fuse_cross_entropy": "training loss kernel",
    "micro_forward": "training option",
    "skip_checkpoint": "training (activation checkpointing) option",
    "debug": "training option",
    "ep_size": "expert-parallel training option",
    "use_deepep": "expert-parallel training option",
}


@dataclass
class SDARConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd; the rotary embedding needs pairs")


class SDARRMSNorm(nn.Module):
    """RMSNorm with the weight applied in float32 before the single cast back (flash-attn's
    ``rms_norm_fn``, which SDAR's released modeling file calls)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


class SDARAttention(nn.Module):
    def __init__(self, cfg: SDARConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.attention_bias)
        self.q_norm = SDARRMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = SDARRMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend):
        b, n = h.shape[:2]
        q = self.q_norm(self.q_proj(h).view(b, n, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(h).view(b, n, self.num_kv_heads, self.head_dim))
        v = self.v_proj(h).view(b, n, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(attend(q, k, v).reshape(b, n, -1))


class SDARLayer(nn.Module):
    def __init__(self, cfg: SDARConfig) -> None:
        super().__init__()
        self.input_layernorm = SDARRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SDARAttention(cfg)
        self.post_attention_layernorm = SDARRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


_LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


class SDARModel(BlockCausalLM):
    family = "sdar"
    architecture = "SDARForCausalLM"
    official_threshold = 0.85  # generate.py's low_confidence_dynamic default
    weight_names = (
        ("model.embed_tokens.weight", "embed.weight"),
        *((f"model.layers.{{i}}.{t}", f"layers.{{i}}.{t}") for t in _LAYER_TENSORS),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    )

    def __init__(
        self,
        cfg: SDARConfig,
        *,
        block_size: int,
        mask_token_id: int,
        eos_token_ids: tuple[int, ...] = (),
        hf_config: dict | None = None,
    ) -> None:
        super().__init__(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            block_size=block_size,
            mask_token_id=mask_token_id,
            eos_token_ids=eos_token_ids,
            tie_embeddings=cfg.tie_embeddings,
            hf_config=hf_config,
        )
        self.config = cfg
        self.rotary_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.layers = nn.ModuleList(SDARLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = SDARRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @classmethod
    def from_checkpoint_config(
        cls,
        hf: dict,
        *,
        tokenizer: object | None = None,
        generation_config: dict | None = None,
        ignore_unknown_keys: bool = False,
    ) -> SDARModel:
        c = resolve_config(
            "SDAR",
            hf,
            honoured=HONOURED,
            required=REQUIRED,
            ignored=IGNORED,
            defaults=DEFAULTS,
            ignore_unknown=ignore_unknown_keys,
        )
        try:
            heads = int(c["num_attention_heads"])
            kv_heads = c["num_key_value_heads"]
            cfg = SDARConfig(
                vocab_size=int(c["vocab_size"]),
                hidden_size=int(c["hidden_size"]),
                intermediate_size=int(c["intermediate_size"]),
                num_layers=int(c["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=heads if kv_heads is None else int(kv_heads),
                head_dim=int(c["head_dim"]),
                rms_norm_eps=float(c["rms_norm_eps"]),
                rope_theta=float(c["rope_theta"]),
                attention_bias=bool(c["attention_bias"]),
                tie_embeddings=bool(c["tie_word_embeddings"]),
            )
            block_size = int(c["block_size"])
        except (TypeError, KeyError) as err:
            raise ValueError(f"config.json: SDAR config is invalid: {err}") from None
        mask, eos = resolve_special_ids(
            hf,
            tokenizer,
            generation_config,
            vocab_size=cfg.vocab_size,
            default_mask=DEFAULT_MASK_ID,
            default_eos=DEFAULT_EOS_IDS,
        )
        return cls(cfg, block_size=block_size, mask_token_id=mask, eos_token_ids=eos, hf_config=hf)

    def checkpoint_config(self) -> dict:
        c = self.config
        out = dict(self.hf_config)
        out.update(
            {
                "architectures": [self.architecture],
                "model_type": "sdar",
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads,
                "head_dim": c.head_dim,
                "rms_norm_eps": c.rms_norm_eps,
                "rope_theta": c.rope_theta,
                "attention_bias": c.attention_bias,
                "tie_word_embeddings": c.tie_embeddings,
                "hidden_act": "silu",
                "block_size": self.block_size,
                "mask_token_id": self.mask_token_id,
                "eos_token_id": self.eos_token_ids[0] if self.eos_token_ids else None,
            }
        )
        return out
