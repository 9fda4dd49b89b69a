"""The bidirectional transformer body that LLaDA and Dream share (LLaMA-style blocks).

Both families are RMSNorm + rotary + SwiGLU blocks with (grouped) multi-head attention and no
causal mask; they differ in weight names, q/k/v biases and whether logits are shifted. The
families (``llada.py``, ``dream.py``) map their checkpoint formats onto this one body, so that
the numerics live in one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from foretell.models.attention import (
    CacheUse,
    KVPlan,
    PoolUses,
    packed_attention,
    padded_attention,
    plan_kv,
    pool_uses,
    resolve_backend,
)


@dataclass
class TransformerConfig:
    """Shape of the body; the family-specific config.json is translated into this."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    # LLaDA's ``rope_full_precision``: rotate q and k in float32 and cast back (whatever the
    # model's dtype). False: rotate in the model's dtype with float32 angles cast to it, as
    # Qwen2/Dream and LLaDA with the option off do.
    rope_full_precision: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    """A config's token-id field (one id, a list, or null) as a tuple."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model's dtype (float64 included), as both
        # reference implementations do, then scale in the model's dtype.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding in the rotate-half layout used by LLaMA, LLaDA and Qwen2.

    The angles' cosines and sines are computed in float32 for positions ``[0, length)`` in one
    piece, as LLaDA's ``RotaryEmbedding`` builds its table, and looked up by position; the
    caller casts them to the dtype it rotates in.
    """

    def __init__(self, head_dim: int, theta: float, min_length: int = 0) -> None:
        super().__init__()
        self.head_dim, self.theta, self.min_length = head_dim, theta, min_length
        # Not a buffer: the table is cheap to build and then survives meta-device construction.
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(cos, sin)`` of shape ``[>= length, head_dim]`` on ``device``. Its length is
        a multiple of 64 (and at least ``min_length``), so that every element is computed by the
        same vectorised kernel as in a reference table of the checkpoint's maximum length."""
        cached = self._table
        if cached is None or cached[0].shape[0] < length or cached[0].device != device:
            n = -(-max(length, self.min_length) // 64) * 64
            steps = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device)
            inv_freq = 1.0 / (self.theta ** (steps / self.head_dim))
            freqs = torch.arange(n, dtype=torch.float, device=device)[:, None] * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cached = self._table = (emb.cos(), emb.sin())
        return cached

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, span: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """``(cos, sin)`` at ``positions`` in ``dtype``. Every position is smaller than
        ``span``, by default the positions' last dimension (a packed canvas is no longer than
        the pack, a padded row no longer than the row): the table is sized without reading a
        value from the device."""
        cos, sin = self.table(positions.shape[-1] if span is None else span, positions.device)
        return cos[positions].to(dtype), sin[positions].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


# attend(q [..., H, D], k, v) -> [..., H, D], closing over the batch layout (packed or padded).
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# attend_at(layer) -> that layer's AttendFn (a KV cache is per layer).
AttendAt = Callable[[int], AttendFn]


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        h = self.attn_norm(x)
        q = self.q_proj(h).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(h).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(h).view(*lead, self.num_kv_heads, self.head_dim)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        # In the angles' dtype (float32 with rope_full_precision), then back.
        q = _apply_rotary(q.to(cos.dtype), cos, sin).to(v.dtype)
        k = _apply_rotary(k.to(cos.dtype), cos, sin).to(v.dtype)
        x = x + self.o_proj(attend(q, k, v).reshape(*lead, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class CheckpointNames:
    """Maps checkpoint tensor names to parameter names through ``weight_names`` templates.

    Shared by every family (full-attention and block-causal), so that the loader in
    ``registry.py`` reads any of them the same way.
    """

    # (checkpoint name, internal name) templates; "{i}" stands for a layer index.
    weight_names: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def _match(template: str, name: str) -> dict[str, str] | None:
        pattern = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
        m = re.fullmatch(pattern, name)
        return None if m is None else m.groupdict()

    @classmethod
    def to_internal_name(cls, name: str) -> str | None:
        """Internal parameter name for a checkpoint tensor name (None: not one of ours)."""
        for checkpoint, internal in cls.weight_names:
            groups = cls._match(checkpoint, name)
            if groups is not None:
                return internal.format(**groups)
        return None

    @classmethod
    def to_checkpoint_name(cls, internal_name: str) -> str:
        for checkpoint, internal in cls.weight_names:
            groups = cls._match(internal, internal_name)
            if groups is not None:
                return checkpoint.format(**groups)
        raise KeyError(f"no checkpoint name for parameter {internal_name!r}")

    def checkpoint_target(self, name: str) -> tuple[str, int | None] | None:
        """Where a checkpoint tensor goes: (parameter name, index along its first dimension,
        or None for the whole parameter); None: not one of ours. Families whose checkpoints
        store one parameter as several tensors (an MoE's experts) override it."""
        internal = self.to_internal_name(name)
        return None if internal is None else (internal, None)

    def checkpoint_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The model's tensors under their checkpoint names, as the family's code saves them."""
        return {
            self.to_checkpoint_name(name): p.detach().to(dtype or p.dtype).contiguous().cpu()
            for name, p in self.named_parameters()  # type: ignore[attr-defined]
        }


class DiffusionLM(CheckpointNames, nn.Module):
    """A loaded diffusion LM: the transformer body plus what decoding needs to know about it.

    Two entry points:
    - ``forward(input_ids [B, L], attention_mask=None)`` returns the raw logits ``[B, L, V]``
      exactly as the family's Hugging Face model does (for Dream that means *unshifted*).
    - ``forward_packed`` + ``logits_at`` run many canvases packed into one flat tensor and give
      logits only where asked, already aligned: row ``i`` is the prediction *for* the position
      asked (Dream's one-position shift is applied here).

    Subclasses set ``family``, ``shifted_logits`` and the weight-name mapping.
    """

    family: str = "base"
    architecture: str = "DiffusionLM"
    shifted_logits: bool = False
    # Attention is bidirectional over the whole canvas (block-causal families set True).
    block_causal: bool = False

    def __init__(
        self,
        cfg: TransformerConfig,
        *,
        mask_token_id: int,
        eos_token_ids: tuple[int, ...] = (),
        hf_config: dict | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.mask_token_id = mask_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.hf_config = dict(hf_config or {})
        self.attention_backend = "sdpa"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, self.max_length or 0)

    # -- configuration -------------------------------------------------------------------
    def set_attention_backend(self, name: str) -> str:
        weight = self.embed.weight
        self.attention_backend = resolve_backend(name, weight.device, weight.dtype)
        return self.attention_backend

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_length(self) -> int | None:
        """Longest canvas the checkpoint was made for (None: not recorded)."""
        limit = self.hf_config.get("max_sequence_length") or self.hf_config.get(
            "max_position_embeddings"
        )
        return None if limit is None else int(limit)

    # -- whole canvases (HF style) -------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` is ``[B, L]`` (1 for real tokens) or ``[B, L, L]`` (which keys
        each query sees; then ``positions`` ``[B, L]`` are required, since one row's position
        no longer follows from the mask)."""
        if attention_mask is not None and attention_mask.dim() == 3:
            if positions is None:
                raise ValueError("positions: required with a [B, L, L] attention_mask")
        elif positions is None and attention_mask is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            positions = positions.expand_as(input_ids)
        elif positions is None:
            # Left padding: real tokens count positions from 0, as packed sequences do.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # [B, L, H, D] <-> [B, H, L, D]
            out = padded_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask
            )
            return out.transpose(1, 2)

        return self.lm_logits(self._body(input_ids, positions, lambda layer: attend))

    # -- packed canvases (engine) ---------------------------------------------------------
    def forward_packed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        caches: PoolUses | list[CacheUse | None] | None = None,
        kv_storage: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[T, hidden]`` for sequences packed back to back (no padding).

        ``positions`` are canvas positions (rotary angles), so a sequence may be any set of
        positions of its canvas; ``caches`` says which sequences write and read the KV pool
        ``kv_storage`` (``[layers, 2, slots, kv_heads, head_dim]``).
        """
        backend = self.attention_backend
        plan: KVPlan | None = None
        caches = pool_uses(caches)
        if caches is not None and caches.uses_any():
            if kv_storage is None:
                raise ValueError("kv_storage: required when a sequence uses the KV pool")
            varlen = backend in ("flash", "xformers")
            group_masks = backend != "sdpa_buckets"  # it masks its bucket groups itself
            plan = plan_kv(kv_storage, seq_lens, caches, varlen=varlen, group_masks=group_masks)

        def attend_at(layer: int) -> AttendFn:
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return packed_attention(q, k, v, seq_lens, backend, plan, layer)

            return attend

        # A cached span's positions reach to the end of its canvas, past the pack's length.
        span = len(input_ids) if plan is None else max(len(input_ids), plan.span)
        return self._body(input_ids, positions, attend_at, span)

    def logits_at(
        self, hidden: torch.Tensor, positions: torch.Tensor, flat_index: torch.Tensor
    ) -> torch.Tensor:
        """Aligned logits for the packed tokens at ``flat_index`` (the LM head runs only there).

        ``positions`` are the packed tokens' indices within their own sequence (for a whole
        canvas, its positions).
        """
        rows = flat_index
        if self.shifted_logits:
            # Dream predicts position i from position i-1; a sequence's first row reads itself
            # (position 0 of a canvas; the first row of a cached span, as in Fast-dLLM).
            rows = flat_index - (positions[flat_index] > 0).long()
        return self.lm_logits(hidden[rows])

    # -- shared pieces -------------------------------------------------------------------
    def _body(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend_at: AttendAt,
        span: int | None = None,
    ):
        """``span`` bounds the positions (every one is smaller); None: the positions' last
        dimension does (a whole canvas, packed or padded)."""
        x = self.embed(input_ids)
        rope_dtype = torch.float32 if self.config.rope_full_precision else x.dtype
        cos, sin = self.rotary(positions, rope_dtype, span)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, attend_at(layer))
        return self.norm(x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def checkpoint_config(self) -> dict:
        """The family's config.json for this model (see each family)."""
        raise NotImplementedError
