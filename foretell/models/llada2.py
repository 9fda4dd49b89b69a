"""LLaDA2.x MoE (inclusionAI, ``LLaDA2MoeModelLM``): a block-causal mixture of experts.

- Attention: one fused ``query_key_value`` projection, per-head RMSNorm of q and k, rotary on
  the first ``head_dim * partial_rotary_factor`` features only, grouped-query attention,
  output projection ``dense`` (with a bias when ``use_bias``).
- Feed-forward: a dense SwiGLU in the first ``first_k_dense_replace`` layers, then a mixture of
  experts: a sigmoid router computed in float32, ``expert_bias`` added for *selection only*,
  group-limited top-k (the ``topk_group`` best of ``n_group`` expert groups, a group scored by
  the sum of its two best biased scores), the chosen unbiased scores normalised to sum 1 and
  scaled by ``routed_scaling_factor``, plus ``num_shared_experts`` shared experts (one SwiGLU of
  that many times ``moe_intermediate_size``).
- RMSNorm as LLaMA's (normalise in float32, cast, then the weight); logits cast to float32.

Checkpoints store the experts either one tensor per expert, as the released Hugging Face models
do (``mlp.experts.{e}.gate_proj.weight``), or stacked, as dFactory's training format does
(``mlp.experts.gate_proj``); both load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from foretell.models.block_causal import (
    Attend,
    BlockCausalLM,
    SwiGLU,
    apply_rotary,
    resolve_special_ids,
    swiglu,
)
from foretell.models.config_keys import resolve_config
from foretell.models.transformer import RMSNorm

# configuration_llada2_moe.LLaDA2MoeConfig's defaults; block_size is foretell's (the official
# decoder's default block_length: the config has no block size).
DEFAULTS = {
    "vocab_size": 30592,
    "hidden_size": 1024,
    "intermediate_size": None,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 0,
    "head_dim": None,
    "use_qkv_bias": False,
    "use_bias": True,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "num_experts": 16,
    "num_shared_experts": 0,
    "num_experts_per_tok": 2,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "moe_intermediate_size": None,
    "first_k_dense_replace": 0,
    "partial_rotary_factor": 0.5,
    "block_size": 32,
    "norm_head": False,
    "norm_topk_prob": True,
    "score_function": "sigmoid",
    "router_dtype": "fp32",
    "use_rmsnorm": True,
    "norm_softmax": False,
    "moe_router_enable_expert_bias": True,
    "using_split_qkv_in_self_attention": False,
}
DEFAULT_MASK_ID = 156895  # the model card's generate(mask_id=...)
DEFAULT_EOS_IDS = (156892,)  # generate(eos_id=...)
HONOURED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "use_qkv_bias",
    "use_bias",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "num_experts",
    "num_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "moe_intermediate_size",
    "first_k_dense_replace",
    "partial_rotary_factor",
    "rotary_dim",
    "block_size",
    "mask_token_id",
)
# Implemented for these values only. The official code never reads most of them and behaves as
# the value given here; a checkpoint that says otherwise was made for other code.
REQUIRED = {
    "hidden_act": ("silu",),
    "rope_scaling": (None, {"rope_type": "default"}, {"type": "default"}),
    "norm_head": (False,),
    "norm_topk_prob": (True,),
    "score_function": ("sigmoid",),
    "router_dtype": ("fp32",),
    "use_rmsnorm": (True,),
    "norm_softmax": (False,),
    "moe_router_enable_expert_bias": (True,),
    "using_split_qkv_in_self_attention": (False,),
}
IGNORED = {
    "max_position_embeddings": "the longest sequence, checked at admission",
    "use_sliding_window": "the official attention has no sliding window",
    "sliding_window": "the official attention has no sliding window",
    "max_window_layers": "the official attention has no sliding window",
    "use_qk_norm": "the official attention always normalises q and k",
    "embedding_dropout": "dropout, training only",
    "attention_dropout": "dropout, training only",
    "output_dropout": "dropout, training only",
    "initializer_range": "initialisation",
    "output_router_logits": "router logits for the training loss",
}


@dataclass
class LLaDA2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    num_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    moe_intermediate_size: int
    num_shared_experts: int = 0
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    dense_bias: bool = True
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary dim {self.rotary_dim} is not an even size <= head_dim")
        if self.n_group <= 0 or self.num_experts % self.n_group:
            raise ValueError(f"num_experts {self.num_experts} is not a multiple of n_group")
        if self.num_experts // self.n_group < 2:
            raise ValueError("n_group: a group needs at least 2 experts (scored by its top 2)")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group {self.topk_group} is not in [1, n_group]")
        reachable = self.topk_group * (self.num_experts // self.n_group)
        if not 0 < self.num_experts_per_tok <= reachable:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} is not in [1, {reachable}] "
                "(the experts of topk_group groups)"
            )


def route(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(experts [T, top_k], weights [T, top_k] float32)`` for tokens ``hidden`` ``[T, H]``.

    The official gate: float32 logits and sigmoid scores; the bias (in the model's dtype, as the
    official buffer is) shifts the scores used to pick groups and experts, never the weights.
    """
    scores = torch.sigmoid(F.linear(hidden.float(), gate_weight.float()))
    biased = scores + expert_bias
    t, e = biased.shape
    group_best = biased.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    groups = group_best.topk(topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_best, dtype=torch.bool).scatter_(1, groups, True)
    keep = keep[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
    experts = biased.masked_fill(~keep, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return experts, weights * scaling


def run_experts(
    hidden: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    gate_proj: torch.Tensor,
    up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The weighted sum of each token's chosen experts, ``[T, H]`` in ``hidden``'s dtype.

    Token-expert pairs are sorted by expert so that each expert runs once over all its tokens
    (one SwiGLU per expert that has tokens; never a loop over tokens). As the official
    ``moe_infer``, the outputs are weighted and summed in float32 (float64 for a float64
    model), then cast back.
    """
    t, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    rows = hidden[order // k]
    counts = torch.bincount(flat, minlength=gate_proj.shape[0]).tolist()
    out = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = slice(start, start + n)
            out[seg] = swiglu(rows[seg], gate_proj[e], up_proj[e], down_proj[e])
            start += n
    per_pair = torch.empty_like(out)
    per_pair[order] = out
    acc = torch.promote_types(torch.float32, hidden.dtype)
    mixed = (per_pair.view(t, k, -1).to(acc) * weights[..., None].to(acc)).sum(1)
    return mixed.to(hidden.dtype)


class Gate(nn.Module):
    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # A buffer in the official code; a (frozen) parameter here so that it loads like one.
        self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)


class Experts(nn.Module):
    """Every routed expert's SwiGLU weights, stacked along the first dimension."""

    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))


class SparseMoE(nn.Module):
    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = None
        if cfg.num_shared_experts:
            self.shared_experts = SwiGLU(
                cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        flat = x.reshape(-1, x.shape[-1])
        experts, weights = route(
            flat,
            self.gate.weight,
            self.gate.expert_bias,
            top_k=c.num_experts_per_tok,
            n_group=c.n_group,
            topk_group=c.topk_group,
            scaling=c.routed_scaling_factor,
        )
        e = self.experts
        y = run_experts(flat, experts, weights, e.gate_proj, e.up_proj, e.down_proj).view_as(x)
        return y if self.shared_experts is None else y + self.shared_experts(x)


class LLaDA2Attention(nn.Module):
    def __init__(self, cfg: LLaDA2Config) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        width = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, width, bias=cfg.qkv_bias)
        self.query_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.dense = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.dense_bias)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend):
        b, n = h.shape[:2]
        qkv = self.query_key_value(h).view(b, n, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q = apply_rotary(self.query_layernorm(q), cos, sin)
        k = apply_rotary(self.key_layernorm(k), cos, sin)
        return self.dense(attend(q, k, v).reshape(b, n, -1))


class LLaDA2Layer(nn.Module):
    def __init__(self, cfg: LLaDA2Config, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = LLaDA2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        dense = index < cfg.first_k_dense_replace
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size) if dense else SparseMoE(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


_ATTENTION_TENSORS = (
    "input_layernorm.weight",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "attention.query_layernorm.weight",
    "attention.key_layernorm.weight",
    "attention.dense.weight",
    "attention.dense.bias",
    "post_attention_layernorm.weight",
)
_MLP_TENSORS = (
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "mlp.gate.weight",
    "mlp.gate.expert_bias",
    "mlp.experts.gate_proj",
    "mlp.experts.up_proj",
    "mlp.experts.down_proj",
    "mlp.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight",
)
# One expert's tensor in the released (per-expert) layout.
_EXPERT_TENSOR = re.compile(
    r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
)


class LLaDA2Model(BlockCausalLM):
    family = "llada2"
    architecture = "LLaDA2MoeModelLM"
    argmax_of_probs = True  # its generate takes the argmax of the float32 probabilities
    official_threshold = 0.95  # its generate always runs the threshold rule
    weight_names = (
        ("model.word_embeddings.weight", "embed.weight"),
        *((f"model.layers.{{i}}.{t}", f"layers.{{i}}.{t}") for t in _ATTENTION_TENSORS),
        *((f"model.layers.{{i}}.{t}", f"layers.{{i}}.{t}") for t in _MLP_TENSORS),
        ("model.norm.weight", "norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    )

    def __init__(
        self,
        cfg: LLaDA2Config,
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
        self.rotary_dim, self.rope_theta = cfg.rotary_dim, cfg.rope_theta
        self.layers = nn.ModuleList(LLaDA2Layer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head in the model's dtype, then float32, as the official ``forward`` returns."""
        return super().lm_logits(hidden).float()

    # -- checkpoint layout: experts one tensor each, or stacked ---------------------------
    def checkpoint_target(self, name: str) -> tuple[str, int | None] | None:
        m = _EXPERT_TENSOR.fullmatch(name)
        if m is not None:
            layer, expert, proj = m.groups()
            return f"layers.{layer}.mlp.experts.{proj}", int(expert)
        return super().checkpoint_target(name)

    def checkpoint_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The released layout: each routed expert's projections as tensors of their own."""
        out = {}
        for name, p in self.named_parameters():
            tensor = p.detach().to(dtype or p.dtype).cpu()
            m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(\w+)", name)
            if m is None:
                out[self.to_checkpoint_name(name)] = tensor.contiguous()
                continue
            layer, proj = m.groups()
            for e in range(tensor.shape[0]):
                key = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                out[key] = tensor[e].contiguous()
        return out

    @classmethod
    def from_checkpoint_config(
        cls,
        hf: dict,
        *,
        tokenizer: object | None = None,
        generation_config: dict | None = None,
        ignore_unknown_keys: bool = False,
    ) -> LLaDA2Model:
        c = resolve_config(
            "LLaDA2",
            hf,
            honoured=HONOURED,
            required=REQUIRED,
            ignored=IGNORED,
            defaults=DEFAULTS,
            ignore_unknown=ignore_unknown_keys,
        )
        try:
            hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            head_dim = int(c["head_dim"] or hidden // heads)
            rotary_dim = int(head_dim * float(c["partial_rotary_factor"]))
            if c.get("rotary_dim") is not None and int(c["rotary_dim"]) != rotary_dim:
                raise ValueError(
                    f"config.json: LLaDA2 rotary_dim {c['rotary_dim']} disagrees with "
                    f"head_dim * partial_rotary_factor = {rotary_dim}"
                )
            moe_size = c["moe_intermediate_size"]
            cfg = LLaDA2Config(
                vocab_size=int(c["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(c["intermediate_size"] or 0),
                num_layers=int(c["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(c["num_key_value_heads"]),
                head_dim=head_dim,
                rotary_dim=rotary_dim,
                num_experts=int(c["num_experts"]),
                num_experts_per_tok=int(c["num_experts_per_tok"]),
                n_group=int(c["n_group"]),
                topk_group=int(c["topk_group"]),
                moe_intermediate_size=int(moe_size or 0),
                num_shared_experts=int(c["num_shared_experts"] or 0),
                routed_scaling_factor=float(c["routed_scaling_factor"]),
                first_k_dense_replace=int(c["first_k_dense_replace"]),
                rms_norm_eps=float(c["rms_norm_eps"]),
                rope_theta=float(c["rope_theta"]),
                qkv_bias=bool(c["use_qkv_bias"]),
                dense_bias=bool(c["use_bias"]),
                tie_embeddings=bool(c["tie_word_embeddings"]),
            )
            block_size = int(c["block_size"])
        except (TypeError, KeyError) as err:
            raise ValueError(f"config.json: LLaDA2 config is invalid: {err}") from None
        if cfg.first_k_dense_replace > 0 and cfg.intermediate_size <= 0:
            raise ValueError("config.json: LLaDA2 dense layers need intermediate_size")
        if cfg.first_k_dense_replace < cfg.num_layers and cfg.moe_intermediate_size <= 0:
            raise ValueError("config.json: LLaDA2 MoE layers need moe_intermediate_size")
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
                "model_type": "llada2_moe",
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads,
                "head_dim": c.head_dim,
                "partial_rotary_factor": c.rotary_dim / c.head_dim,
                "num_experts": c.num_experts,
                "num_experts_per_tok": c.num_experts_per_tok,
                "n_group": c.n_group,
                "topk_group": c.topk_group,
                "moe_intermediate_size": c.moe_intermediate_size,
                "num_shared_experts": c.num_shared_experts,
                "routed_scaling_factor": c.routed_scaling_factor,
                "first_k_dense_replace": c.first_k_dense_replace,
                "rms_norm_eps": c.rms_norm_eps,
                "rope_theta": c.rope_theta,
                "use_qkv_bias": c.qkv_bias,
                "use_bias": c.dense_bias,
                "tie_word_embeddings": c.tie_embeddings,
                "block_size": self.block_size,
                "mask_token_id": self.mask_token_id,
                "eos_token_id": self.eos_token_ids[0] if self.eos_token_ids else None,
            }
        )
        return out
