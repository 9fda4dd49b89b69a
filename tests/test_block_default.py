"""The shipped block-diffusion (SDAR) default model, its training objective and its decoder.

The model loads through the real checkpoint path as an SDAR model with the declared block size;
the training pass that denoises every block at once gives the logits a decoder with the KV cache
sees; the training-side decoder gives SDAR's reference decoder's tokens; and the checkpoint
solves held-out prompts with full decoding while one step per block does not.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from foretell.models import SDARModel, load_model
from foretell.models.block_default import (
    ANSWER_START,
    BLOCK_DEFAULT_MODEL_DIR,
    BLOCK_LENGTH,
    GEN_LENGTH,
    HELDOUT_SEED,
    HELDOUT_SIZE,
    MARKER_POSITION,
    TASK_NAMES,
    answer_constraints,
    check_heldout_size,
    generation_text,
)
from foretell.models.tokenizer import build_char_tokenizer
from foretell.tasks import ALPHABET, CHAT_TEMPLATE, Example, get_task, parse_answer
from tests.reference_sdar import bd3_generate, cut
from training import train_sdar
from training.block_decode import POLICIES, block_decode, encode_prompt, score

# Measured on the first 12 held-out prompts (HELDOUT_SEED) with the shipped checkpoint: full
# decoding and threshold decoding solve all 12, one step per block none (docs/training.md has
# the 500-prompt numbers). The bounds leave one prompt of slack for another platform's rounding.
N_PROMPTS = 12
SOLVED_AT_LEAST = 11
ONE_STEP_AT_MOST = 1


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return load_model(BLOCK_DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_char_tokenizer(ALPHABET)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_checkpoint_files_config_and_size() -> None:
    files = {p.name for p in BLOCK_DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert sum(p.stat().st_size for p in BLOCK_DEFAULT_MODEL_DIR.iterdir()) < 5 * 1024**2
    config = json.loads((BLOCK_DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["SDARForCausalLM"]
    assert config["model_type"] == "sdar"
    assert config["block_size"] == BLOCK_LENGTH
    tok = build_char_tokenizer(ALPHABET)
    assert config["mask_token_id"] == tok.mask_token_id
    assert config["eos_token_id"] == tok.eos_token_id


def test_loads_as_an_sdar_model_with_the_declared_block_size(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    assert isinstance(model, SDARModel) and model.family == "sdar"
    assert model.block_size == BLOCK_LENGTH
    assert model.mask_token_id == tok.mask_token_id
    assert model.eos_token_ids == (tok.eos_token_id,)
    assert model.embed.weight.dtype == torch.float32
    assert 500_000 <= sum(p.numel() for p in model.parameters()) <= 2_000_000
    messages = [{"role": "user", "content": "permute dcafb="}]
    assert tok.apply_chat_template(messages, tokenize=False) == "permute dcafb="


def test_layout_and_heldout_guard(tokenizer) -> None:
    ex = Example(prompt="permute dcafbhge=", answer="hgfedcba")
    text = generation_text(ex)
    assert text[MARKER_POSITION:ANSWER_START] == "answer: " and parse_answer(text) == ex.answer
    assert len(text) + 1 <= GEN_LENGTH  # the EOS fits too
    marker = answer_constraints(tokenizer)
    assert sorted(marker) == list(range(MARKER_POSITION, ANSWER_START - 1))
    assert tokenizer.decode(list(marker.values())) == "answer:"
    check_heldout_size(HELDOUT_SIZE)
    with pytest.raises(ValueError, match="HELDOUT_SIZE"):
        check_heldout_size(HELDOUT_SIZE + 1)
    assert TASK_NAMES == ("permute",)


def test_batch_layout_and_noise_keep_the_prompt(tokenizer) -> None:
    examples = get_task("permute").heldout(16, 7)
    ids, is_gen = train_sdar.make_block_batch(tokenizer, examples, BLOCK_LENGTH)
    assert ids.shape[1] % BLOCK_LENGTH == 0
    for row, ex in enumerate(examples):
        n = len(ex.prompt)
        assert not is_gen[row, :n].any() and is_gen[row, n:].all()
        text = tokenizer.decode(ids[row, n:].tolist(), skip_special_tokens=True)
        assert text == generation_text(ex)
        assert int(ids[row, n + len(text)]) == tokenizer.eos_token_id
    noisy, masked = train_sdar.noise_blocks(
        ids, is_gen, BLOCK_LENGTH, tokenizer.mask_token_id, torch.Generator().manual_seed(0)
    )
    assert masked.any() and not (masked & ~is_gen).any()
    assert torch.equal(noisy[~masked], ids[~masked])
    assert (noisy[masked] == tokenizer.mask_token_id).all()


def test_two_copy_pass_gives_each_block_the_logits_of_a_clean_prefix(tokenizer) -> None:
    """Every noisy block's logits equal a plain block-causal forward over the clean blocks
    before it followed by that noisy block: what a decoder with the KV cache computes."""
    torch.manual_seed(0)
    model = train_sdar.build_sdar_model(tokenizer, hidden=32, layers=2, heads=4, intermediate=64)
    with torch.no_grad():
        for p in model.parameters():  # away from the near-zero init, so the test can fail
            p.normal_(0.0, 0.3)
    model.eval()
    examples = get_task("permute").heldout(6, 3)
    ids, is_gen = train_sdar.make_block_batch(tokenizer, examples, BLOCK_LENGTH)
    noisy, _ = train_sdar.noise_blocks(
        ids, is_gen, BLOCK_LENGTH, tokenizer.mask_token_id, torch.Generator().manual_seed(1)
    )
    start = 2 * BLOCK_LENGTH
    with torch.no_grad():
        logits = train_sdar.two_copy_logits(model, noisy, ids, start)
        for b in range(start // BLOCK_LENGTH, ids.shape[1] // BLOCK_LENGTH):
            lo, hi = b * BLOCK_LENGTH, (b + 1) * BLOCK_LENGTH
            plain = model(torch.cat([ids[:, :lo], noisy[:, lo:hi]], dim=1))[:, lo:]
            assert torch.allclose(logits[:, lo - start : hi - start], plain, atol=1e-5), b
    with pytest.raises(ValueError, match="multiple"):
        train_sdar.two_copy_logits(model, noisy, ids, 3)


def test_training_steps_lower_the_loss_and_reach_every_parameter(tokenizer) -> None:
    torch.manual_seed(0)
    model = train_sdar.build_sdar_model(tokenizer, hidden=32, layers=2, heads=4, intermediate=64)
    opt = train_sdar.make_optimizer(model, 3e-3, 0.05)
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    task = get_task("permute")
    ids, is_gen = train_sdar.make_block_batch(
        tokenizer, [task.sample(rng) for _ in range(16)], BLOCK_LENGTH
    )
    losses = []
    for step in range(8):
        loss = train_sdar.block_diffusion_loss(model, ids, is_gen, g)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_main_writes_a_loadable_checkpoint(tmp_path) -> None:
    out, log = tmp_path / "weights", tmp_path / "log.json"
    argv = f"--out {out} --log-json {log} --steps 2 --batch-size 4 --warmup 1 --eval-every 2"
    argv += " --eval-n 1 --hidden 32 --layers 1 --heads 2 --kv-heads 1 --intermediate 32"
    train_sdar.main(argv.split())
    model = load_model(out).model
    assert isinstance(model, SDARModel) and model.block_size == BLOCK_LENGTH
    row = json.loads(log.read_text())["curve"][-1]
    assert set(POLICIES) <= set(row)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_decoder_matches_the_sdar_reference(loaded, policy: str) -> None:
    model, tok = loaded.model, loaded.tokenizer
    steps, threshold = POLICIES[policy]
    stops = model.eos_token_ids
    for ex in get_task("permute").heldout(3, HELDOUT_SEED):
        prompt = encode_prompt(tok, ex.prompt)
        ours = block_decode(model, prompt, steps=steps, threshold=threshold)
        ref, passes = bd3_generate(
            model,
            prompt,
            gen_length=GEN_LENGTH,
            block_length=BLOCK_LENGTH,
            steps=steps,
            threshold=threshold,
            stop_ids=stops,
        )
        assert ours.tokens == cut(ref, GEN_LENGTH, stops)
        assert ours.passes == passes


def test_full_and_threshold_decoding_solve_heldout_prompts_and_one_step_does_not(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    task = get_task("permute")
    examples = task.heldout(N_PROMPTS, HELDOUT_SEED)
    full, full_passes, texts = score(model, tok, task, examples, "full")
    threshold, threshold_passes, _ = score(model, tok, task, examples, "threshold")
    one_step, one_step_passes, _ = score(model, tok, task, examples, "one_step")
    assert full * N_PROMPTS >= SOLVED_AT_LEAST, texts
    assert threshold * N_PROMPTS >= SOLVED_AT_LEAST
    assert one_step * N_PROMPTS <= ONE_STEP_AT_MOST
    # Threshold decoding reveals the marker's certain positions together: fewer passes.
    assert one_step_passes < threshold_passes < full_passes


def test_scoring_command_reports_every_policy_asked(capsys) -> None:
    from training import block_decode

    block_decode.main(["--n", "2", "--policies", "one_step,threshold"])
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["n"] == 2 and set(report) >= {"one_step", "threshold"}
    assert "full" not in report
    with pytest.raises(ValueError, match="HELDOUT_SIZE"):
        block_decode.main(["--n", str(HELDOUT_SIZE + 1)])
