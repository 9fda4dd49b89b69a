"""Fidelity to the official code where users run it: bfloat16 (LLaDA's rope_full_precision),
classifier-free guidance in float32 (the confidence softmax's dtype), LLaDA's EOS/EOT options,
and config keys that are honoured or refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from reference_decoders import early_exit_of, llada_generate
from reference_llada import llada_forward

from foretell import DecodeParams, Engine, Prophet
from foretell.decoding.unmask import confidence_dtype
from foretell.models import load_model, save_model
from foretell.models.tiny import tiny_model


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    """A tiny LLaDA checkpoint (grouped K/V heads, rope_full_precision as LLaDA-8B)."""
    out = tmp_path_factory.mktemp("llada")
    loaded = tiny_model("llada", seed=11, num_heads=4, num_kv_heads=2)
    save_model(loaded.model, out, loaded.tokenizer)
    return out


def _with_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del config[key]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


_DROP = object()


def _state(model) -> dict[str, torch.Tensor]:
    return {model.to_checkpoint_name(n): p.detach() for n, p in model.named_parameters()}


def _both_entries(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style logits ``[B, L, V]`` and packed logits of the same canvases (all rows)."""
    with torch.no_grad():
        hf = model(ids)
        flat = ids.flatten()
        positions = torch.arange(ids.shape[1]).repeat(ids.shape[0])
        hidden = model.forward_packed(flat, positions, [ids.shape[1]] * ids.shape[0])
        packed = model.logits_at(hidden, positions, torch.arange(flat.numel()))
    return hf, packed.view_as(hf)


def test_bf16_logits_equal_a_reference_that_rotates_in_float32(llada_dir, tmp_path) -> None:
    ids = torch.randint(4, 40, (2, 37), generator=torch.Generator().manual_seed(3))
    config = json.loads((llada_dir / "config.json").read_text())
    assert config["rope_full_precision"] is True and config["n_kv_heads"] < config["n_heads"]
    model = load_model(llada_dir, dtype="bfloat16", load_tokenizer=False).model
    state = _state(model)
    official = llada_forward(state, config, ids)
    assert official.dtype == torch.bfloat16
    hf, packed = _both_entries(model, ids)
    assert torch.equal(hf, official)
    assert torch.equal(packed, official)

    # Without the option foretell rotates in bfloat16: not what the (default) official model
    # computes, and exactly what the official model computes with the option off.
    off_dir = _with_config(llada_dir, tmp_path / "off", rope_full_precision=False)
    off = load_model(off_dir, dtype="bfloat16", load_tokenizer=False).model
    hf_off, packed_off = _both_entries(off, ids)
    assert not torch.equal(hf_off, official)
    assert not torch.equal(packed_off, official)
    official_off = llada_forward(state, dict(config, rope_full_precision=False), ids)
    assert torch.equal(hf_off, official_off) and torch.equal(packed_off, official_off)
    # A missing key takes the official default (True).
    default_dir = _with_config(llada_dir, tmp_path / "default", rope_full_precision=_DROP)
    assert load_model(default_dir, load_tokenizer=False).model.config.rope_full_precision


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"use_scheduler_head": True}, "use_scheduler_head"),
        ({"quantization_config": {"bits": 4}}, "quantization_config"),
        ({"scale_logits": True}, "scale_logits"),
        ({"layer_norm_type": "gemma_rms"}, "layer_norm_type"),
        ({"activation_type": "swiglu"}, "activation_type"),
        ({"bias_for_layer_norm": True}, "bias_for_layer_norm"),
        ({"rope": _DROP}, "rope"),  # missing: LLaDA's default is False, which is refused
    ],
)
def test_llada_config_keys_are_honoured_or_refused_by_name(
    llada_dir, tmp_path, changes, named
) -> None:
    bad = _with_config(llada_dir, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=named):
        load_model(bad, load_tokenizer=False)


def test_llada_multi_query_attention_is_honoured(llada_dir, tmp_path) -> None:
    mqa = _with_config(llada_dir, tmp_path / "mqa", multi_query_attention=False)
    with pytest.raises(ValueError, match="multi_query_attention"):
        load_model(mqa, load_tokenizer=False)  # n_kv_heads 2 with MHA declared
    ok = _with_config(llada_dir, tmp_path / "ok", n_kv_heads=_DROP, multi_query_attention=None)
    with pytest.raises(ValueError, match="k_proj"):  # 4 K/V heads implied, 2 stored
        load_model(ok, load_tokenizer=False)


def test_dream_config_keys_are_honoured_or_refused_by_name(tmp_path) -> None:
    loaded = tiny_model("dream", seed=12)
    save_model(loaded.model, tmp_path / "dream", loaded.tokenizer)
    fine = _with_config(
        tmp_path / "dream",
        tmp_path / "fine",
        rope_scaling={"rope_type": "default"},
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
        torch_dtype="bfloat16",
    )
    load_model(fine, load_tokenizer=False)
    for i, (changes, named) in enumerate(
        [
            ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
            ({"hidden_act": "gelu"}, "hidden_act"),
            ({"use_mrope": False}, "use_mrope"),
        ]
    ):
        bad = _with_config(tmp_path / "dream", tmp_path / f"bad{i}", **changes)
        with pytest.raises(ValueError, match=named):
            load_model(bad, load_tokenizer=False)


# -- decoding: the confidence's dtype, guidance, bfloat16, EOS/EOT -------------------------


def test_confidence_dtype_follows_the_reference_of_the_rule() -> None:
    f32, f64 = torch.float32, torch.float64
    assert confidence_dtype(DecodeParams(), "llada", f32) == f32
    assert confidence_dtype(DecodeParams(early_commit="prophet"), "llada", torch.bfloat16) == (
        torch.bfloat16
    )
    threshold = DecodeParams(remasking="confidence_threshold")
    assert confidence_dtype(threshold, "llada", f32) == f64
    assert confidence_dtype(threshold, "dream", f32) == f32  # Dream's sample_tokens

    class Cached:  # what branch kv-cache adds to DecodeParams
        remasking = "low_confidence"
        kv_cache = "dual"
        confidence_dtype = None

    assert confidence_dtype(Cached(), "llada", f32) == f64
    assert confidence_dtype(DecodeParams(confidence_dtype="float64"), "llada", f32) == f64
    assert confidence_dtype(threshold.replace(confidence_dtype="model"), "llada", f32) == f32
    with pytest.raises(ValueError, match="confidence_dtype"):
        DecodeParams(confidence_dtype="float16")
    with pytest.raises(ValueError, match="logits_eos_inf"):
        DecodeParams(logits_eos_inf="yes")


def _cases(eos: int) -> list[tuple[str, DecodeParams]]:
    """Guided and unguided, both remaskings, Prophet, LLaDA's EOS/EOT options."""
    prompts = ["12+34=", "what is 7*8?", "a", "x=3, y=x+4, y?"]
    cases = []
    i = 0
    for cfg in (0.0, 1.0, 3.0):
        for remasking in ("low_confidence", "random"):
            for extra in (
                {},
                {"early_commit": Prophet(thresholds=(6.0, 4.0, 2.0), answer_start=8)},
                {"logits_eos_inf": True},
                {"confidence_eos_eot_inf": True},
                {"confidence_eos_eot_inf": True, "early_commit": Prophet((5.0, 3.0, 1.5))},
            ):
                block, steps = [(8, 16), (16, 16), (4, 8)][i % 3]
                params = DecodeParams(
                    gen_length=16,
                    block_length=block,
                    steps=steps,
                    remasking=remasking,
                    cfg_scale=cfg,
                    seed=40 + i,
                    **extra,
                )
                cases.append((prompts[i % len(prompts)], params))
                i += 1
    # Fast-dLLM's rule scores in float64 in the same pass as the others' model-dtype scores.
    for j, threshold in enumerate((0.5, 0.9)):
        params = DecodeParams(gen_length=16, block_length=8, remasking="confidence_threshold")
        cases.append((prompts[j], params.replace(threshold=threshold, logits_eos_inf=j == 1)))
    return cases


def _eos_prone(loaded):
    """Make EOS the model's favourite token where its most frequent prediction was (a tiny
    random model never predicts EOS otherwise), so that the EOS options change something."""
    eos = loaded.model.eos_token_ids[0]
    with torch.no_grad():
        w = loaded.model.lm_head.weight
        w[eos] = w[FAVOURITE] * 1.02
    return loaded


FAVOURITE = 40  # the token tiny_model("llada", seed=21) predicts most often


def _reference(loaded, prompt_ids: list[int], p: DecodeParams, eos: int) -> tuple[list, int]:
    if p.seed is not None:  # greedy cases need no seed (seed=None is the default)
        torch.manual_seed(p.seed)
    policy = p.early_commit
    x, passes = llada_generate(
        loaded.model,
        torch.tensor([prompt_ids]),
        steps=p.steps,
        gen_length=p.gen_length,
        block_length=p.block_length,
        remasking=p.remasking,
        cfg_scale=p.cfg_scale,
        mask_id=loaded.model.mask_token_id,
        early_exit=early_exit_of(policy),
        statistic=policy.statistic if policy else "mean",
        logits_eos_inf=p.logits_eos_inf,
        confidence_eos_eot_inf=p.confidence_eos_eot_inf,
        eos_id=eos,
    )
    return x[0, len(prompt_ids) :].tolist(), passes


def _parity(loaded, dtype: str, cases) -> list:
    eos = loaded.model.eos_token_ids[0]
    engine = Engine(loaded, dtype=dtype, max_num_seqs=5)
    mixed = engine.generate([c[0] for c in cases], [c[1] for c in cases], use_tqdm=False)
    for (prompt, params), out in zip(cases, mixed, strict=True):
        solo = Engine(loaded, dtype=dtype, max_num_seqs=1)
        alone = solo.generate([prompt], params, use_tqdm=False)[0]
        assert out.token_ids == alone.token_ids, (prompt, params)
        assert out.num_forward_passes == alone.num_forward_passes
        if params.early_commit is not None and params.early_commit.answer_start is None:
            continue  # foretell's still-masked region: the reference has none
        if params.remasking == "confidence_threshold":
            continue  # Fast-dLLM's rule: branch kv-cache brings its reference
        tokens, passes = _reference(loaded, out.prompt_token_ids, params, eos)
        assert out.token_ids == tokens, (prompt, params)
        assert out.num_forward_passes == passes, (prompt, params)
    return mixed


def test_float32_guided_decoding_matches_the_reference_in_one_mixed_batch() -> None:
    """cfg 1 and 3 in float32 saturate probabilities to exactly 1.0; with the softmax in the
    model's dtype (LLaDA's generate.py) the tie-break by position decides, as in the
    reference, and a float64 softmax (the old rule) decides otherwise somewhere."""
    loaded = _eos_prone(tiny_model("llada", seed=21, dtype="float32", logit_scale=16.0))
    eos = loaded.model.eos_token_ids[0]
    cases = _cases(eos)
    mixed = _parity(loaded, "float32", cases)
    assert sum(o.committed_early for o in mixed) >= 3
    # The EOS options change what they should: EOS is common without them, never predicted
    # with logits_eos_inf, and revealed later with confidence_eos_eot_inf.
    pairs = list(zip(cases, mixed, strict=True))
    assert sum(eos in o.token_ids for (_, p), o in pairs if p.cfg_scale == 0) >= 3
    assert all(eos not in o.token_ids for (_, p), o in pairs if p.logits_eos_inf)
    flagged = [(c, o) for c, o in pairs if c[1].confidence_eos_eot_inf]
    plain = [p.replace(confidence_eos_eot_inf=False) for (_, p), _ in flagged]
    engine = Engine(loaded, dtype="float32", max_num_seqs=8)
    outs = engine.generate([c[0] for c, _ in flagged], plain, use_tqdm=False)
    assert any(a.token_ids != o.token_ids for a, (_, o) in zip(outs, flagged, strict=True))


def test_under_guidance_the_softmax_dtype_decides_and_the_models_dtype_matches() -> None:
    """The case of issue 13: with cfg 3 in float32, probabilities saturate to exactly 1.0, so
    the softmax's dtype decides the order. The model's dtype matches the reference (LLaDA's
    generate.py); a float64 softmax (its rule before June 2025) decodes some differently."""
    loaded = tiny_model("llada", seed=21, dtype="float32", logit_scale=16.0)
    cases = [
        (prompt, DecodeParams(gen_length=16, block_length=block, steps=steps, cfg_scale=cfg))
        for prompt in ("12+34=", "what is 7*8?", "x=3, y=x+4, y?", "count: 1 2 3")
        for cfg in (1.0, 3.0)
        for block, steps in ((16, 16), (16, 8), (8, 16))
    ]
    mixed = _parity(loaded, "float32", cases)
    wide = [p.replace(confidence_dtype="float64") for _, p in cases]
    engine = Engine(loaded, dtype="float32", max_num_seqs=32)
    outs = engine.generate([c[0] for c in cases], wide, use_tqdm=False)
    assert sum(a.token_ids != o.token_ids for a, o in zip(outs, mixed, strict=True)) >= 5


def test_bfloat16_decoding_matches_the_reference_in_one_mixed_batch() -> None:
    loaded = tiny_model("llada", seed=22, dtype="bfloat16", hidden_size=32, intermediate_size=64)
    cases = _cases(loaded.model.eos_token_ids[0])[::3]  # few: bfloat16 is slow on this CPU
    _parity(loaded, "bfloat16", cases)


def test_eos_options_are_llada_only_and_need_an_eos(dream64) -> None:
    engine = Engine(dream64, dtype="float64")
    with pytest.raises(ValueError, match="logits_eos_inf"):
        engine.add_request("ab", DecodeParams(gen_length=8, logits_eos_inf=True))


def test_eos_and_eot_ids_come_from_the_config_and_the_tokenizer() -> None:
    """EOS is the config's eos_token_id, EOT the tokenizer's <|eot_id|>; confidence_eos_eot_inf
    leaves out both when greedy and EOT alone when sampling, as generate.py's lines do."""
    from foretell.models.tiny import TINY_ALPHABET
    from foretell.models.tokenizer import build_char_tokenizer

    loaded = tiny_model("llada", seed=23)
    tokenizer = build_char_tokenizer(TINY_ALPHABET[:-1])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot < loaded.model.vocab_size
    engine = Engine(loaded.model, tokenizer=tokenizer)
    eos = loaded.model.eos_token_ids[0]
    assert engine.requests.special_ids() == (eos, eot)
    both = DecodeParams(gen_length=8, logits_eos_inf=True, confidence_eos_eot_inf=True)
    req = engine.make_request("ab", both)
    assert (req.logits_suppress, req.confidence_suppress) == ((eos,), (eos, eot))
    req = engine.make_request("ab", both.replace(temperature=0.7))
    assert (req.logits_suppress, req.confidence_suppress) == ((eos,), (eot,))
    # Without <|eot_id|> (the small models' tokenizers) only EOS is left out.
    req = Engine(loaded).make_request("ab", DecodeParams(gen_length=8, confidence_eos_eot_inf=True))
    assert (req.logits_suppress, req.confidence_suppress) == ((), (eos,))
