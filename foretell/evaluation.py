"""``foretell eval``: reproduce the Prophet paper's findings on the shipped model's tasks.

On held-out prompts (never trained on) it measures accuracy and mean forward passes for Full
(the whole step budget), Half (half the budget), Prophet, and One step (every token at once:
how much the task needs step-by-step decoding), under low-confidence and random remasking; and
the answer-convergence curve of the paper's Figure 1: the fraction of prompts whose answer would
already be right if every remaining mask were filled with its current argmax after k% of the
steps. That "fill now" is exactly a Prophet commit, so the curve is measured by forcing a commit
at a fixed step (a policy whose late phase starts there with a threshold no gap
can miss) and running the engine unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from foretell.engine import Engine
from foretell.params import DecodeParams, Prophet

REMASKINGS = ("low_confidence", "random")
CONFIG_NAMES = ("Full", "Half", "Prophet", "One step")
CURVE_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@dataclass(frozen=True)
class Config:
    name: str  # "Full" | "Half" | "Prophet" | "One step"
    remasking: str

    @property
    def label(self) -> str:
        return f"{self.name} / {self.remasking}"


def commit_at(step: int, steps: int, policy: Prophet) -> Prophet:
    """A policy that commits exactly at ``step`` of ``steps`` (and never before)."""
    bound = step / steps
    return Prophet(
        thresholds=(1e9, 1e9, -1e9),
        bounds=(bound, bound),
        answer_start=policy.answer_start,
        answer_length=policy.answer_length,
    )


def _params(engine: Engine, config: Config, seed: int) -> DecodeParams:
    base = engine.default_params.replace(remasking=config.remasking, seed=seed)
    if config.name == "Half":
        return base.replace(steps=base.steps // 2)
    if config.name == "One step":
        return base.replace(steps=1, block_length=base.gen_length)
    if config.name == "Prophet":
        return base.replace(early_commit=engine.default_prophet)
    return base


def evaluate(
    engine: Engine,
    task_names: list[str],
    *,
    n: int = 500,
    curve_n: int = 100,
    seed: int | None = None,
    use_tqdm: bool = True,
    names: tuple[str, ...] = CONFIG_NAMES,
    remaskings: tuple[str, ...] = REMASKINGS,
) -> dict:
    """Accuracy / forward passes per task and configuration, and the convergence curves
    (skipped with ``curve_n=0``). ``names`` and ``remaskings`` pick the configurations."""
    from foretell.models.default import HELDOUT_SEED, check_heldout_size
    from foretell.tasks import get_task

    seed = HELDOUT_SEED if seed is None else seed
    check_heldout_size(max(n, curve_n), seed)
    configs = [Config(name, r) for r in remaskings for name in names]
    report: dict = {"n": n, "curve_n": curve_n, "heldout_seed": seed, "tasks": {}}
    start = time.perf_counter()
    for task_name in task_names:
        task = get_task(task_name)
        examples = task.heldout(n, seed)
        prompts = [[{"role": "user", "content": ex.prompt}] for ex in examples]
        table = {}
        for config in configs:
            params = [_params(engine, config, seed=i) for i in range(len(examples))]
            outs = engine.generate(prompts, params, use_tqdm=use_tqdm)
            correct = [task.check(ex, o.text) for ex, o in zip(examples, outs, strict=True)]
            table[config.label] = {
                "accuracy": sum(correct) / len(correct),
                "mean_forward_passes": sum(o.num_forward_passes for o in outs) / len(outs),
                "committed_early": sum(o.committed_early for o in outs) / len(outs),
                "steps": params[0].steps,
            }
        curves = {}
        policy = engine.default_prophet
        for remasking in remaskings if curve_n else ():
            base = engine.default_params.replace(remasking=remasking)
            points = []
            for fraction in CURVE_FRACTIONS:
                step = max(1, round(fraction * base.steps))
                params = [
                    base.replace(seed=i, early_commit=commit_at(step, base.steps, policy))
                    for i in range(curve_n)
                ]
                outs = engine.generate(prompts[:curve_n], params, use_tqdm=False)
                right = [task.check(ex, o.text) for ex, o in zip(examples, outs, strict=False)]
                points.append(
                    {"fraction": fraction, "step": step, "accuracy": sum(right) / len(right)}
                )
            curves[remasking] = points
        report["tasks"][task_name] = {"table": table, "convergence": curves}
    report["seconds"] = time.perf_counter() - start
    return report


def format_table(report: dict) -> str:
    lines = []
    for task_name, result in report["tasks"].items():
        lines.append(f"{task_name} (n={report['n']})")
        lines.append(f"  {'configuration':<30} {'accuracy':>9} {'fwd passes':>11} {'early':>6}")
        for label, row in result["table"].items():
            lines.append(
                f"  {label:<30} {100 * row['accuracy']:>8.1f}% {row['mean_forward_passes']:>11.1f}"
                f" {100 * row['committed_early']:>5.0f}%"
            )
        for remasking, points in result["convergence"].items():
            curve = "  ".join(f"{p['fraction']:.0%}:{100 * p['accuracy']:.0f}%" for p in points)
            lines.append(f"  answer right if committed at k% of steps ({remasking}): {curve}")
    return "\n".join(lines)


def plot_convergence(report: dict, path: str | Path) -> None:
    """The paper's Figure 1 for each task: accuracy if committed at k% of the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, (task_name, result) in zip(axes[0], tasks.items(), strict=True):
        for remasking, points in result["convergence"].items():
            ax.plot(
                [100 * p["fraction"] for p in points],
                [100 * p["accuracy"] for p in points],
                marker="o",
                label=remasking,
            )
        ax.set_title(f"{task_name}: answer already right")
        ax.set_xlabel("% of decoding steps")
        ax.set_ylabel(f"% of prompts (n={report['curve_n']})")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2))
