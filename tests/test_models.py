"""Numerical oracle: our two entry points against transformers' Llama / Qwen2 bodies."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from foretell.models import load_model, save_model
from foretell.models.tiny import tiny_model

torch.manual_seed(0)


def _hf_reference(family: str, model):
    """A transformers model holding our weights under its own names."""
    c = model.config
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        attn_implementation="eager",
    )
    if family == "llada":
        hf = LlamaModel(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
    else:
        hf = Qwen2Model(Qwen2Config(**common))
    ours = dict(model.named_parameters())
    renamed = {}
    for name in hf.state_dict():
        internal = (
            name.replace("embed_tokens", "embed")
            .replace("layers.", "blocks.")
            .replace("self_attn.", "")
            .replace("mlp.", "")
            .replace("input_layernorm", "attn_norm")
            .replace("post_attention_layernorm", "mlp_norm")
        )
        renamed[name] = ours[internal]
    hf.load_state_dict(renamed, strict=True)
    return hf.to(torch.float64).eval()


def _hf_logits(hf, model, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw logits from the transformers body with a bidirectional (non-causal) mask."""
    b, n = ids.shape
    keep = attention_mask.bool()[:, None, None, :].expand(b, 1, n, n)
    bias = torch.zeros(b, 1, n, n, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    for layer in hf.layers:
        layer.self_attn.is_causal = False
    hidden = hf(input_ids=ids, attention_mask=bias, position_ids=positions).last_hidden_state
    return model.lm_logits(hidden)


def _mixed_batch(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for i, n in enumerate(lengths):  # left padding, as HF batches do
        ids[i, longest - n :] = torch.randint(0, vocab, (n,), generator=g)
        mask[i, longest - n :] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padded_and_packed_match_transformers(family: str) -> None:
    model = tiny_model(family, seed=3, dtype="float64").model
    hf = _hf_reference(family, model)
    lengths = [7, 13, 1, 10]
    ids, mask = _mixed_batch(model.vocab_size, lengths)
    with torch.no_grad():
        expected = _hf_logits(hf, model, ids, mask)
        padded = model(ids, attention_mask=mask)
        # Packed: the real tokens back to back, logits asked for at every position.
        flat = torch.cat([ids[i, mask[i].bool()] for i in range(len(lengths))])
        positions = torch.cat([torch.arange(n) for n in lengths])
        hidden = model.forward_packed(flat, positions, lengths)
        packed = model.logits_at(hidden, positions, torch.arange(len(flat)))
    start = 0
    for i, n in enumerate(lengths):
        real = expected[i, -n:]
        torch.testing.assert_close(padded[i, -n:], real, atol=1e-4, rtol=0)
        # Packed logits are aligned: Dream's prediction for position p comes from p - 1.
        aligned = torch.cat([real[:1], real[:-1]]) if model.shifted_logits else real
        torch.testing.assert_close(packed[start : start + n], aligned, atol=1e-4, rtol=0)
        start += n


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_unpadded_forward_matches_transformers(family: str) -> None:
    model = tiny_model(family, seed=4, dtype="float64").model
    hf = _hf_reference(family, model)
    ids = torch.randint(0, model.vocab_size, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), _hf_logits(hf, model, ids, torch.ones_like(ids)), atol=1e-4, rtol=0
        )


def test_packed_logits_only_where_asked() -> None:
    model = tiny_model("llada", seed=5).model
    ids = torch.randint(0, model.vocab_size, (12,))
    positions = torch.cat([torch.arange(5), torch.arange(7)])
    with torch.no_grad():
        hidden = model.forward_packed(ids, positions, [5, 7])
        some = model.logits_at(hidden, positions, torch.tensor([0, 6, 11]))
        full = model.logits_at(hidden, positions, torch.arange(12))
    assert some.shape == (3, model.vocab_size)
    torch.testing.assert_close(some, full[[0, 6, 11]])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_checkpoint_round_trip_in_family_format(family: str, tmp_path) -> None:
    loaded = tiny_model(family, seed=6)
    # A small shard size forces the sharded layout with an index file, as the real models use.
    save_model(loaded.model, tmp_path, loaded.tokenizer, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    if family == "llada":
        assert "model.transformer.blocks.0.ff_proj.weight" in names
        assert "model.transformer.ff_out.weight" in names
        assert json.loads((tmp_path / "config.json").read_text())["d_model"] == 64
    else:
        assert "model.layers.0.self_attn.q_proj.bias" in names
        assert "lm_head.weight" in names
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(tmp_path)
    assert type(again.model) is type(loaded.model)
    assert again.model.mask_token_id == loaded.model.mask_token_id
    assert again.model.eos_token_ids == loaded.model.eos_token_ids
    assert again.tokenizer.decode(again.tokenizer.encode("12+3=")) == "12+3="
    ids = torch.randint(0, loaded.model.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), loaded.model(ids))


def test_load_errors_name_the_problem(tmp_path) -> None:
    loaded = tiny_model("llada", seed=7)
    save_model(loaded.model, tmp_path, loaded.tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())

    with pytest.raises(ValueError, match="no such directory"):
        load_model(tmp_path / "nope")

    bad = dict(config, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown architecture"):
        load_model(tmp_path)

    wider = dict(config, d_model=128)
    (tmp_path / "config.json").write_text(json.dumps(wider))
    with pytest.raises(
        ValueError, match=r"tensor 'model\.transformer\.[a-z0-9_.]+' has shape \(64,\)"
    ):
        load_model(tmp_path)

    alibi = dict(config, alibi=True)
    (tmp_path / "config.json").write_text(json.dumps(alibi))
    with pytest.raises(ValueError, match="alibi"):
        load_model(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model(tmp_path)
