"""benchmarks/block_decoders.py on a tiny shape: every mode's record in the JSON, each mode's
tokens equal to its reference decoder's, and the ``--model`` hook on a checkpoint with a
tokenizer (task prompts, EOS on both sides, accuracy reported)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from foretell.models.tokenizer import build_char_tokenizer
from foretell.tasks import ALPHABET

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "block_decoders.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("block_decoders", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["block_decoders"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _tiny(n: int) -> list[str]:
    return [
        *("--vocab-size", "64", "--hidden-size", "32", "--layers", "2", "--n", str(n)),
        *("--gen-length", "8", "--max-num-seqs", "2", "--threads", str(torch.get_num_threads())),
    ]


def test_every_mode_reproduces_its_reference(bench, tmp_path: Path) -> None:
    out = tmp_path / "block_decoders.json"
    assert bench.main([*_tiny(3), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "not the official code" in result["note"]
    assert result["machine"]["torch_threads"] == torch.get_num_threads()
    assert set(result["families"]) == {"sdar", "llada2"}
    for family, fam in result["families"].items():
        assert "not the official code" in fam["reference"]
        assert fam["decoding"]["block_length"] == bench.BLOCKS[family]
        assert list(fam["modes"]) == [m[0] for m in bench.MODES]
        for name, rec in fam["modes"].items():
            assert rec["same_tokens"] == 3, (family, name)  # each mode's own reference
            assert rec["generated_tokens"] == 3 * 8  # no stop ids: every request runs to gen
            assert rec["tokens_per_s"] > 0 and rec["tokens_per_cpu_s"] > 0
            assert len(rec["token_ids_sha256"]) == 64
        modes = fam["modes"]
        assert modes["foretell"]["token_ids_sha256"] == modes["reference"]["token_ids_sha256"]
        assert modes["foretell-prophet-low"]["committed_early_share"] > 0
        # foretell runs fewer tokens: SDAR's store passes ride along, LLaDA2's window is cached.
        assert modes["foretell"]["forward_tokens"] < modes["reference"]["forward_tokens"]
        assert fam["ratios_vs_reference"]["reference"]["tokens_per_s"] == 1.0
        assert fam["ratios_vs_foretell"]["foretell"]["tokens_per_s"] == 1.0
        (target,) = fam["targets"]
        assert target["goal"] == f">= {bench.TARGETS[family]}"
        assert target["same_tokens"] == "3/3"
    sdar = result["families"]["sdar"]["modes"]
    assert (
        sdar["foretell"]["mean_passes_per_request"] < sdar["reference"]["mean_passes_per_request"]
    )


def test_model_hook_reports_accuracy_and_stops_on_eos(bench, tmp_path: Path) -> None:
    tok = build_char_tokenizer(ALPHABET)
    shape = bench.Shape(hidden_size=32, num_layers=2)
    path = bench.build_checkpoint("sdar", tmp_path / "sdar", shape, tokenizer=tok)
    out = tmp_path / "model.json"
    modes = "reference,foretell,reference-prophet,foretell-prophet"
    args = ["--model", str(path), "--n", "2", "--modes", modes]  # gen 32: the tasks' layout
    args += ["--prophet-span", "answer", "--threads", str(torch.get_num_threads())]
    assert bench.main([*args, "--out", str(out)]) == 0
    (fam,) = json.loads(out.read_text())["families"].values()
    assert fam["decoding"]["stop_ids"] == [tok.eos_token_id]
    assert list(fam["modes"]) == modes.split(",")
    for rec in fam["modes"].values():
        assert rec["same_tokens"] == 2
        assert 0.0 <= rec["accuracy"] <= 1.0
    assert fam["modes"]["foretell-prophet"]["prophet"]["answer_start"] is not None
