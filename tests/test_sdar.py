"""SDAR: loading the official layout, logits against a plain reference forward, the
block-causal mask, the past-K/V forward, config keys and special ids."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from foretell.models import PastKV, SDARModel, load_model
from foretell.models.block_causal import block_causal_mask
from foretell.models.sdar import SDARRMSNorm
from tests.block_checkpoints import sdar_checkpoint


def _norm_f32w(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """flash-attn's rms_norm_fn: every step in float32, one cast at the end."""
    xf = x.float()
    return (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def reference_logits(t: dict, cfg: dict, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """One sequence at positions 0.., written from the official modeling file's math."""
    t = {k: v.to(dtype) for k, v in t.items()}
    n, hd, eps = len(ids), cfg["head_dim"], cfg["rms_norm_eps"]
    heads, kv, bs = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["block_size"]
    pos = torch.arange(n).float()
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]

    def rope(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    see = torch.tensor([[j // bs <= i // bs for j in range(n)] for i in range(n)])
    x = t["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _norm_f32w(x, t[p + "input_layernorm.weight"], eps)
        q = (h @ t[p + "self_attn.q_proj.weight"].T).view(n, heads, hd)
        k = (h @ t[p + "self_attn.k_proj.weight"].T).view(n, kv, hd)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).view(n, kv, hd)
        q = rope(_norm_f32w(q, t[p + "self_attn.q_norm.weight"], eps))
        k = rope(_norm_f32w(k, t[p + "self_attn.k_norm.weight"], eps))
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(hd)
        probs = scores.masked_fill(~see, float("-inf")).softmax(-1).to(dtype)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * hd)
        x = x + attn @ t[p + "self_attn.o_proj.weight"].T
        h = _norm_f32w(x, t[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ t[p + "mlp.gate_proj.weight"].T, h @ t[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T
    return _norm_f32w(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory):
    return sdar_checkpoint(tmp_path_factory.mktemp("sdar"), seed=3, shards=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_reference_forward(sdar_dir, dtype) -> None:
    path, cfg, tensors = sdar_dir
    loaded = load_model(path, dtype=dtype)
    model = loaded.model
    assert isinstance(model, SDARModel) and model.block_size == 4
    assert model.mask_token_id == cfg["mask_token_id"]
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template
    ids = torch.randint(4, cfg["vocab_size"], (11,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids[None])[0]
    ref = reference_logits(tensors, cfg, ids.tolist(), dtype)
    assert ours.dtype == dtype  # SDAR's head returns the model's dtype
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    else:  # attention kernels differ (SDPA vs einsum): a few bf16 ulps of the logits' scale
        assert (ours.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_sdar_norm_multiplies_the_weight_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    norm = SDARRMSNorm(16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(16, generator=g))
        norm = norm.to(torch.bfloat16)
        ours = norm(x)
    assert torch.equal(ours, _norm_f32w(x, norm.weight, 1e-6))
    # LLaMA's order (cast, then the weight in bf16) rounds twice: not what SDAR computes.
    xf = x.float()
    llama = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    assert not torch.equal(ours, llama)


def test_block_causal_mask_semantics(sdar_dir) -> None:
    bs = 4
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, -1]])
    allowed = block_causal_mask(pos, pos, bs)[0]
    for i in range(9):
        for j in range(10):
            expect = j < 9 and j // bs <= i // bs
            assert bool(allowed[i, j]) == expect, (i, j)
    assert allowed[9].all()  # a padding query sees everything (finite), and is ignored
    model = load_model(sdar_dir[0]).model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.vocab_size, (1, 12), generator=g)
    later = ids.clone()
    later[0, 9] = (later[0, 9] + 1 - 4) % (model.vocab_size - 4) + 4  # a token of block 2
    with torch.no_grad():
        a, b = model(ids)[0], model(later)[0]
    assert torch.equal(a[:8], b[:8])  # earlier blocks do not see a later block
    assert not torch.allclose(a[8:12], b[8:12])  # the changed token's own block does
    inside = ids.clone()
    inside[0, 5] = (inside[0, 5] + 1 - 4) % (model.vocab_size - 4) + 4
    with torch.no_grad():
        c = model(inside)[0]
    assert not torch.allclose(a[4], c[4])  # bidirectional inside the block


def test_left_padding_and_batch(sdar_dir) -> None:
    model = load_model(sdar_dir[0]).model
    g = torch.Generator().manual_seed(2)
    short, long = torch.randint(4, 40, (6,), generator=g), torch.randint(4, 40, (10,), generator=g)
    batch = torch.zeros(2, 10, dtype=torch.long)
    batch[0, 4:], batch[1] = short, long
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        both = model(batch, attention_mask=mask)
        torch.testing.assert_close(both[0, 4:], model(short[None])[0])
        torch.testing.assert_close(both[1], model(long[None])[0])


def test_past_kv_forward_equals_full_forward(sdar_dir) -> None:
    model = load_model(sdar_dir[0]).model
    ids = torch.randint(4, 40, (1, 14), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(14)[None]
    with torch.no_grad():
        full = model(ids)
        # the prompt's whole blocks once, then block by block with stored keys
        _, past = model(ids[:, :8], positions=pos[:, :8], return_kv=True)
        step = model(ids[:, 8:12], positions=pos[:, 8:12], past=past)
        torch.testing.assert_close(step, full[:, 8:12])
        _, stored = model(ids[:, 8:12], positions=pos[:, 8:12], past=past, return_kv=True)
        past = past.cat(stored)
        assert past.length == 12 and past.keys[0].shape == (1, 2, 12, 16)
        torch.testing.assert_close(
            model(ids[:, 12:], positions=pos[:, 12:], past=past), full[:, 12:]
        )
        # a partial block (the prompt tail) as queries is the same block's rows
        torch.testing.assert_close(
            model(ids[:, 12:13], positions=pos[:, 12:13], past=past), model(ids[:, :13])[:, 12:]
        )
        # batched caches of different lengths: padding keys at position -1
        two = PastKV(
            keys=[torch.cat([k, k], 0) for k in past.keys],
            values=[torch.cat([v, v], 0) for v in past.values],
            positions=torch.stack(
                [past.positions[0], past.positions[0].masked_fill(pos[0, :12] >= 8, -1)]
            ),
        )
        rows = torch.cat([ids[:, 12:], ids[:, 8:10]], 0)
        rows_pos = torch.cat([pos[:, 12:], pos[:, 8:10]], 0)
        out = model(rows, positions=rows_pos, past=two)
        torch.testing.assert_close(out[0], full[0, 12:])
        torch.testing.assert_close(out[1], model(ids[:, :10])[0, 8:10])
    with pytest.raises(ValueError, match="positions"):
        model(ids[:, :2], past=past)


def test_config_keys_and_override(tmp_path) -> None:
    path, cfg, _ = sdar_checkpoint(
        tmp_path / "a", config_extra={"quantization_config": {"bits": 4}}
    )
    with pytest.raises(ValueError, match="unknown SDAR config key 'quantization_config'"):
        load_model(path)
    with pytest.warns(
        UserWarning, match=r"ignoring unknown SDAR config keys \['quantization_config'\]"
    ):
        assert load_model(path, ignore_unknown_config_keys=True).model.family == "sdar"
    bad = dict(cfg, hidden_act="gelu")
    bad.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        load_model(path)


def test_special_ids_and_tokenizer_optional(tmp_path) -> None:
    path, cfg, _ = sdar_checkpoint(tmp_path / "b", tokenizer=False)
    loaded = load_model(path)
    assert loaded.tokenizer is None  # token-id prompts only
    assert loaded.model.mask_token_id == cfg["mask_token_id"]
    assert loaded.model.eos_token_ids == (151645, 151643)  # no id anywhere: the official ones
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    config = dict(cfg, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(config))
    assert load_model(path).model.eos_token_ids == (2, 7)
    (path / "config.json").write_text(json.dumps(dict(cfg, mask_token_id=cfg["vocab_size"])))
    with pytest.raises(ValueError, match=r"mask_token_id: \d+ \(from config.json\) is outside"):
        load_model(path)
    no_mask = dict(cfg)
    no_mask.pop("mask_token_id")
    (path / "config.json").write_text(json.dumps(no_mask))
    with pytest.raises(ValueError, match=r"mask_token_id: 151669 \(from the official default\)"):
        load_model(path)
    tok_path, _, _ = sdar_checkpoint(tmp_path / "c", config_extra={})
    config = json.loads((tok_path / "config.json").read_text())
    config.pop("mask_token_id")
    (tok_path / "config.json").write_text(json.dumps(config))
    loaded = load_model(tok_path)
    assert loaded.model.mask_token_id == loaded.tokenizer.mask_token_id
    assert loaded.model.eos_token_ids == (loaded.tokenizer.eos_token_id,)
