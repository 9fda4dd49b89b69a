"""Tiny random SDAR and LLaDA2 checkpoints in the official layout, written without foretell.

The tensor names and config keys are the ones the official classes save (``SDARForCausalLM``;
``LLaDA2MoeModelLM`` with one tensor per expert, as the released models, or dFactory's stacked
experts), so that loading them through the registry tests the real mapping. The output head is
scaled up so that logits spread as a trained model's do (few near-ties in decoding tests).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file

from foretell.models.tokenizer import build_char_tokenizer

ALPHABET = string.ascii_lowercase + string.digits + " +-=.,\n"


def _rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale / shape[-1] ** 0.5


def _norm(g: torch.Generator, n: int) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(n, generator=g)


def _write(directory: Path, config: dict, tensors: dict, *, tokenizer: bool, shards: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(tensors)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(directory / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        build_char_tokenizer(ALPHABET).save_pretrained(str(directory))
    return directory


def vocab_size() -> int:
    return len(build_char_tokenizer(ALPHABET))


def sdar_checkpoint(
    directory: Path,
    *,
    seed: int = 0,
    block_size: int = 4,
    tokenizer: bool = True,
    shards: int = 1,
    config_extra: dict | None = None,
) -> tuple[Path, dict, dict]:
    """(directory, config, tensors): 2 layers, hidden 32, 4 heads of 16 (wider than
    hidden / heads, as SDAR-4B's), 2 KV heads, untied head."""
    g = torch.Generator().manual_seed(seed)
    v, d, inter, heads, kv, hd, layers = vocab_size(), 32, 64, 4, 2, 16, 2
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(v, d, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _norm(g, d)
        t[p + "self_attn.q_proj.weight"] = _rand(g, heads * hd, d)
        t[p + "self_attn.k_proj.weight"] = _rand(g, kv * hd, d)
        t[p + "self_attn.v_proj.weight"] = _rand(g, kv * hd, d)
        t[p + "self_attn.o_proj.weight"] = _rand(g, d, heads * hd)
        t[p + "self_attn.q_norm.weight"] = _norm(g, hd)
        t[p + "self_attn.k_norm.weight"] = _norm(g, hd)
        t[p + "post_attention_layernorm.weight"] = _norm(g, d)
        t[p + "mlp.gate_proj.weight"] = _rand(g, inter, d)
        t[p + "mlp.up_proj.weight"] = _rand(g, inter, d)
        t[p + "mlp.down_proj.weight"] = _rand(g, d, inter)
    t["model.norm.weight"] = _norm(g, d)
    t["lm_head.weight"] = _rand(g, v, d, scale=8.0)
    mask = build_char_tokenizer(ALPHABET).mask_token_id
    config = {
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "block_size": block_size,
        "mask_token_id": mask,
        "max_position_embeddings": 512,
        "fuse_cross_entropy": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
        **(config_extra or {}),
    }
    return _write(directory, config, t, tokenizer=tokenizer, shards=shards), config, t


def llada2_checkpoint(
    directory: Path,
    *,
    seed: int = 0,
    block_size: int | None = 8,
    tokenizer: bool = True,
    shards: int = 1,
    stacked_experts: bool = False,
    config_extra: dict | None = None,
) -> tuple[Path, dict, dict]:
    """(directory, config, tensors): 3 layers (the first dense), hidden 32, 4 heads of 16 with
    half rotary, 2 KV heads, 8 experts in 4 groups (2 groups kept, 3 experts per token), one
    shared expert, a random expert bias, biases on QKV and the output projection."""
    g = torch.Generator().manual_seed(seed)
    v, d, inter, heads, kv, hd, layers = vocab_size(), 32, 48, 4, 2, 16, 3
    experts, moe = 8, 16
    t: dict[str, torch.Tensor] = {"model.word_embeddings.weight": torch.randn(v, d, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _norm(g, d)
        t[p + "attention.query_key_value.weight"] = _rand(g, (heads + 2 * kv) * hd, d)
        t[p + "attention.query_key_value.bias"] = 0.1 * torch.randn(
            (heads + 2 * kv) * hd, generator=g
        )
        t[p + "attention.query_layernorm.weight"] = _norm(g, hd)
        t[p + "attention.key_layernorm.weight"] = _norm(g, hd)
        t[p + "attention.dense.weight"] = _rand(g, d, heads * hd)
        t[p + "attention.dense.bias"] = 0.1 * torch.randn(d, generator=g)
        t[p + "post_attention_layernorm.weight"] = _norm(g, d)
        if i == 0:
            t[p + "mlp.gate_proj.weight"] = _rand(g, inter, d)
            t[p + "mlp.up_proj.weight"] = _rand(g, inter, d)
            t[p + "mlp.down_proj.weight"] = _rand(g, d, inter)
            continue
        t[p + "mlp.gate.weight"] = _rand(g, experts, d, scale=4.0)
        t[p + "mlp.gate.expert_bias"] = 0.2 * torch.randn(experts, generator=g)
        stacks = {
            "gate_proj": _rand(g, experts, moe, d),
            "up_proj": _rand(g, experts, moe, d),
            "down_proj": _rand(g, experts, d, moe),
        }
        for proj, stack in stacks.items():
            if stacked_experts:
                t[p + f"mlp.experts.{proj}"] = stack
            else:
                for e in range(experts):
                    t[p + f"mlp.experts.{e}.{proj}.weight"] = stack[e].clone()
        t[p + "mlp.shared_experts.gate_proj.weight"] = _rand(g, moe, d)
        t[p + "mlp.shared_experts.up_proj.weight"] = _rand(g, moe, d)
        t[p + "mlp.shared_experts.down_proj.weight"] = _rand(g, d, moe)
    t["model.norm.weight"] = _norm(g, d)
    t["lm_head.weight"] = _rand(g, v, d, scale=8.0)
    config = {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "partial_rotary_factor": 0.5,
        "rotary_dim": hd // 2,
        "first_k_dense_replace": 1,
        "num_experts": experts,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "moe_intermediate_size": moe,
        "num_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "use_qkv_bias": True,
        "use_bias": True,
        "use_rmsnorm": True,
        "norm_head": False,
        "norm_softmax": False,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 600000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "max_position_embeddings": 512,
        "using_split_qkv_in_self_attention": False,
        "embedding_dropout": 0.0,
        "attention_dropout": 0.0,
        "output_dropout": 0.0,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
        **(config_extra or {}),
    }
    if block_size is not None:
        config["block_size"] = block_size
    return _write(directory, config, t, tokenizer=tokenizer, shards=shards), config, t
