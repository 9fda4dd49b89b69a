"""Presenting a benchmark run: the terminal table, the machine record, targets and the chart.

Numbers on a shared CPU are noisy, so every table shows ratios against a baseline measured in
the same run, and the JSON keeps the machine's state (cores, torch threads, load average) next to
them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

# (name, key, goal, comparison) of the acceptance targets.
TARGETS = (
    ("engine-prophet / static, generated tokens/s", ("engine-prophet", "static"), 2.5),
    (
        "engine-prophet / static-prophet, generated tokens/s",
        ("engine-prophet", "static-prophet"),
        1.25,
    ),
)


def write_json(path: str | Path, result: dict) -> None:
    """Write a benchmark result (creating its folder) and say where, on stderr."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    info.update(code_version())
    return info


def code_version() -> dict:
    """The foretell commit the numbers were measured on, and any uncommitted changes to the
    code that decides them (read-only git queries; empty outside a checkout)."""
    root = Path(__file__).resolve().parents[2]
    paths = ["foretell/engine", "foretell/decoding", "foretell/scheduler", "foretell/models"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"foretell_commit": commit or None, "uncommitted_engine_changes": changed}


def model_info(model: torch.nn.Module, path: object) -> dict:
    """The model's shape, and a hash of its weights file so numbers stay tied to a checkpoint."""
    cfg = getattr(model, "config", None)
    digest = None
    weights = None if path is None else Path(str(path)) / "model.safetensors"
    if weights is not None and weights.is_file():
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return {
        "weights_sha256": digest,
        "path": None if path is None else str(path),
        "family": getattr(model, "family", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_layers": getattr(cfg, "num_layers", None),
    }


def evaluate_targets(modes: dict[str, dict]) -> list[dict]:
    """The issue's measurable targets, each with its measured value and whether it was met."""
    out = []
    for name, (top, bottom), goal in TARGETS:
        if top in modes and bottom in modes:
            value = modes[top]["tokens_per_s"] / modes[bottom]["tokens_per_s"]
            out.append({"target": name, "goal": f">= {goal}", "value": value, "met": value >= goal})
    if "engine-prophet" in modes and "static" in modes:
        a, b = modes["engine-prophet"]["accuracy"], modes["static"]["accuracy"]
        if a is not None and b is not None:
            diff = 100 * (a - b)
            out.append(
                {
                    "target": "accuracy, engine-prophet minus static (points)",
                    "goal": ">= -1",
                    "value": diff,
                    "met": diff >= -1.0,
                }
            )
    out += cache_targets(modes)
    for mode in ("engine", "engine-prophet"):
        if mode in modes:
            rec = modes[mode]
            out.append(
                {
                    "target": f"engine overhead ({mode}, batch {rec['batch_size']}), share of wall",
                    "goal": "< 0.10",
                    "value": rec["overhead_share"],
                    "met": rec["overhead_share"] < 0.10,
                }
            )
    return out


# issue 12: tokens/s of each cache mode against the same mode uncached, at full steps and with
# Prophet (the continuous-batching modes).
CACHE_GOALS = {"prefix": 2.0, "dual": 4.0}


def cache_targets(modes: dict[str, dict]) -> list[dict]:
    """The cache speed-up targets for every (mode, cache) run whose uncached mode also ran."""
    out = []
    for name, rec in modes.items():
        cache, mode = rec.get("kv_cache"), rec.get("mode")
        continuous = mode in ("engine", "engine-prophet")
        if cache not in CACHE_GOALS or mode not in modes or not continuous:
            continue
        goal = CACHE_GOALS[cache]
        value = rec["tokens_per_s"] / modes[mode]["tokens_per_s"]
        out.append(
            {
                "target": f"{name} / {mode}, generated tokens/s",
                "goal": f">= {goal}",
                "value": value,
                "met": value >= goal,
            }
        )
    return out


def format_cache_table(modes: dict[str, dict]) -> str:
    """Cached runs next to their uncached mode: speed-up, tokens the model ran per request per
    pass, passes, cache memory, accuracy. Empty when no cache ran."""
    if not any(rec.get("kv_cache") for rec in modes.values()):
        return ""
    header = (
        f"{'run':<22} {'tok/s':>8} {'x none':>7} {'x(cpu)':>7} {'tok/req-pass':>12} "
        f"{'passes':>7} {'fwd share':>9} {'cache peak':>10} {'B/token':>8} {'acc':>6}"
    )
    lines = [header, "-" * len(header)]
    for name, rec in modes.items():
        base = modes.get(rec.get("mode", name))
        ratio = cpu_ratio = None
        if base is not None:
            ratio = rec["tokens_per_s"] / base["tokens_per_s"]
            cpu_ratio = rec["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        acc = "" if rec["accuracy"] is None else f"{100 * rec['accuracy']:.1f}%"
        peak = rec.get("kv_cache_peak_bytes", 0) / 2**20
        lines.append(
            f"{name:<22} {rec['tokens_per_s']:>8.1f} {_fmt_ratio(ratio):>7} "
            f"{_fmt_ratio(cpu_ratio):>7} {rec['forward_tokens_per_sequence_pass']:>12.1f} "
            f"{rec['mean_forward_passes']:>7.1f} {100 * (1 - rec['overhead_share']):>8.1f}% "
            f"{peak:>8.1f}MB {rec.get('kv_cache_bytes_per_token', 0):>8} {acc:>6}"
        )
    lines.append(
        "x none: tokens/s against the same mode without a cache, in this run; tok/req-pass: "
        "tokens the model ran per request per forward pass (queries: canvas, cached span, "
        "read-only rows); fwd share: share of wall time inside the model's packed forward; "
        "cache peak: most KV-cache memory held at once; B/token: cache bytes per canvas position."
    )
    return "\n".join(lines)


def _fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def format_table(modes: dict[str, dict], against: str = "static") -> str:
    """The side-by-side table, with each mode's throughput as a multiple of ``against``'s."""
    base = modes.get(against)
    header = (
        f"{'mode':<22} {'B':>3} {'tok/s':>8} {'x' + against:>9} {'x(cpu)':>7} {'req/s':>7} "
        f"{'lat mean':>8} {'p50':>7} {'p99':>7} {'passes':>7} {'fwd':>6} {'occup':>6} {'ovhd':>6} "
        f"{'acc':>6}"
    )
    lines = [header, "-" * len(header)]
    for name, rec in modes.items():
        ratio = cpu_ratio = None
        if base is not None:
            ratio = rec["tokens_per_s"] / base["tokens_per_s"]
            cpu_ratio = rec["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        acc = "" if rec["accuracy"] is None else f"{100 * rec['accuracy']:.1f}%"
        lines.append(
            f"{name:<22} {rec['batch_size']:>3} {rec['tokens_per_s']:>8.1f} "
            f"{_fmt_ratio(ratio):>9} {_fmt_ratio(cpu_ratio):>7} {rec['requests_per_s']:>7.2f} "
            f"{rec['latency_mean_s']:>7.1f}s {rec['latency_p50_s']:>6.1f}s "
            f"{rec['latency_p99_s']:>6.1f}s {rec['mean_forward_passes']:>7.1f} "
            f"{rec['forward_passes_total']:>6} "
            f"{rec['mean_batch_occupancy']:>6.1f} {100 * rec['overhead_share']:>5.1f}% {acc:>6}"
        )
    lines.append(
        "tok/s: generated tokens per wall second; x(cpu): the same ratio in tokens per CPU second "
        "of this process (less sensitive to other load); passes: forward passes per request; "
        "fwd: forward passes in the run; "
        "occup: sequences per forward pass; ovhd: share of wall time outside the model's forward "
        "pass; latency from the start of the mode's run."
    )
    return "\n".join(lines)


def format_settings(modes: dict[str, dict]) -> str:
    """Accuracy and passes per decoding setting: full steps against Prophet, side by side (a
    mode's accuracy depends only on its policy, so one full and one Prophet mode suffice)."""
    full = next((modes[m] for m in ("static", "engine", "reference") if m in modes), None)
    early = next((modes[m] for m in ("engine-prophet", "static-prophet") if m in modes), None)
    shown = [(label, rec) for label, rec in (("full", full), ("prophet", early)) if rec]
    if not shown or not all(rec.get("by_setting") for _, rec in shown):
        return ""
    settings = list(shown[0][1]["by_setting"])
    head = f"{'setting':<48} {'n':>4}" + "".join(
        f" {label + ' acc':>12} {label + ' passes':>15}" for label, _ in shown
    )
    lines = [head, "-" * len(head)]
    for name in settings:
        row = f"{name:<48} {shown[0][1]['by_setting'][name]['n']:>4}"
        for _, rec in shown:
            cell = rec["by_setting"].get(name, {})
            acc = cell.get("accuracy")
            row += f" {'' if acc is None else f'{100 * acc:.1f}%':>12}"
            row += f" {cell.get('mean_forward_passes', float('nan')):>15.1f}"
        lines.append(row)
    return "\n".join(lines)


def format_targets(targets: Sequence[dict]) -> str:
    lines = []
    for t in targets:
        mark = "met" if t["met"] else "MISSED"
        lines.append(f"  {t['target']}: {t['value']:.3f} (goal {t['goal']}) {mark}")
    return "\n".join(lines)


def plot_modes(result: dict, path: str | Path) -> None:
    """Throughput, forward passes per request and latency per mode, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    names = list(modes)
    base = modes.get("static")
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    colors = ["#888888" if "prophet" not in n else "#d9822b" for n in names]

    def label_bars(ax, bars, labels) -> None:
        for bar, label in zip(bars, labels, strict=True):
            ax.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.margins(y=0.25)

    bars = axes[0].bar(names, [modes[n]["tokens_per_s"] for n in names], color=colors)
    labels = []
    for n in names:
        label = f"{modes[n]['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        if modes[n]["accuracy"] is not None:
            label += f"\nacc {100 * modes[n]['accuracy']:.1f}%"
        labels.append(label)
    label_bars(axes[0], bars, labels)
    axes[0].set_ylabel("generated tokens / s")
    axes[0].set_title("throughput (x static)")

    bars = axes[1].bar(names, [modes[n]["forward_passes_total"] for n in names], color=colors)
    label_bars(
        axes[1],
        bars,
        [
            f"{modes[n]['mean_forward_passes']:.1f}/req\nocc {modes[n]['mean_batch_occupancy']:.1f}"
            for n in names
        ],
    )
    axes[1].set_yscale("log")
    axes[1].set_ylabel("forward passes in the run (log)")
    axes[1].set_title("forward passes (per request, occupancy)")

    x = range(len(names))
    axes[2].bar(
        [i - 0.2 for i in x],
        [modes[n]["cpu_ms_per_sequence_pass"] for n in names],
        0.4,
        label="CPU",
    )
    axes[2].bar(
        [i + 0.2 for i in x],
        [modes[n]["wall_ms_per_sequence_pass"] for n in names],
        0.4,
        label="wall",
    )
    axes[2].set_xticks(list(x), names)
    axes[2].set_ylabel("ms per request per forward pass")
    axes[2].set_title("cost of one request-pass")
    axes[2].legend()

    axes[3].bar([i - 0.2 for i in x], [modes[n]["latency_p50_s"] for n in names], 0.4, label="p50")
    axes[3].bar([i + 0.2 for i in x], [modes[n]["latency_p99_s"] for n in names], 0.4, label="p99")
    axes[3].set_xticks(list(x), names)
    axes[3].set_ylabel("seconds from the run's start")
    axes[3].set_title("latency (all requests arrive at t=0)")
    axes[3].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    wl = result.get("workload", {})
    cfg = result.get("config", {})
    fig.suptitle(
        f"foretell bench: {wl.get('n')} requests, B={cfg.get('batch_size')}, "
        f"{result.get('machine', {}).get('cpu_count')} CPU cores, torch "
        f"{result.get('machine', {}).get('torch')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(scaling: dict, path: str | Path) -> None:
    """Cost per request against N, and throughput against max_num_seqs (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_n = scaling.get("by_n", [])
    if by_n:
        ns = [r["n"] for r in by_n]
        axes[0].plot(ns, [1000 * r["wall_s"] / r["n"] for r in by_n], "o-", label="wall")
        axes[0].plot(ns, [1000 * r["cpu_s"] / r["n"] for r in by_n], "s--", label="CPU")
        axes[0].set_xlabel("requests N")
        axes[0].set_ylabel("ms per request")
        axes[0].set_ylim(bottom=0)
        axes[0].set_title(f"{scaling.get('mode')}: cost per request (flat = linear)")
        axes[0].legend()
    by_seqs = scaling.get("by_max_num_seqs", [])
    if by_seqs:
        bs = [r["max_num_seqs"] for r in by_seqs]
        axes[1].plot(bs, [r["tokens_per_s"] for r in by_seqs], "o-", label="tok/s (wall)")
        axes[1].plot(bs, [r["tokens_per_cpu_s"] for r in by_seqs], "s--", label="tok/CPU s")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xticks(bs, [str(b) for b in bs])
        axes[1].set_xlabel("max_num_seqs")
        axes[1].set_ylabel("generated tokens / s")
        axes[1].set_ylim(bottom=0)
        axes[1].set_title(f"{scaling.get('mode')}: throughput against batch size")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
