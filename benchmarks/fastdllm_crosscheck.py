"""foretell's cached decoding against Fast-dLLM's own code, on a checkpoint of ours.

    git clone https://github.com/NVlabs/Fast-dLLM /path/to/Fast-dLLM   # and: pip install einops
    python benchmarks/fastdllm_crosscheck.py --fastdllm /path/to/Fast-dLLM --n 100

Runs Fast-dLLM's ``generate``, ``generate_with_prefix_cache`` and ``generate_with_dual_cache``
(``llada/generate.py``) with Fast-dLLM's ``LLaDAModelLM`` (``llada/model/modeling_llada.py``)
loaded from the same LLaDA-format checkpoint, and foretell's engine with ``kv_cache`` None /
"prefix" / "dual", on the same held-out prompts (float64, greedy, low-confidence remasking,
no constraints: Fast-dLLM has none). It reports how many generations are identical token for
token and each side's accuracy: where they agree, an accuracy lost to the cache is the
approximation's, not foretell's. Nothing of Fast-dLLM is copied here; it is imported from the
given checkout (tested with commit 24cc59e; its modeling code needs ``einops``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from foretell.bench.report import machine_info, model_info, write_json
from foretell.engine import Engine
from foretell.models import load_model
from foretell.models.default import DEFAULT_MODEL_DIR, HELDOUT_SEED
from foretell.models.default.data import encode_prompt
from foretell.params import DecodeParams
from foretell.tasks import get_task

DECODERS = (
    (None, "generate"),
    ("prefix", "generate_with_prefix_cache"),
    ("dual", "generate_with_dual_cache"),
)


def load_fastdllm(checkout: Path, model_dir: Path) -> tuple[object, torch.nn.Module]:
    """Fast-dLLM's ``generate`` module and its LLaDA model over ``model_dir``'s weights, float64.

    Built from the config and the safetensors directly: the checkout's ``from_pretrained`` path
    predates the installed transformers."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(checkout / "llada"))
    generate = importlib.import_module("generate")
    modeling = importlib.import_module("model.modeling_llada")
    configuration = importlib.import_module("model.configuration_llada")
    config = configuration.LLaDAConfig.from_pretrained(str(model_dir))
    config.use_cache = False
    model = modeling.LLaDAModelLM(config, init_params=False)
    missing, unexpected = model.load_state_dict(
        load_file(str(model_dir / "model.safetensors")), strict=False
    )
    if missing or unexpected:
        raise ValueError(f"model: weights do not fit Fast-dLLM's model: {missing} {unexpected}")
    return generate, model.to(torch.float64).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fastdllm", type=Path, required=True, help="a Fast-dLLM checkout")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--n", type=int, default=100, help="held-out prompts (at most 500)")
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--task", default="arrange")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    if not (args.fastdllm / "llada" / "generate.py").exists():
        p.error(f"--fastdllm: {args.fastdllm} has no llada/generate.py")
    torch.set_num_threads(args.threads)
    generate, reference = load_fastdllm(args.fastdllm, args.model)
    loaded = load_model(args.model, dtype="float64")
    tok = loaded.tokenizer
    engine = Engine(loaded, dtype="float64", max_num_seqs=64)
    task = get_task(args.task)
    examples = task.heldout(args.n, HELDOUT_SEED)
    prompts = [encode_prompt(tok, ex.prompt) for ex in examples]
    gen = 32
    rows = []
    print(f"{'kv_cache':>8} {'identical':>10} {'Fast-dLLM':>10} {'foretell':>9}")
    for mode, name in DECODERS:
        params = DecodeParams(
            gen_length=gen,
            block_length=args.block_length,
            steps=gen,
            kv_cache=mode,
            confidence_dtype="float64",
        )
        outs = engine.generate(prompts, params, use_tqdm=False)
        identical = right_theirs = right_ours = 0
        for ex, prompt, out in zip(examples, prompts, outs, strict=True):
            result = getattr(generate, name)(
                reference,
                torch.tensor([prompt]),
                steps=gen,
                gen_length=gen,
                block_length=args.block_length,
                mask_id=tok.mask_token_id,
            )
            x = result[0] if isinstance(result, tuple) else result
            theirs = x[0, len(prompt) :].tolist()
            identical += theirs == out.token_ids
            text = tok.decode([t for t in theirs if t != tok.eos_token_id])
            right_theirs += task.check(ex, text)
            right_ours += task.check(ex, out.text)
        n = len(examples)
        row = {
            "kv_cache": mode,
            "fastdllm_function": name,
            "identical": identical,
            "n": n,
            "accuracy_fastdllm": right_theirs / n,
            "accuracy_foretell": right_ours / n,
        }
        rows.append(row)
        print(
            f"{mode or 'none':>8} {identical:>6}/{n:<3} {right_theirs / n:>10.1%} "
            f"{right_ours / n:>9.1%}",
            flush=True,
        )
    if args.out:
        # model_info hashes the weights file: the checkpoint changes, whatever the commit says.
        report = {"args": vars(args), "model": model_info(loaded.model, args.model)}
        write_json(args.out, {**report, "machine": machine_info(), "rows": rows})
    return 0 if all(r["identical"] == r["n"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
