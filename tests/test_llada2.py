"""LLaDA2 MoE: loading both expert layouts, logits against a plain per-token reference forward,
routing against the official formula, the batched experts against a per-token loop, config
keys and special ids."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from foretell.models import LLaDA2Model, load_model, save_model
from foretell.models.block_causal import resolve_special_ids
from foretell.models.llada2 import route, run_experts
from tests.block_checkpoints import llada2_checkpoint


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's order: normalise in float32, cast, then the weight in the model's dtype."""
    xf = x.float()
    return w * (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_route(
    h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, cfg: dict
) -> list[tuple[list[int], list[float]]]:
    """Per token, in plain Python over float32 values: (experts, weights)."""
    e, groups = cfg["num_experts"], cfg["n_group"]
    size = e // groups
    out = []
    for row in h.float():
        score = [1 / (1 + math.exp(-float(s))) for s in (w.float() @ row).tolist()]
        biased = [float(torch.tensor(s) + bias[i].float()) for i, s in enumerate(score)]
        group_val = [sum(sorted(biased[g * size : (g + 1) * size])[-2:]) for g in range(groups)]
        kept = sorted(range(groups), key=lambda g: -group_val[g])[: cfg["topk_group"]]
        cands = [i for g in kept for i in range(g * size, (g + 1) * size)]
        chosen = sorted(cands, key=lambda i: -biased[i])[: cfg["num_experts_per_tok"]]
        total = sum(score[i] for i in chosen)
        weights = [score[i] / (total + 1e-20) * cfg["routed_scaling_factor"] for i in chosen]
        out.append((chosen, weights))
    return out


def reference_logits(t: dict, cfg: dict, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """One sequence, every token's experts run one at a time (no batching anywhere)."""
    t = {k: v.to(dtype) for k, v in t.items()}
    n, hd, eps, bs = len(ids), cfg["head_dim"], cfg["rms_norm_eps"], cfg["block_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rd = int(hd * cfg["partial_rotary_factor"])
    pos = torch.arange(n).float()
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, rd, 2).float() / rd))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]

    def rope(x: torch.Tensor) -> torch.Tensor:
        r, rest = x[..., :rd], x[..., rd:]
        r1, r2 = r[..., : rd // 2], r[..., rd // 2 :]
        return torch.cat([r * cos + torch.cat([-r2, r1], -1) * sin, rest], -1)

    def mlp(x: torch.Tensor, prefix: str) -> torch.Tensor:
        g, u = x @ t[prefix + "gate_proj.weight"].T, x @ t[prefix + "up_proj.weight"].T
        return (F.silu(g) * u) @ t[prefix + "down_proj.weight"].T

    see = torch.tensor([[j // bs <= i // bs for j in range(n)] for i in range(n)])
    x = t["model.word_embeddings.weight"][torch.tensor(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        qkv = (
            h @ t[p + "attention.query_key_value.weight"].T
            + t[p + "attention.query_key_value.bias"]
        )
        qkv = qkv.view(n, heads + 2 * kv, hd)
        q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv], qkv[:, heads + kv :]
        q = rope(_rms(q, t[p + "attention.query_layernorm.weight"], eps))
        k = rope(_rms(k, t[p + "attention.key_layernorm.weight"], eps))
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(hd)
        probs = scores.masked_fill(~see, float("-inf")).softmax(-1).to(dtype)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * hd)
        x = x + attn @ t[p + "attention.dense.weight"].T + t[p + "attention.dense.bias"]
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        if i < cfg["first_k_dense_replace"]:
            x = x + mlp(h, p + "mlp.")
            continue
        routes = reference_route(h, t[p + "mlp.gate.weight"], t[p + "mlp.gate.expert_bias"], cfg)
        y = torch.zeros_like(h)
        for row, (experts, weights) in enumerate(routes):
            acc = torch.zeros(h.shape[-1])
            for e, w in zip(experts, weights, strict=True):
                acc += w * mlp(h[row : row + 1], p + f"mlp.experts.{e}.")[0].float()
            y[row] = acc.to(dtype)
        x = x + y + mlp(h, p + "mlp.shared_experts.")
    return (_rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T).float()


@pytest.fixture(scope="module")
def llada2_dir(tmp_path_factory):
    return llada2_checkpoint(tmp_path_factory.mktemp("llada2"), seed=5, shards=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_reference_forward(llada2_dir, dtype) -> None:
    path, cfg, tensors = llada2_dir
    loaded = load_model(path, dtype=dtype)
    model = loaded.model
    assert isinstance(model, LLaDA2Model) and model.block_size == 8
    assert model.mask_token_id == loaded.tokenizer.mask_token_id  # config.json has none
    ids = torch.randint(4, cfg["vocab_size"], (13,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids[None])[0]
    ref = reference_logits(tensors, cfg, ids.tolist(), dtype)
    assert ours.dtype == torch.float32  # the official forward casts logits to float32
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    else:
        assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_stacked_expert_layout_loads_the_same(llada2_dir, tmp_path) -> None:
    stacked, _, _ = llada2_checkpoint(tmp_path / "stacked", seed=5, stacked_experts=True)
    ids = torch.randint(4, 40, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = load_model(llada2_dir[0]).model(ids)
        b = load_model(stacked).model(ids)
    assert torch.equal(a, b)
    # save_model writes the released (one tensor per expert) layout, which loads back
    again = save_model(load_model(stacked).model, tmp_path / "saved", max_shard_bytes=30_000)
    names = set(json.loads((again / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.gate.expert_bias" in names
    with torch.no_grad():
        assert torch.equal(load_model(again).model(ids), a)


def test_routing_equals_official_formula_on_fixed_inputs() -> None:
    cfg = {
        "num_experts": 8,
        "n_group": 4,
        "topk_group": 2,
        "num_experts_per_tok": 3,
        "routed_scaling_factor": 2.5,
    }
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    bias = 0.3 * torch.randn(8, generator=g)
    experts, weights = route(h, w, bias, top_k=3, n_group=4, topk_group=2, scaling=2.5)
    ref = reference_route(h, w, bias, cfg)
    for row, (e, wt) in enumerate(ref):
        assert sorted(experts[row].tolist()) == sorted(e)
        got = dict(zip(experts[row].tolist(), weights[row].tolist(), strict=True))
        for i, value in zip(e, wt, strict=True):
            assert got[i] == pytest.approx(value, rel=1e-6)
    assert torch.allclose(weights.sum(-1), torch.full((64,), 2.5))  # normalised, then scaled

    # One token, hand-made scores: the bias picks, never weighs; groups limit the choice.
    s = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.5, 0.45, 0.95, 0.05]])
    logit = torch.log(s / (1 - s))
    eye = torch.eye(8)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.0, 0.0])
    experts, weights = route(logit, eye, bias, top_k=3, n_group=4, topk_group=2, scaling=1.0)
    # groups: {0,1}=1.7, {2,3}=0.2, {4,5}=0.5+1.05=1.55, {6,7}=1.0 -> groups 0 and 2 kept;
    # expert 6 (the best score) is in a dropped group; expert 5 wins by its bias.
    assert experts[0].tolist() == [5, 0, 1]
    expected = torch.tensor([0.45, 0.9, 0.8]) / (0.45 + 0.9 + 0.8)
    torch.testing.assert_close(weights[0], expected)


def test_batched_experts_equal_a_per_token_loop() -> None:
    g = torch.Generator().manual_seed(2)
    t, h, i, e, k = 40, 16, 8, 6, 2
    x = torch.randn(t, h, generator=g, dtype=torch.float64)
    gate, up = (
        torch.randn(e, i, h, generator=g, dtype=torch.float64),
        torch.randn(e, i, h, generator=g, dtype=torch.float64),
    )
    down = torch.randn(e, h, i, generator=g, dtype=torch.float64)
    experts = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    experts[:5] = torch.tensor([0, 1])  # expert 5 may get few tokens; some get none
    weights = torch.rand(t, k, generator=g, dtype=torch.float64)
    ours = run_experts(x, experts, weights, gate, up, down)
    for row in range(t):
        acc = torch.zeros(h, dtype=torch.float64)
        for j in range(k):
            ex = int(experts[row, j])
            acc += weights[row, j] * (down[ex] @ (F.silu(gate[ex] @ x[row]) * (up[ex] @ x[row])))
        torch.testing.assert_close(ours[row], acc, rtol=1e-12, atol=1e-12)


def test_config_keys(tmp_path) -> None:
    path, cfg, _ = llada2_checkpoint(tmp_path / "a", config_extra={"norm_head": True})
    with pytest.raises(ValueError, match="norm_head=True is not supported"):
        load_model(path)
    ok = dict(cfg, norm_head=False, use_qk_norm=True, output_router_logits=False)
    (path / "config.json").write_text(json.dumps(ok))
    assert load_model(path).model.family == "llada2"
    (path / "config.json").write_text(json.dumps(dict(ok, rotary_dim=4)))
    with pytest.raises(ValueError, match="rotary_dim 4 disagrees"):
        load_model(path)
    (path / "config.json").write_text(json.dumps(dict(ok, moe_layer_freq=2)))
    with pytest.raises(ValueError, match="unknown LLaDA2 config key 'moe_layer_freq'"):
        load_model(path)
    with pytest.warns(UserWarning, match="moe_layer_freq"):
        load_model(path, ignore_unknown_config_keys=True)
    veomni = dict(ok, model_type="llada2_moe_veomni", architectures=None)
    (path / "config.json").write_text(json.dumps(veomni))
    assert isinstance(load_model(path).model, LLaDA2Model)


def test_special_id_resolution_order(tmp_path) -> None:
    class Tok:
        mask_token_id, eos_token_id = 5, 6

    big = 157184  # the released vocabulary
    assert resolve_special_ids(
        {}, None, None, vocab_size=big, default_mask=156895, default_eos=(156892,)
    ) == (156895, (156892,))
    assert resolve_special_ids(
        {}, Tok(), None, vocab_size=big, default_mask=156895, default_eos=(156892,)
    ) == (5, (6,))
    cfg = {"mask_token_id": 9, "eos_token_id": [10, 11]}
    assert resolve_special_ids(
        cfg, Tok(), {"eos_token_id": 12}, vocab_size=big, default_mask=156895, default_eos=(156892,)
    ) == (9, (10, 11, 12))
    path, _, _ = llada2_checkpoint(tmp_path / "n", tokenizer=False)
    with pytest.raises(ValueError, match=r"mask_token_id: 156895 \(from the official default\)"):
        load_model(path)  # a tiny vocabulary cannot hold LLaDA2's default mask id


def test_llada_family_accepts_fast_dllm_config_key(tmp_path) -> None:
    from foretell.models.tiny import tiny_model

    loaded = tiny_model("llada", seed=7)
    save_model(loaded.model, tmp_path, loaded.tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    config["train_max_sequence_length"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model(tmp_path).model.family == "llada"
    config["some_fork_option"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="some_fork_option"):
        load_model(tmp_path)
    with pytest.warns(UserWarning, match=r"\['some_fork_option'\]"):
        load_model(tmp_path, ignore_unknown_config_keys=True)
