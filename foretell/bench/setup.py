"""What to benchmark: the model, its decoding layout and the workload mix it supports.

The shipped model has a fixed layout (GEN_LENGTH tokens, the ``answer:`` marker forced by
constraints, Prophet's span right after it), so its workload mixes block lengths and step
budgets but not generation lengths. Other checkpoints get generic choices derived from
``DecodeParams``' defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from foretell.models.registry import LoadedModel, load_model
from foretell.params import DecodeParams, Prophet

# The default model's mix: semi-autoregressive blocks (a quarter and a half of the generation,
# as LLaDA decodes with its instruct models), a full and a three-quarter step budget, and both
# remasking rules of the paper. These are the settings whose full decoding the model does well
# (82-100% per setting); half budgets with blocks of 8 or 16 (0-7% with low-confidence
# remasking) and a single block of 32 (where Prophet can commit only late) are measured on
# their own in docs/benchmarks.md.
DEFAULT_BLOCK_LENGTHS = (8, 16)
DEFAULT_STEP_BUDGETS = (32, 24)
DEFAULT_REMASKINGS = ("low_confidence", "random")

# ``--model random``: the shipped model's architecture (LLaDA: RMSNorm, rotary, SwiGLU MLP of 3x
# the hidden size, multi-head attention with heads of 32) scaled up, with seeded random weights:
# for speed only (its tokens mean nothing). Its decoding: LLaDA's semi-autoregressive blocks of
# 32 over a generation of 256, full steps (one token per step), as Fast-dLLM measures.
RANDOM_MODEL = "random"
RANDOM_SHAPE = (256, 8)  # hidden size, layers: sized in docs/benchmarks.md (KV cache)
RANDOM_HEAD_DIM = 32
RANDOM_GEN_LENGTH = 256
RANDOM_BLOCK_LENGTH = 32
# Prophet on a random model: Prophet's default span length (5) placed at the start of the
# generation's last block, where a long answer follows its reasoning.
RANDOM_PROPHET_SPAN = 5


@dataclass
class BenchSetup:
    name: str
    loaded: LoadedModel
    base: DecodeParams  # the model's own decoding; the workload varies lengths and budgets
    prophet: Prophet  # what "Prophet" means for this model
    tasks: tuple[str, ...]
    block_lengths: list[int] = field(default_factory=list)
    step_budgets: list[int] = field(default_factory=list)
    gen_lengths: list[int] = field(default_factory=list)
    remaskings: list[str] = field(default_factory=list)
    # Random token-id prompts of this length range instead of task prompts (a random model).
    prompt_tokens: tuple[int, int] | None = None
    # A block-causal model: step budgets count per block (DecodeParams.for_block_model).
    per_block_steps: bool = False

    def workload(self, n: int, seed: int) -> list:
        """``n`` seeded requests in this setup's mix (the same list for every mode)."""
        from foretell.bench.workload import make_workload

        return make_workload(
            self.base,
            n,
            seed=seed,
            tasks=self.tasks,
            block_lengths=self.block_lengths,
            step_budgets=self.step_budgets,
            gen_lengths=self.gen_lengths,
            remaskings=self.remaskings,
            prompt_tokens=self.prompt_tokens,
            prompt_vocab=self.prompt_vocab,
            per_block_steps=self.per_block_steps,
        )

    @property
    def prompt_vocab(self) -> list[int]:
        """Token ids a random prompt draws from: every id but the special ones."""
        tok = self.loaded.tokenizer
        special = set(getattr(tok, "all_special_ids", ()) or ())
        special.add(self.loaded.model.mask_token_id)
        return [i for i in range(len(tok)) if i not in special]


def configure_prophet(
    prophet: Prophet,
    thresholds: tuple[float, ...] | None = None,
    statistic: str | None = None,
) -> Prophet:
    """The model's Prophet with the benchmark's overrides (validated by ``Prophet``)."""
    changes: dict = {}
    if thresholds:
        changes["thresholds"] = tuple(thresholds)
    if statistic:
        changes["statistic"] = statistic
    return dataclasses.replace(prophet, **changes) if changes else prophet


def add_setup_args(p: argparse.ArgumentParser, *, prophet: bool = True) -> None:
    """The options every benchmark script shares: model, threads and Prophet overrides."""
    p.add_argument("--model", help="checkpoint (default: the shipped model); 'tiny' for a smoke")
    p.add_argument("--default-layout", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    if prophet:
        p.add_argument("--thresholds", help="Prophet's early,mid,late gap thresholds")
        p.add_argument("--prophet-statistic", choices=["mean", "min"])


def setup_from_args(args: argparse.Namespace) -> tuple[BenchSetup, Prophet]:
    """Set the torch threads, load the setup and apply the Prophet overrides of ``args``
    (options from :func:`add_setup_args`)."""
    torch.set_num_threads(args.threads)
    setup = load_for_bench(args.model, default_layout=args.default_layout)
    text = getattr(args, "thresholds", None)
    thresholds = tuple(float(v) for v in text.split(",")) if text else None
    statistic = getattr(args, "prophet_statistic", None)
    return setup, configure_prophet(setup.prophet, thresholds, statistic)


def _default_layout(loaded: LoadedModel) -> tuple[DecodeParams, Prophet]:
    from foretell.models.default.params import default_decode_params, default_prophet

    return default_decode_params(loaded.tokenizer), default_prophet()


def random_llada(
    hidden_size: int, num_layers: int, *, dtype: str = "float32", seed: int = 0
) -> LoadedModel:
    """The shipped model's architecture at ``hidden_size`` x ``num_layers``, random weights."""
    from foretell.models.tiny import tiny_model

    if hidden_size < RANDOM_HEAD_DIM or hidden_size % RANDOM_HEAD_DIM:
        raise ValueError(
            f"random_shape: hidden size must be a multiple of {RANDOM_HEAD_DIM}, got {hidden_size}"
        )
    if num_layers < 1:
        raise ValueError(f"random_shape: need at least one layer, got {num_layers}")
    heads = hidden_size // RANDOM_HEAD_DIM
    return tiny_model(
        "llada",
        seed=seed,
        dtype=dtype,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=3 * hidden_size,
    )


def load_for_bench(
    model: str | None,
    *,
    dtype: str = "float32",
    default_layout: bool = False,
    random_shape: tuple[int, int] = RANDOM_SHAPE,
) -> BenchSetup:
    """Load ``model`` (None: the shipped model; ``"tiny"``: a tiny random LLaDA; ``"random"``:
    the shipped architecture at ``random_shape``, random weights) with the workload choices
    that suit it."""
    from foretell.engine import Engine
    from foretell.models.default import DEFAULT_MODEL_DIR, TASK_NAMES

    if model == RANDOM_MODEL:
        hidden, layers = random_shape
        loaded = random_llada(hidden, layers, dtype=dtype)
        gen, block = RANDOM_GEN_LENGTH, RANDOM_BLOCK_LENGTH
        base = DecodeParams(gen_length=gen, block_length=block, steps=gen)
        prophet = Prophet(answer_start=gen - block, answer_length=RANDOM_PROPHET_SPAN)
        return BenchSetup(
            f"random llada {hidden}x{layers} (random weights: speed only)",
            loaded,
            base,
            prophet,
            TASK_NAMES,
            [block],
            [gen],
            [gen],
            ["low_confidence"],
            prompt_tokens=(64, 256),
        )

    if model == "tiny":
        from foretell.models.tiny import tiny_model

        loaded = tiny_model("llada", seed=0, dtype=dtype)
        base = DecodeParams(gen_length=32, block_length=8, steps=32)
        return BenchSetup(
            "tiny (random llada)",
            loaded,
            base,
            Prophet(),
            TASK_NAMES,
            [8, 16, 32],
            [32, 16],
            [16, 32],
        )
    engine = Engine(model, dtype=dtype)
    loaded = LoadedModel(model=engine.model, tokenizer=engine.tokenizer, path=engine.model_path)
    is_default = model is None or Path(model).resolve() == DEFAULT_MODEL_DIR.resolve()
    if is_default or default_layout:
        base, prophet = (
            _default_layout(loaded)
            if model is not None
            else (
                engine.default_params,
                engine.default_prophet,
            )
        )
        name = "default" if is_default else f"{model} (default layout)"
        return BenchSetup(
            name,
            loaded,
            base,
            prophet,
            TASK_NAMES,
            list(DEFAULT_BLOCK_LENGTHS),
            list(DEFAULT_STEP_BUDGETS),
            [base.gen_length],
            list(DEFAULT_REMASKINGS),
        )
    base = engine.default_params
    gen = base.gen_length
    if getattr(engine.model, "block_causal", False):
        # The model's own block; full steps (one token a step) and half of them, per block.
        # The shipped block-diffusion model runs its own task, at its own length.
        from foretell.models import block_default

        block = engine.model.block_size
        steps = sorted({block, max(1, block // 2)}, reverse=True)
        shipped = Path(model).resolve() == block_default.BLOCK_DEFAULT_MODEL_DIR.resolve()
        return BenchSetup(
            "block default" if shipped else str(model),
            loaded,
            base,
            engine.default_prophet,
            block_default.TASK_NAMES if shipped else TASK_NAMES,
            [block],
            steps,
            [base.gen_length] if shipped else [],
            per_block_steps=True,
        )
    blocks = sorted({b for b in (gen // 4, gen // 2, gen) if b >= 1 and gen % b == 0})
    steps = sorted({gen, max(1, gen // 2)}, reverse=True)
    return BenchSetup(str(model), loaded, base, engine.default_prophet, TASK_NAMES, blocks, steps)


def default_size_model() -> tuple[LoadedModel, str]:
    """The shipped model, or a random model of exactly its training shape."""
    from foretell.models.default import DEFAULT_MODEL_DIR

    if (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        return load_model(DEFAULT_MODEL_DIR), "default (trained weights)"
    from foretell.models.tiny import build_default_model
    from foretell.models.tokenizer import build_char_tokenizer
    from foretell.tasks import ALPHABET

    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_default_model(tokenizer).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, path=None), "default shape, random"
