"""foretell against the official block-diffusion decoders (SDAR, LLaDA2), side by side on this CPU.

    python benchmarks/block_decoders.py --threads 1 --out benchmarks/results/block_decoders.json
    python benchmarks/block_decoders.py --model DIR --n 200   # a trained checkpoint: + accuracy

**The "official decoders" here are foretell's re-implementations of them, not the official
code**, which cannot run on this machine (SDAR's modeling file needs flash-attn; no weights can
be downloaded): ``tests/reference_sdar.py::bd3_generate`` (SDAR's ``bd3`` evaluation decoder,
batch 1: a prefill of the prompt's whole blocks, the block denoised over a KV cache, one extra
store pass per finished block) and ``tests/reference_llada2.py::llada2_generate`` with
``use_cache=False`` (LLaDA2's model-card ``generate``, batch 1: the window from position 0 to
the current block's end re-encoded at every step). Both were written from the official code and
are token for token with foretell's engine in tests/test_block_engine.py.

Each family gets a random checkpoint with its shapes scaled down, built through foretell's model
classes and saved in the family's Hugging Face layout (``save_model``); the reference loads it
with ``load_model`` and foretell with ``Engine(path)``. The same random token-id prompts go to
every mode, greedy, in float32, and every mode's tokens are compared with the reference's:

- ``reference``: the re-implemented official decoder, one request after another (batch 1);
- ``foretell-b1``: foretell's engine with ``max_num_seqs=1`` (the cache and pass shapes alone);
- ``foretell``: the engine with every request submitted at once, ``--max-num-seqs`` (16) at a time;
- ``reference-prophet`` / ``foretell-prophet``: both with Prophet's block-wise early commit
  (foretell's rule; there is no official Prophet for these families), default thresholds;
- ``foretell-prophet-low``: Prophet with lower thresholds (``--low-thresholds``), a labelled
  variant: on random weights the default thresholds rarely fire.

Decoding, as the official defaults: SDAR blocks of 4, 4 steps per block, the static schedule
(one token a step, low-confidence; ``--sdar-threshold`` for the dynamic one); LLaDA2 blocks of
32, 32 steps per block, ``threshold`` 0.95, ``minimal_topk`` 1, no cache. EOS: with random
weights every request runs to ``gen_length`` (``ignore_eos`` and no stop ids on both sides);
``--eos`` (the default with ``--model``) stops both sides on the model's EOS ids (LLaDA2's
``generate`` takes one: the first, with ``eos_early_stop`` as the model card calls it).

``--model DIR`` runs a trained block-causal checkpoint (its family from config.json) on
held-out prompts of the shipped tasks, chat-templated, and adds each mode's accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: this checkout's foretell and tests/
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from foretell.bench.report import machine_info, model_info, write_json  # noqa: E402
from foretell.engine import Engine  # noqa: E402
from foretell.models import load_model  # noqa: E402
from foretell.models.default import PROPHET_ANSWER_LENGTH  # noqa: E402
from foretell.models.llada2 import LLaDA2Config, LLaDA2Model  # noqa: E402
from foretell.models.registry import save_model  # noqa: E402
from foretell.models.sdar import SDARConfig, SDARModel  # noqa: E402
from foretell.params import DecodeParams, Prophet  # noqa: E402
from foretell.tasks import ANSWER_START  # noqa: E402
from tests.reference_llada2 import llada2_generate  # noqa: E402
from tests.reference_sdar import bd3_generate, cut  # noqa: E402

FAMILIES = ("sdar", "llada2")
REFERENCES = {
    "sdar": "tests/reference_sdar.py::bd3_generate (use_cache=True): foretell's "
    "re-implementation of SDAR's bd3 decoder (huggingface_bd3.py), not the official code",
    "llada2": "tests/reference_llada2.py::llada2_generate (use_cache=False): foretell's "
    "re-implementation of LLaDA2's model-card generate (modeling_llada2_moe.py), not the "
    "official code",
}
# The issue's targets: foretell at --max-num-seqs against the reference, generated tokens/s.
TARGETS = {"sdar": 3.0, "llada2": 5.0}
BLOCKS = {"sdar": 4, "llada2": 32}  # the released checkpoints' / model card's block length
LLADA2_THRESHOLD = 0.95  # the model card generate's default
DEFAULT_THRESHOLDS = Prophet().thresholds
LOW_THRESHOLDS = (2.5, 2.0, 1.0)
# Prophet's region, block by block: the block's still-masked positions, or (a model trained on
# the shipped tasks) the part of their answer span inside the block.
PROPHET_SPANS = {
    "masked": {"answer_start": None},
    "answer": {"answer_start": ANSWER_START, "answer_length": PROPHET_ANSWER_LENGTH},
}
# Random weights: the residual branches' outputs scaled up so that a position's context, not
# only its own embedding, decides its token (else every mask of a block predicts one token),
# and the head scaled up so that probabilities spread as a trained model's do (LLaDA2's 0.95
# threshold then reveals a few tokens a step, few near-ties).
HEAD_SCALE = 8.0
BRANCH_SCALE = 4.0
ROUTER_SCALE = 4.0


@dataclasses.dataclass(frozen=True)
class Shape:
    """The scaled-down size both random checkpoints share; each family derives its layout."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4


def _special_ids(shape: Shape, special: tuple[int, int] | None) -> tuple[int, tuple[int, ...]]:
    mask, eos = special or (shape.vocab_size - 1, shape.vocab_size - 2)
    return mask, (eos,)


def sdar_model(shape: Shape, special: tuple[int, int] | None = None) -> SDARModel:
    """SDAR's layout scaled down: 8 query heads over 2 KV heads (GQA 4:1, as SDAR-4B's 32:8),
    heads twice as wide as hidden / heads (SDAR-4B: 32 x 128 over 2560), untied head, blocks
    of 4; ``special`` (mask, EOS) ids, by default the vocabulary's last two."""
    h = shape.hidden_size
    cfg = SDARConfig(
        vocab_size=shape.vocab_size,
        hidden_size=h,
        intermediate_size=3 * h,
        num_layers=shape.num_layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=2 * h // 8,
    )
    mask, eos = _special_ids(shape, special)
    return SDARModel(cfg, block_size=BLOCKS["sdar"], mask_token_id=mask, eos_token_ids=eos)


def llada2_model(shape: Shape, special: tuple[int, int] | None = None) -> LLaDA2Model:
    """LLaDA2-mini's layout scaled down: a dense first layer, then MoE (16 experts in 4 groups,
    the 2 best groups kept, top-4, one shared expert), 8 query heads over 2 KV heads, rotary on
    half of each head, blocks of 32."""
    h = shape.hidden_size
    cfg = LLaDA2Config(
        vocab_size=shape.vocab_size,
        hidden_size=h,
        intermediate_size=2 * h,
        num_layers=shape.num_layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=h // 8,
        rotary_dim=h // 16,
        num_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=h // 4,
        num_shared_experts=1,
        first_k_dense_replace=1,
    )
    mask, eos = _special_ids(shape, special)
    return LLaDA2Model(cfg, block_size=BLOCKS["llada2"], mask_token_id=mask, eos_token_ids=eos)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights that decode non-degenerately (see ``HEAD_SCALE``): matrices N(0, 1/fan_in)
    times their scale, norms near 1, biases small."""
    g = torch.Generator().manual_seed(seed)
    branch_outputs = ("o_proj", "dense", "down_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            noise = torch.randn(p.shape, generator=g)
            if "norm" in parts[-2]:
                p.copy_(1.0 + 0.1 * noise)
            elif name == "embed.weight":
                p.copy_(noise)
            elif name.endswith("expert_bias"):
                p.copy_(0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                scale = 1.0
                if name == "lm_head.weight":
                    scale = HEAD_SCALE
                elif name.endswith("mlp.gate.weight"):
                    scale = ROUTER_SCALE
                elif parts[-1] in branch_outputs or parts[-2] in branch_outputs:
                    scale = BRANCH_SCALE
                p.copy_(noise * scale / p.shape[-1] ** 0.5)
    return model.eval().requires_grad_(False)


def build_checkpoint(
    family: str, directory: Path, shape: Shape, seed: int = 0, tokenizer: object | None = None
) -> Path:
    """A random checkpoint of ``family`` at ``shape``, in the family's released layout; with a
    ``tokenizer`` (saved with it), its vocabulary, mask and EOS ids."""
    build = {"sdar": sdar_model, "llada2": llada2_model}[family]
    special = None
    if tokenizer is not None:
        shape = dataclasses.replace(shape, vocab_size=len(tokenizer))  # type: ignore[arg-type]
        special = (tokenizer.mask_token_id, tokenizer.eos_token_id)  # type: ignore[attr-defined]
    return save_model(randomise(build(shape, special), seed), directory, tokenizer)


def random_prompts(
    n: int, lengths: tuple[int, int], vocab: Sequence[int], seed: int
) -> list[list[int]]:
    """``n`` seeded token-id prompts, each of a length drawn uniformly from ``lengths``."""
    rng = random.Random(f"block-decoders/{seed}")
    return [[rng.choice(vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Decoding:
    """One family's decoding, as both sides take it."""

    family: str
    gen_length: int
    block_length: int
    steps: int
    threshold: float | None  # None: SDAR's static schedule
    stop_ids: tuple[int, ...] = ()  # () with ignore_eos: every request runs to gen_length
    eos_early_stop: bool = False

    def params(self, prophet: Prophet | None = None) -> DecodeParams:
        """foretell's request parameters for the same decoding (stop ids explicit, so that
        both sides stop on exactly the same ones)."""
        return DecodeParams(
            gen_length=self.gen_length,
            block_length=self.block_length,
            steps=self.steps,
            remasking="low_confidence" if self.threshold is None else "confidence_threshold",
            threshold=0.9 if self.threshold is None else self.threshold,
            stop_token_ids=self.stop_ids,
            ignore_eos=True,  # the stop ids are exactly ``stop_ids``, on both sides
            eos_early_stop=self.eos_early_stop,
            early_commit=prophet,
        )

    def reference(
        self, model: torch.nn.Module, prompt: list[int], prophet: Prophet | None
    ) -> tuple[list[int], int]:
        """(tokens as foretell returns them, the reference's forward calls): Prophet's policy
        becomes the reference decoders' tuple, the stop ids their ``stop_ids`` / ``eos_id``."""
        policy = None
        if prophet is not None:
            span = None
            if prophet.answer_start is not None:
                span = (prophet.answer_start, prophet.answer_length)
            policy = (prophet.thresholds, prophet.bounds, prophet.statistic, span)
        kw = dict(
            gen_length=self.gen_length,
            block_length=self.block_length,
            steps=self.steps,
            prophet=policy,
        )
        if self.family == "sdar":
            tokens, calls = bd3_generate(
                model, prompt, threshold=self.threshold, stop_ids=self.stop_ids, **kw
            )
            return cut(tokens, self.gen_length, self.stop_ids), calls
        eos = self.stop_ids[0] if self.stop_ids else -1
        return llada2_generate(
            model,
            prompt,
            threshold=LLADA2_THRESHOLD if self.threshold is None else self.threshold,
            eos_id=eos,
            eos_early_stop=self.eos_early_stop,
            use_cache=False,
            **kw,
        )


class ForwardCounter:
    """Counts a model's forward calls and the tokens they run (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.tokens = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        self.calls += 1
        self.tokens += int(ids.numel())

    def close(self) -> None:
        self._handle.remove()


def _timed(fn: Callable[[], list]) -> tuple[list, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_reference(
    model: torch.nn.Module,
    decoding: Decoding,
    prompts: Sequence[list[int]],
    prophet: Prophet | None,
) -> dict:
    """The reference decoder over every prompt, one after another."""
    counter = ForwardCounter(model)
    try:
        results, wall, cpu = _timed(
            lambda: [decoding.reference(model, p, prophet) for p in prompts]
        )
    finally:
        counter.close()
    tokens = [t for t, _ in results]
    return _record(
        tokens,
        wall,
        cpu,
        passes=[c for _, c in results],
        forward_calls=counter.calls,
        forward_tokens=counter.tokens,
        committed=None,
    )


def run_engine(
    engine: Engine,
    decoding: Decoding,
    prompts: Sequence[list[int]],
    prophet: Prophet | None,
) -> dict:
    """Every prompt submitted at once; the engine runs ``max_num_seqs`` of them at a time."""
    m = engine.metrics
    before = (m.steps, m.tokens_in_passes)
    params = decoding.params(prophet)
    outs, wall, cpu = _timed(lambda: engine.generate(list(prompts), params, use_tqdm=False))
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"foretell: {len(errors)} requests failed, first: {errors[0]}")
    return _record(
        [o.token_ids for o in outs],
        wall,
        cpu,
        passes=[o.num_forward_passes for o in outs],
        forward_calls=m.steps - before[0],
        forward_tokens=m.tokens_in_passes - before[1],
        committed=[o.committed_early for o in outs],
    )


def _record(
    tokens: list[list[int]],
    wall: float,
    cpu: float,
    *,
    passes: list[int],
    forward_calls: int,
    forward_tokens: int,
    committed: list[bool] | None,
) -> dict:
    generated = sum(len(t) for t in tokens)
    n = len(tokens)
    return {
        "n": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "generated_tokens": generated,
        "tokens_per_s": generated / wall,
        "tokens_per_cpu_s": generated / cpu,
        # Per request: the reference's forward calls (SDAR: prefill, denoising and store
        # passes; LLaDA2: denoising passes over the window); foretell's denoising passes
        # (its prefill and store rows ride in the next pass).
        "mean_passes_per_request": sum(passes) / n,
        # Forward calls of the whole run (the engine's batched passes) and the tokens they ran.
        "forward_calls": forward_calls,
        "forward_tokens": forward_tokens,
        "committed_early_share": None if committed is None else sum(committed) / n,
        "distinct_tokens_per_request": sum(len(set(t)) for t in tokens) / n,
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "token_ids": tokens,
    }


def _best(runs: list[dict]) -> dict:
    """The fastest of a mode's repeats (the VM's speed drifts; docs/benchmarks.md)."""
    return min(runs, key=lambda r: r["wall_s"])


def _tokens_hash(tokens: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(tokens, separators=(",", ":")).encode()).hexdigest()


def agreement(tokens: Sequence[list[int]], expected: Sequence[list[int]]) -> int:
    """How many requests' tokens are identical to the expected ones."""
    return sum(a == b for a, b in zip(tokens, expected, strict=True))


MODES = (
    # (name, runs on, Prophet, whose tokens it must reproduce)
    ("reference", "reference", None, "reference"),
    ("foretell-b1", "engine-b1", None, "reference"),
    ("foretell", "engine", None, "reference"),
    ("reference-prophet", "reference", "default", "reference-prophet"),
    ("foretell-prophet", "engine", "default", "reference-prophet"),
    ("reference-prophet-low", "reference", "low", "reference-prophet-low"),
    ("foretell-prophet-low", "engine", "low", "reference-prophet-low"),
)


def bench_family(
    family: str,
    path: Path,
    decoding: Decoding,
    prompts: Sequence[list[int]],
    *,
    max_num_seqs: int,
    prophets: dict[str, Prophet],
    repeats: int = 1,
    check: Callable[[int, list[int]], bool] | None = None,
    modes: Sequence[str] | None = None,
) -> dict:
    """Every mode on ``prompts``, round-robin ``repeats`` times (the fastest run kept), with
    each mode's agreement with its reference and, given ``check(i, tokens)``, its accuracy."""
    reference_model = load_model(path).model
    engines = {
        "engine": Engine(str(path), max_num_seqs=max_num_seqs),
        "engine-b1": Engine(str(path), max_num_seqs=1),
    }
    chosen = [m for m in MODES if modes is None or m[0] in modes]
    # Untimed warm-up: one short request through each side.
    warm = Decoding(family, decoding.block_length, decoding.block_length, decoding.steps, None)
    warm.reference(reference_model, list(prompts[0][:8]), None)
    for engine in engines.values():
        engine.generate([list(prompts[0][:8])], warm.params(), use_tqdm=False)
    runs: dict[str, list[dict]] = {name: [] for name, *_ in chosen}
    for _ in range(repeats):
        for name, side, policy, _against in chosen:
            prophet = None if policy is None else prophets[policy]
            if side == "reference":
                rec = run_reference(reference_model, decoding, prompts, prophet)
            else:
                rec = run_engine(engines[side], decoding, prompts, prophet)
            runs[name].append(rec)
            print(
                f"  {family:<7} {name:<21} {rec['tokens_per_s']:>8.1f} tok/s "
                f"({rec['wall_s']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    best = {name: _best(rs) for name, rs in runs.items()}
    for name, side, policy, against in chosen:
        rec = best[name]
        full = best.get("reference" if side == "reference" else "foretell")
        rec["prophet"] = None if policy is None else dataclasses.asdict(prophets[policy])
        rec["compared_with"] = against if against in best else None
        rec["same_tokens"] = (
            agreement(rec["token_ids"], best[against]["token_ids"]) if against in best else None
        )
        rec["same_as_full_decoding"] = (
            agreement(rec["token_ids"], full["token_ids"]) if full is not None else None
        )
        rec["accuracy"] = (
            None
            if check is None
            else sum(check(i, t) for i, t in enumerate(rec["token_ids"])) / len(prompts)
        )
        rec["repeats"] = [r["wall_s"] for r in runs[name]]
    for rec in best.values():
        rec["token_ids_sha256"] = _tokens_hash(rec.pop("token_ids"))
    ratios = _ratios(best, "reference")
    targets = []
    if "reference" in best and "foretell" in best:
        value = ratios["foretell"]["tokens_per_s"]
        same = best["foretell"]["same_tokens"]
        targets.append(
            {
                "target": f"foretell at {max_num_seqs} concurrent / reference (batch 1), "
                "generated tokens/s, with the same tokens",
                "goal": f">= {TARGETS[family]}",
                "value": value,
                "value_cpu": ratios["foretell"]["tokens_per_cpu_s"],
                "same_tokens": f"{same}/{len(prompts)}",
                "met": value >= TARGETS[family] and same == len(prompts),
            }
        )
    model = engines["engine"].model
    return {
        "reference": REFERENCES[family],
        "model": model_info(model, path),
        "config": model.checkpoint_config(),
        "decoding": dataclasses.asdict(decoding),
        "max_num_seqs": max_num_seqs,
        "n": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "modes": best,
        "ratios_vs_reference": ratios,
        # Prophet's further gain: against foretell without it.
        "ratios_vs_foretell": _ratios(best, "foretell"),
        "targets": targets,
    }


def _ratios(best: dict[str, dict], against: str) -> dict[str, dict[str, float]]:
    """Each mode's generated tokens/s (wall and CPU time) over mode ``against``'s."""
    if against not in best:
        return {}
    base = best[against]
    return {
        name: {
            "tokens_per_s": rec["tokens_per_s"] / base["tokens_per_s"],
            "tokens_per_cpu_s": rec["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
        }
        for name, rec in best.items()
    }


def format_family(family: str, result: dict) -> str:
    """The terminal table of one family: tokens/s against the reference (wall and CPU time) and
    against foretell without Prophet, passes, and whose tokens each mode reproduces."""
    d, n = result["decoding"], result["n"]
    rule = "static" if d["threshold"] is None else f"threshold {d['threshold']}"
    accuracy = any(r["accuracy"] is not None for r in result["modes"].values())
    header = (
        f"  {'mode':<21} {'tok/s':>7} {'x ref':>6} {'x(cpu)':>6} {'x f':>5} {'passes/req':>10} "
        f"{'fwd calls':>9} {'fwd tokens':>10} {'same':>6} {'=full':>6} {'early':>5}"
    )
    lines = [
        f"{family}: {result['model']['parameters']:,} parameters, gen {d['gen_length']}, "
        f"block {d['block_length']}, {d['steps']} steps/block, {rule}, "
        f"{n} requests, max_num_seqs {result['max_num_seqs']}",
        f"  reference: {result['reference']}",
        header + (f" {'acc':>6}" if accuracy else ""),
    ]
    nan = {"tokens_per_s": float("nan"), "tokens_per_cpu_s": float("nan")}
    for name, rec in result["modes"].items():
        ref = result["ratios_vs_reference"].get(name, nan)
        own = result["ratios_vs_foretell"].get(name, nan)
        same, full = rec["same_tokens"], rec["same_as_full_decoding"]
        early = rec["committed_early_share"]
        line = (
            f"  {name:<21} {rec['tokens_per_s']:>7.1f} {ref['tokens_per_s']:>5.2f}x "
            f"{ref['tokens_per_cpu_s']:>5.2f}x {own['tokens_per_s']:>4.2f}x "
            f"{rec['mean_passes_per_request']:>10.1f} {rec['forward_calls']:>9} "
            f"{rec['forward_tokens']:>10} {'-' if same is None else f'{same}/{n}':>6} "
            f"{'-' if full is None else f'{full}/{n}':>6} "
            f"{'-' if early is None else f'{100 * early:.0f}%':>5}"
        )
        if accuracy:
            acc = rec["accuracy"]
            line += f" {'-' if acc is None else f'{100 * acc:.1f}%':>6}"
        lines.append(line)
    for t in result["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        lines.append(
            f"  target {t['goal']}x: {t['value']:.2f}x wall, {t['value_cpu']:.2f}x cpu, "
            f"same tokens {t['same_tokens']}: {verdict}"
        )
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _task_prompts(engine: Engine, n: int) -> tuple[list[list[int]], Callable]:
    """Held-out prompts of the shipped tasks, chat-templated to token ids, and their checker."""
    from foretell.models.default import HELDOUT_SEED, TASK_NAMES, check_heldout_size
    from foretell.tasks import get_task

    check_heldout_size(n)
    if engine.tokenizer is None:
        raise ValueError("--model: the checkpoint has no tokenizer (task prompts need one)")
    tasks = [get_task(name) for name in TASK_NAMES]
    pools = {t.name: iter(t.heldout(n, HELDOUT_SEED)) for t in tasks}
    rng = random.Random("block-decoders/tasks")
    examples = []
    for _ in range(n):
        task = rng.choice(tasks)
        examples.append((task, next(pools[task.name])))
    prompts = [
        engine.requests.encode([{"role": "user", "content": ex.prompt}]) for _, ex in examples
    ]
    tok = engine.tokenizer

    def check(i: int, tokens: list[int]) -> bool:
        task, ex = examples[i]
        return task.check(ex, tok.decode(tokens, skip_special_tokens=True))

    return prompts, check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        help="a trained SDAR or LLaDA2 checkpoint (e.g. the block-causal default, once "
        "trained): run its family on held-out task prompts and report accuracy",
    )
    p.add_argument("--families", default=",".join(FAMILIES), help="random checkpoints to run")
    p.add_argument("--n", type=int, default=16, help="requests (the same for every mode)")
    p.add_argument("--prompt-tokens", default="8,64", help="random prompts: min,max length")
    p.add_argument("--gen-length", type=int, default=None, help="default 64 (--model: 32)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=Shape.vocab_size)
    p.add_argument("--hidden-size", type=int, default=Shape.hidden_size)
    p.add_argument("--layers", type=int, default=Shape.num_layers)
    p.add_argument(
        "--sdar-threshold",
        type=float,
        help="SDAR's dynamic schedule with this threshold (default: the static one)",
    )
    p.add_argument("--eos", action="store_true", help="stop on the model's EOS (on with --model)")
    p.add_argument("--thresholds", type=_floats, help="Prophet's thresholds (default 7.5,5,2.5)")
    p.add_argument("--prophet-statistic", choices=["mean", "min"], default="mean")
    p.add_argument(
        "--prophet-span",
        choices=sorted(PROPHET_SPANS),
        default="masked",
        help="Prophet's region: each block's masks, or the shipped tasks' answer span",
    )
    p.add_argument("--low-thresholds", type=_floats, default=LOW_THRESHOLDS)
    p.add_argument("--modes", help=f"comma-separated subset of {[m[0] for m in MODES]}")
    p.add_argument("--repeats", type=int, default=1, help="round-robin; fastest run kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", help="where the random checkpoints go (default: a temp dir)")
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lo, hi = (int(v) for v in args.prompt_tokens.split(","))
    modes = args.modes.split(",") if args.modes else None
    shape = Shape(args.vocab_size, args.hidden_size, args.layers)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        if args.model:
            path = Path(args.model)
            probe = Engine(str(path), max_num_seqs=1)
            families = [probe.model.family]
            prompts_of = {families[0]: _task_prompts(probe, args.n)}
            gen = args.gen_length or 32
            eos = True
        else:
            families = [f for f in args.families.split(",") if f]
            unknown = set(families) - set(FAMILIES)
            if unknown:
                p.error(f"--families: unknown {sorted(unknown)}; choose from {FAMILIES}")
            gen, eos, prompts_of = args.gen_length or 64, args.eos, {}
        for family in families:
            if not args.model:
                path = build_checkpoint(family, workdir / family, shape, seed=args.seed)
            model = load_model(path, load_tokenizer=False).model
            vocab = [
                t
                for t in range(model.vocab_size)
                if t != model.mask_token_id and t not in model.eos_token_ids
            ]
            prompts, check = prompts_of.get(
                family, (random_prompts(args.n, (lo, hi), vocab, args.seed), None)
            )
            block = model.block_size  # BLOCKS[family] for the random checkpoints
            stop_ids: tuple[int, ...] = ()
            if eos:
                stop_ids = model.eos_token_ids[:1] if family == "llada2" else model.eos_token_ids
            threshold = args.sdar_threshold if family == "sdar" else LLADA2_THRESHOLD
            decoding = Decoding(
                family,
                gen,
                block,
                block,
                threshold,
                stop_ids=stop_ids,
                eos_early_stop=eos and family == "llada2",
            )
            default = Prophet(
                thresholds=args.thresholds or DEFAULT_THRESHOLDS,
                statistic=args.prophet_statistic,
                **PROPHET_SPANS[args.prophet_span],
            )
            prophets = {
                "default": default,
                "low": dataclasses.replace(default, thresholds=args.low_thresholds),
            }
            results[family] = bench_family(
                family,
                path,
                decoding,
                prompts,
                max_num_seqs=args.max_num_seqs,
                prophets=prophets,
                repeats=args.repeats,
                check=check,
                modes=modes,
            )
            print(format_family(family, results[family]), flush=True)
    if args.out:
        write_json(
            args.out,
            {
                "families": results,
                "note": "reference = foretell's re-implementations of the official decoders "
                "(tests/reference_sdar.py, tests/reference_llada2.py), not the official code",
                "machine": machine_info(),
                "args": vars(args),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
