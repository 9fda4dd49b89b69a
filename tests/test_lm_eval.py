"""lm-evaluation-harness integration: ``--model foretell`` on local tasks, no network.

The tasks live in tests/lm_eval_tasks (local JSONL of the shipped model's held-out prompts);
the likelihood is checked against literal re-implementations of the references' estimators
(tests/reference_likelihood.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import lm_eval
import reference_likelihood as ref
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import foretell.likelihood as likelihood_module
from foretell import Engine
from foretell.evaluation import evaluate
from foretell.integrations.lm_eval import ForetellLM, parse_constraints
from foretell.likelihood import LikelihoodParams, greedy_matches, loglikelihoods
from foretell.models.default import HELDOUT_SEED
from foretell.tasks import get_task

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
N_PROMPTS = 60  # lines of tests/lm_eval_tasks/arrange_heldout.jsonl

# The harness must find everything locally.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def _texts(seed: int, count: int, lo: int, hi: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(count)]


def _loglikelihood_requests(count: int, seed: int) -> list[Instance]:
    contexts = _texts(seed, count, 4, 10)
    continuations = _texts(seed + 1, count, 2, 7)
    return [
        Instance("loglikelihood", {}, (c, t), i)
        for i, (c, t) in enumerate(zip(contexts, continuations, strict=True))
    ]


# -- the data --------------------------------------------------------------------------------
def test_local_task_holds_the_heldout_prompts():
    from lm_eval_tasks.foretell_tasks import read_docs

    docs = read_docs()
    examples = get_task("arrange").heldout(N_PROMPTS, HELDOUT_SEED)
    assert [d["prompt"] for d in docs] == [e.prompt for e in examples]
    assert [d["answer"] for d in docs] == [e.answer for e in examples]


# -- generate_until ----------------------------------------------------------------------------
@pytest.mark.parametrize("early_commit", [None, "prophet"])
def test_generation_accuracy_equals_foretell_eval(task_manager, early_commit):
    """Same prompts, same decoding: the harness's exact match equals ``foretell eval``'s
    accuracy, and the forward passes agree too (so it is the same decoding, not a lucky tie)."""
    args = {} if early_commit is None else {"early_commit": early_commit}
    result = lm_eval.simple_evaluate(
        model="foretell",
        model_args=args,
        tasks=["foretell_arrange"],
        task_manager=task_manager,
        apply_chat_template=True,
        verbosity="WARNING",
    )
    harness = result["results"]["foretell_arrange"]
    stats = result["config"]["foretell"]
    name = "Full" if early_commit is None else "Prophet"
    report = evaluate(
        Engine(None),
        ["arrange"],
        n=N_PROMPTS,
        curve_n=0,
        names=(name,),
        remaskings=("low_confidence",),
        use_tqdm=False,
    )
    row = report["tasks"]["arrange"]["table"][f"{name} / low_confidence"]
    assert harness["sample_len"] == N_PROMPTS
    assert harness["exact_match,none"] == row["accuracy"]
    assert stats["generate_requests"] == N_PROMPTS
    assert stats["mean_forward_passes"] == pytest.approx(row["mean_forward_passes"])
    assert stats["share_committed_early"] == row["committed_early"]
    assert row["accuracy"] > 0.9  # the shipped model solves its task: not a vacuous match
    if early_commit:
        assert stats["mean_forward_passes"] < stats["mean_step_budget"]


def test_generate_until_returns_outputs_in_request_order():
    """Requests of different lengths through a small batch finish out of order (evicted and
    backfilled); the harness still gets each request's own text at its index."""
    lm = ForetellLM(max_num_seqs=3)
    docs = get_task("arrange").heldout(8, HELDOUT_SEED)
    requests = [
        Instance(
            "generate_until",
            {},
            (d.prompt, {"until": ["\n\n"], "max_gen_toks": 32 if i % 2 else 16}),
            i,
        )
        for i, d in enumerate(docs)
    ]
    texts = lm.generate_until(requests, disable_tqdm=True)
    assert len(texts) == len(requests)
    for req, text in zip(requests, texts, strict=True):
        params = lm.request_params(req.args[1])
        (alone,) = lm.engine.generate([lm._encode(req.args[0])], params, use_tqdm=False)
        assert text == lm._clean(alone.text)
    assert len(set(texts)) > 1


def test_request_params_map_the_harness_arguments():
    lm = ForetellLM(block_length=8, steps=None)
    p = lm.request_params({"until": ["Q:", "\n\n"], "max_gen_toks": 20, "do_sample": False})
    assert (p.gen_length, p.block_length, p.steps) == (24, 8, 24)  # rounded up to blocks of 8
    assert p.stop == ("Q:", "\n\n") and p.temperature == 0.0
    # Stop strings cut the text with its special tokens (LLaDA's evaluation), then they go.
    assert not p.skip_special_tokens
    assert lm._clean("ab<|eos|>c d<|eos|><|pad|>") == "abc d"
    assert p.constraints  # the shipped model's marker fits in 24 tokens
    p = lm.request_params({"until": "x", "max_gen_toks": 8, "do_sample": True, "temperature": 0.5})
    assert (p.gen_length, p.temperature, p.stop, p.constraints) == (8, 0.5, ("x",), None)
    fixed = ForetellLM(gen_length=32, steps=16)
    p = fixed.request_params({"max_gen_toks": 256})
    assert (p.gen_length, p.steps, p.block_length) == (32, 16, 8)


def test_prophet_reference_placement_from_text_constraints(llada64):
    lm = ForetellLM(
        pretrained=llada64,
        dtype="float64",
        gen_length=16,
        block_length=8,
        constraints="4:ab|6:c",
        early_commit="prophet",
        thresholds="9|6|3",
    )
    p = lm.request_params({"max_gen_toks": 16})
    assert p.constraints == {4: "ab", 6: "c"}
    # Each word is tokenized with a leading space (the char tokenizer: " ab" is 3 tokens at
    # 4-6, " c" 2 tokens at 6-7); the answer starts two positions after the last one.
    assert max(lm.engine.requests.constraint_ids(p)) == 7
    assert p.early_commit.answer_start == 9
    assert p.early_commit.thresholds == (9.0, 6.0, 3.0)
    assert parse_constraints("200:The|201:answer|202:is") == {200: "The", 201: "answer", 202: "is"}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"thresholds": "1|2|3"}, "thresholds"),  # without early_commit
        ({"early_commit": "prophet", "thresholds": "1|2"}, "thresholds"),
        ({"early_commit": "maybe"}, "early_commit"),
        ({"constraints": "here:text"}, "constraints"),
        ({"mc_num": 10, "batch_size": 4}, "mc_num"),
        ({"batch_size": "auto"}, "batch_size"),
        ({"gen_length": 30}, "block_length"),  # not a multiple of the shipped model's 8
    ],
)
def test_bad_model_args_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        ForetellLM(**args)


def test_loglikelihood_rolling_is_not_implemented():
    lm = ForetellLM()
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("text",), 0)])


# -- loglikelihood -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_loglikelihood_equals_llada_reference(llada64, cfg):
    """The harness path (tokenization, packing across requests, guidance) gives LLaDA's
    estimate with the same seed."""
    lm = ForetellLM(pretrained=llada64, dtype="float64", mc_num=8, batch_size=4, seed=7, cfg=cfg)
    assert lm.scheme == "llada"
    requests = _loglikelihood_requests(6, seed=3)
    model, tok = llada64.model, llada64.tokenizer
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for req, (ll, is_greedy) in zip(requests, got, strict=True):
        prefix, target = ref.llada_encode_pair(tok, *req.args)
        want = ref.llada_loglikelihood(
            model,
            prefix,
            target,
            mask_id=model.mask_token_id,
            mc_num=8,
            batch_size=4,
            cfg=cfg,
            seed=7,
        )
        assert ll == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert is_greedy == ref.llada_suffix_greedy(
            model, prefix, target, mask_id=model.mask_token_id, cfg=cfg
        )


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_greedy_check_equals_llada_reference(llada64, cfg):
    """Targets that are the model's own greedy suffix pass LLaDA's greedy check, others fail,
    exactly as the reference's suffix_greedy_prediction decides."""
    model, mask_id = llada64.model, llada64.model.mask_token_id
    engine = Engine(llada64, dtype="float64")
    rng = random.Random(5)
    pairs = []
    for _ in range(6):
        prefix = [rng.randrange(4, 40) for _ in range(rng.randint(3, 8))]
        length = rng.randint(1, 5)
        greedy = ref.llada_greedy_suffix(model, prefix, length, mask_id=mask_id, cfg=cfg)
        pairs.append((prefix, greedy))
        pairs.append((prefix, [*greedy[:-1], (greedy[-1] + 1) % 40 + 4]))
    got = greedy_matches(engine, pairs, cfg)
    want = [ref.llada_suffix_greedy(model, p, t, mask_id=mask_id, cfg=cfg) for p, t in pairs]
    assert got == want
    assert got[::2] == [True] * 6 and not any(got[1::2])


def test_loglikelihood_does_not_depend_on_batching(llada64, monkeypatch):
    pairs = [([5, 6, 7, 8], [9, 10, 11]), ([12, 13], [14, 15, 16, 17, 18])]
    params = LikelihoodParams(mc_num=8, batch_size=2, seed=3)
    together = loglikelihoods(llada64.model, pairs, params, max_tokens=10_000)
    monkeypatch.setattr(likelihood_module, "HEAD_ROWS", 3)  # the LM head in slices of 3 rows
    sliced = loglikelihoods(llada64.model, pairs, params, max_tokens=10_000)
    monkeypatch.undo()
    assert sliced == pytest.approx(together, rel=1e-12)
    one_row_per_pass = loglikelihoods(llada64.model, pairs, params, max_tokens=1)
    alone = [loglikelihoods(llada64.model, [p], params)[0] for p in reversed(pairs)][::-1]
    assert together == pytest.approx(one_row_per_pass, rel=1e-12)
    assert together == pytest.approx(alone, rel=1e-12)
    other_seed = loglikelihoods(
        llada64.model, pairs, LikelihoodParams(mc_num=8, batch_size=2, seed=4)
    )
    assert other_seed != together


def test_loglikelihood_equals_dream_reference(dream64):
    """Dream models use Dream's estimator (nll_type=mc, ftb): its draws, its shifted logits, its
    EOS-terminated target; no greedy check, as in Dream's evaluation."""
    lm = ForetellLM(pretrained=dream64, dtype="float64", mc_num=6, batch_size=3, seed=11)
    assert lm.scheme == "dream"
    requests = _loglikelihood_requests(5, seed=9)
    model, tok = dream64.model, dream64.tokenizer
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for req, (ll, is_greedy) in zip(requests, got, strict=True):
        prefix, target = ref.dream_encode_pair(tok, *req.args)
        want = ref.dream_loglikelihood(
            model, prefix, target, mask_id=model.mask_token_id, mc_num=6, batch_size=3, seed=11
        )
        assert ll == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert is_greedy is False


def test_multiple_choice_task_runs_end_to_end(task_manager):
    """A local multiple-choice task through simple_evaluate: the harness's accuracy is the
    argmax of foretell's estimates over the choices."""
    from lm_eval_tasks.foretell_tasks import choices, read_docs

    limit = 12
    args = {"mc_num": 8, "batch_size": 4, "is_check_greedy": False}
    result = lm_eval.simple_evaluate(
        model="foretell",
        model_args=args,
        tasks=["foretell_arrange_mc"],
        task_manager=task_manager,
        limit=limit,
        verbosity="WARNING",
    )
    acc = result["results"]["foretell_arrange_mc"]["acc,none"]
    lm = ForetellLM(**args)
    right = 0
    for doc in read_docs()[:limit]:
        pairs = [lm.encode_pair(doc["prompt"], c) for c in choices(doc)]
        values = loglikelihoods(lm.engine.model, pairs, lm.likelihood_params)
        right += int(max(range(len(values)), key=values.__getitem__) == 0)
    assert acc == right / limit
    assert result["config"]["foretell"]["loglikelihood_requests"] == 4 * limit


# -- the command line ----------------------------------------------------------------------------
def test_module_cli_runs_the_harness(tmp_path):
    """``python -m foretell.integrations.lm_eval`` registers the model and runs the harness CLI
    (a fresh process, so nothing was imported beforehand)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "foretell.integrations.lm_eval",
        "--model",
        "foretell",
        "--model_args",
        "early_commit=prophet,threads=1",
        "--tasks",
        "foretell_arrange",
        "--include_path",
        str(TASKS),
        "--apply_chat_template",
        "--limit",
        "8",
        "--output_path",
        str(tmp_path),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "foretell_arrange" in run.stdout
    assert "committed early" in run.stderr
    (path,) = tmp_path.rglob("results_*.json")
    saved = json.loads(path.read_text())
    assert saved["config"]["foretell"]["generate_requests"] == 8


def test_block_causal_models_generate_and_refuse_likelihood(tmp_path):
    """An SDAR checkpoint: generate_until decodes with the model's block and per-block steps,
    each request as the engine alone; loglikelihood is not defined by its evaluation."""
    from tests.block_checkpoints import sdar_checkpoint

    path = sdar_checkpoint(tmp_path / "sdar", seed=2)[0]
    lm = ForetellLM(pretrained=str(path), max_num_seqs=2)
    requests = [
        Instance("generate_until", {}, (text, {"until": ["zz"], "max_gen_toks": 10 + i}), i)
        for i, text in enumerate(["abc", "hello 12", "x"])
    ]
    texts = lm.generate_until(requests, disable_tqdm=True)
    for req, text in zip(requests, texts, strict=True):
        params = lm.request_params(req.args[1])
        assert params.gen_length == req.args[1]["max_gen_toks"]
        (alone,) = lm.engine.generate([lm._encode(req.args[0])], params, use_tqdm=False)
        assert text == lm._clean(alone.text)
        assert alone.num_forward_passes > 0
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood(_loglikelihood_requests(1, seed=0))
