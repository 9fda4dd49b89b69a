"""Block-causal ("block diffusion") language models: SDAR and LLaDA2.

Attention is bidirectional inside a block of ``block_size`` positions and causal between blocks.
Blocks are aligned at absolute position 0: position ``p`` belongs to block ``p // block_size``,
and a query sees a key when the key's block is not after the query's. A finished block's keys
and values therefore never change, which is what makes the block KV cache exact.

One forward serves both uses:

- whole sequences, ``forward(input_ids [B, L], attention_mask [B, L])``: the training-style pass
  (and LLaDA2's official decoder, which re-encodes its window every step);
- over cached keys and values, ``forward(input_ids, positions=..., past=PastKV)``: the current
  block's queries attend to the cached keys of earlier blocks plus the current tokens, and with
  ``return_kv=True`` the call also returns the current tokens' keys and values, which the caller
  appends to its cache once those tokens are final (SDAR's "store" pass).

Attention runs through torch's SDPA with an explicit boolean mask, in both entry points:

- ``forward``, padded ``[B, L]`` (training, the tests' reference decoders);
- ``forward_packed``, the engine's: sequences back to back, each a request's rows from the
  first position whose keys its pages do not hold yet to the end of its current block, written
  to and read from the KV pool (:class:`foretell.models.attention.CacheUse` with a
  ``block_size``), so a finished block's store rows and the next block's queries are one pass.

The mask's block is the *decoding* block length, which may differ from the checkpoint's
``block_size`` (SDAR's official decoder builds its mask from its ``block_length`` argument).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from foretell.models.attention import (
    CacheUse,
    PoolUses,
    packed_attention,
    plan_kv,
    pool_uses,
    resolve_backend,
)
from foretell.models.transformer import CheckpointNames, token_ids

# A layer's attention: (q [B, L, heads, D], k, v [B, L, kv_heads, D]) -> [B, L, heads, D], the
# keys and values already normed and rotated; the caller decides what they attend to.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PastKV:
    """Cached keys and values of a batch of sequences, per layer.

    ``keys[l]`` / ``values[l]`` are ``[B, kv_heads, P, head_dim]`` after the q/k norm and the
    rotary embedding, in the model's dtype; ``positions`` ``[B, P]`` are their absolute
    positions, ``-1`` where a row has no key (padding, so sequences of a batch may hold caches
    of different lengths).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.positions.shape[1])

    def cat(self, other: PastKV) -> PastKV:
        """This cache followed by ``other`` (e.g. a finished block's store pass)."""
        return PastKV(
            keys=[torch.cat(p, dim=2) for p in zip(self.keys, other.keys, strict=True)],
            values=[torch.cat(p, dim=2) for p in zip(self.values, other.values, strict=True)],
            positions=torch.cat([self.positions, other.positions], dim=1),
        )

    def prefix(self, n: int) -> PastKV:
        """The first ``n`` cached positions of every row (a pass that stored one block and
        denoised the next keeps only the stored block's keys)."""
        return PastKV(
            keys=[k[:, :, :n] for k in self.keys],
            values=[v[:, :, :n] for v in self.values],
            positions=self.positions[:, :n],
        )

    def select(self, rows: torch.Tensor | list[int]) -> PastKV:
        """The caches of the batch rows ``rows``."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.positions.device)
        return PastKV(
            keys=[k[index] for k in self.keys],
            values=[v[index] for v in self.values],
            positions=self.positions[index],
        )


def block_causal_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``[B, Lq, Lk]`` booleans: query ``i`` may attend to key ``j``.

    A key at a negative position is padding and is seen by no query. A padding query (negative
    position) sees every key, so that its softmax row stays finite; its output is ignored.
    """
    if block_size <= 0:
        raise ValueError(f"block_size: {block_size} is not a positive block length")
    q_block = torch.div(q_positions, block_size, rounding_mode="floor")
    k_block = torch.div(k_positions, block_size, rounding_mode="floor")
    allowed = (k_positions >= 0)[:, None, :] & (k_block[:, None, :] <= q_block[:, :, None])
    return allowed | (q_positions < 0)[:, :, None]


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """SDPA over ``q`` ``[B, Lq, H, D]`` and ``k``/``v`` ``[B, Lk, Hkv, D]`` with grouped heads
    repeated as transformers' ``repeat_kv`` does; returns ``[B, Lq, H, D]``."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[:, None]
    )
    return out.transpose(1, 2)


def rotary_angles(
    positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[..., rotary_dim]`` at ``positions``, computed in float32 from the
    positions themselves (as transformers' default rotary embedding does) and cast to ``dtype``,
    the dtype both official models rotate in."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponents.float() / rotary_dim))
    freqs = positions.clamp(min=0).float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on the first ``cos.shape[-1]`` features of ``x`` ``[B, L, H, D]``
    (all of them for SDAR; LLaDA2's partial rotary leaves the rest as they are)."""
    dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)


class BlockCausalLM(CheckpointNames, nn.Module):
    """A loaded block-causal LM: embeddings, the family's layers, final norm and head.

    Subclasses build ``self.layers`` (each layer is called as ``layer(x, cos, sin, attend) ->
    x``, see :data:`Attend`), set ``self.norm`` and ``self.lm_head``, and give ``rotary_dim``
    and ``rope_theta``.
    """

    family: str = "block-causal"
    architecture: str = "BlockCausalLM"
    block_causal: bool = True
    shifted_logits: bool = False
    # Greedy decoding's token: the argmax of the logits, or (LLaDA2) of the probabilities,
    # which differ only where two logits round to one probability.
    argmax_of_probs: bool = False
    # The official decoder's default: the dynamic schedule at this threshold.
    official_threshold: float

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        block_size: int,
        mask_token_id: int,
        eos_token_ids: tuple[int, ...],
        tie_embeddings: bool,
        hf_config: dict | None,
    ) -> None:
        super().__init__()
        if block_size <= 0:
            raise ValueError(f"block_size: {block_size} is not a positive block length")
        if not 0 <= mask_token_id < vocab_size:
            raise ValueError(
                f"mask_token_id: {mask_token_id} is outside the vocabulary (size {vocab_size})"
            )
        self.block_size = int(block_size)
        self.mask_token_id = int(mask_token_id)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.hf_config = dict(hf_config or {})
        self.attention_backend = "sdpa"
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.lm_head = None if tie_embeddings else nn.Linear(hidden_size, vocab_size, bias=False)

    # -- what the loader and the engine read ----------------------------------------------
    rotary_dim: int
    rope_theta: float

    @property
    def vocab_size(self) -> int:
        return int(self.embed.weight.shape[0])

    @property
    def max_length(self) -> int | None:
        """Longest sequence the checkpoint was made for (None: not recorded)."""
        limit = self.hf_config.get("max_position_embeddings")
        return None if limit is None else int(limit)

    def set_attention_backend(self, name: str) -> str:
        """SDPA, exact (``sdpa``) or in length buckets (``sdpa_buckets``): the block-causal
        mask is an explicit tensor, which flash-attn's and xformers' calls here do not take;
        ``auto`` is ``sdpa``."""
        backend = resolve_backend(name, self.embed.weight.device)
        if name == "auto":
            backend = "sdpa"
        if backend not in ("sdpa", "sdpa_buckets"):
            raise ValueError(
                f"attention_backend: {name!r} is not supported for {self.family} "
                "(block-causal masks: 'sdpa' or 'sdpa_buckets')"
            )
        self.attention_backend = backend
        return self.attention_backend

    # -- the forward pass ----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        past: PastKV | None = None,
        return_kv: bool = False,
        block_size: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, PastKV]:
        """Logits ``[B, L, V]`` for ``input_ids`` ``[B, L]`` under the block-causal mask.

        - ``attention_mask`` ``[B, L]`` (1 = real token) allows left or right padding; real
          tokens count positions from 0 unless ``positions`` says otherwise.
        - ``positions`` ``[B, L]``: absolute positions (``-1`` for padding). Required with
          ``past``, whose keys the queries see by the same block rule.
        - ``return_kv``: also return this call's keys and values as a :class:`PastKV`, to be
          appended to ``past`` when the tokens are final.
        - ``block_size``: the mask's block (default: the checkpoint's).

        Logits come in the dtype the official model returns them: SDAR's in the model's dtype,
        LLaDA2's cast to float32.
        """
        if positions is None:
            if past is not None:
                raise ValueError("positions: required with past keys and values")
            if attention_mask is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)
                positions = positions.expand_as(input_ids)
            else:
                real = attention_mask.bool()
                positions = (real.long().cumsum(-1) - 1).masked_fill(~real, -1)
        elif attention_mask is not None:
            positions = positions.masked_fill(~attention_mask.bool(), -1)
        k_positions = positions if past is None else torch.cat([past.positions, positions], 1)
        allowed = block_causal_mask(positions, k_positions, block_size or self.block_size)
        x = self.embed(input_ids)
        cos, sin = rotary_angles(positions, self.rotary_dim, self.rope_theta, x.dtype)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []

        def attend_at(index: int) -> Attend:
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                keys.append(k.transpose(1, 2))
                values.append(v.transpose(1, 2))
                past_k = None if past is None else past.keys[index]
                past_v = None if past is None else past.values[index]
                return cached_attention(q, k, v, allowed, past_k, past_v)

            return attend

        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attend_at(index))
        logits = self.lm_logits(self.norm(x))
        if return_kv:
            return logits, PastKV(keys=keys, values=values, positions=positions)
        return logits

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    # -- the engine's packed entry points ----------------------------------------------
    def forward_packed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        caches: PoolUses | list[CacheUse | None] | None = None,
        kv_storage: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (normed) hidden states ``[T, hidden]`` of packed sequences, each using the KV
        pool with a block-causal :class:`CacheUse`: its rows' keys and values are stored, then
        it attends to its canvas's keys up to its end under the block rule."""
        caches = pool_uses(caches)
        if caches is None or kv_storage is None or not caches.uses_all():
            raise ValueError(
                f"{self.family}: every packed sequence needs its KV pool use (block-causal "
                "decoding always caches finished blocks)"
            )
        # ``sdpa_buckets`` masks its bucket groups itself (from the plan's specs).
        group_masks = self.attention_backend != "sdpa_buckets"
        plan = plan_kv(kv_storage, seq_lens, caches, group_masks=group_masks)
        x = self.embed(input_ids)[None]
        cos, sin = rotary_angles(positions[None], self.rotary_dim, self.rope_theta, x.dtype)

        def attend_at(index: int) -> Attend:
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                backend = self.attention_backend
                out = packed_attention(q[0], k[0], v[0], seq_lens, backend, plan, index)
                return out[None]

            return attend

        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attend_at(index))
        return self.norm(x[0])

    def logits_at(
        self, hidden: torch.Tensor, positions: torch.Tensor, flat_index: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the packed rows ``flat_index`` (no shift: position i predicts itself)."""
        return self.lm_logits(hidden[flat_index])

    def checkpoint_config(self) -> dict:
        """The family's config.json for this model (see each family)."""
        raise NotImplementedError


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    past_k: torch.Tensor | None,
    past_v: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of this call's ``q``/``k``/``v`` ``[B, L, heads, D]`` over the cached keys
    (``[B, kv_heads, P, D]``, before this call's) and this call's own."""
    if past_k is not None and past_v is not None:
        k = torch.cat([past_k.transpose(1, 2), k], dim=1)
        v = torch.cat([past_v.transpose(1, 2), v], dim=1)
    return masked_attention(q, k, v, allowed)


def swiglu(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with weights ``[I, H]``, ``[I, H]``, ``[H, I]``."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class SwiGLU(nn.Module):
    """The gated MLP both families use (no biases)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def resolve_special_ids(
    hf: dict,
    tokenizer: object | None,
    generation_config: dict | None,
    *,
    vocab_size: int,
    default_mask: int,
    default_eos: tuple[int, ...],
) -> tuple[int, tuple[int, ...]]:
    """``(mask id, EOS ids)``: from config.json when it has them, else the tokenizer's mask /
    EOS tokens, else the official defaults. generation_config.json's ``eos_token_id`` joins
    config.json's: it is where the chat models name their end-of-turn token, and the official
    decoders stop on it. A mask id outside the vocabulary is refused, naming its source."""
    tok_mask = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
    if hf.get("mask_token_id") is not None:
        mask, source = int(hf["mask_token_id"]), "config.json"
    elif tok_mask is not None:
        mask, source = int(tok_mask), "the tokenizer's mask token"
    else:
        mask, source = int(default_mask), "the official default"
    if not 0 <= mask < vocab_size:
        raise ValueError(
            f"mask_token_id: {mask} (from {source}) is outside the vocabulary of {vocab_size} ids"
        )
    eos = list(token_ids(hf.get("eos_token_id")))
    eos += [t for t in token_ids((generation_config or {}).get("eos_token_id")) if t not in eos]
    if not eos and tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = [int(tokenizer.eos_token_id)]  # type: ignore[attr-defined]
    return mask, tuple(eos) if eos else tuple(default_eos)
