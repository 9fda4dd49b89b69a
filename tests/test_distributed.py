"""Bulk generation on Ray Data (foretell.distributed): parity with one engine, a replica killed
mid-job, bad rows, and the CLI. One local Ray cluster (2 CPUs) for the whole session."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("ray.data", reason="needs the ray extra: pip install 'foretell[ray]'")
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from foretell import DecodeParams, Engine
from foretell.cli import main
from foretell.distributed import OUTPUT_COLUMNS, EnginePredictor, generate_dataset
from foretell.distributed.predictor import KILL_ENV
from foretell.models import save_model
from foretell.models.tiny import tiny_model
from foretell.params import row_params

# Not confidence_threshold: on a random model the mask token can be the argmax, and that rule
# (as Fast-dLLM's) then never finishes the block.
REMASKING = ["low_confidence", "random", "margin", "entropy"]
BASE = DecodeParams(gen_length=8, steps=8)
ENGINE = {"dtype": "float64", "max_num_seqs": 8}  # float64: batch composition cannot matter


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llada-ray")
    loaded = tiny_model("llada", seed=7)
    save_model(loaded.model, path, loaded.tokenizer)
    return path


def mixed_rows(n: int) -> list[dict]:
    """Seeded rows whose params differ in everything a request can vary (as JSON text)."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        gen = rng.choice([8, 16])
        block = rng.choice([b for b in (4, 8, 16) if gen % b == 0])
        blocks = gen // block
        fields = {
            "gen_length": gen,
            "block_length": block,
            "steps": rng.choice(range(blocks, gen + 1, blocks)),
            "remasking": rng.choice(REMASKING),
            "temperature": rng.choice([0.0, 0.0, 0.8]),
            "seed": i,
        }
        if rng.random() < 0.4:
            fields["early_commit"] = {"thresholds": [4.0, 2.0, 1.0]}
        if rng.random() < 0.1:
            fields["cfg_scale"] = 1.0
        prompt = "".join(rng.choice("abc123+= ") for _ in range(rng.randint(2, 12)))
        rows.append({"index": i, "prompt": prompt, "params": json.dumps(fields)})
    return rows


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Single-process ``Engine.generate`` on the same 200 rows."""
    rows = mixed_rows(200)
    engine = Engine(str(checkpoint), **ENGINE)
    params = [row_params(BASE, r["params"]) for r in rows]
    outputs = engine.generate([r["prompt"] for r in rows], params, use_tqdm=False)
    assert any(o.committed_early for o in outputs) and not all(o.committed_early for o in outputs)
    return rows, outputs


def run(rows, checkpoint, **kwargs) -> list[dict]:
    ds = ray.data.from_items(rows, override_num_blocks=8)
    out = generate_dataset(
        ds,
        model=str(checkpoint),
        params=BASE,
        replicas=2,
        batch_size=25,
        engine_kwargs=ENGINE,
        **kwargs,
    )
    return out.take_all()


def check_equal(results: list[dict], outputs) -> None:
    indices = sorted(r["index"] for r in results)
    assert indices == list(range(len(outputs)))  # every row exactly once
    for row in results:
        ref = outputs[row["index"]]
        assert row["token_ids"] == ref.token_ids, row["index"]
        assert row["text"] == ref.text
        assert row["num_forward_passes"] == ref.num_forward_passes
        assert row["finish_reason"] == ref.finish_reason
        assert row["committed_early"] == ref.committed_early
        assert row["commit_step"] == ref.commit_step
        assert row["error"] is None


def test_two_replicas_equal_one_engine(ray_cluster, checkpoint, reference) -> None:
    rows, outputs = reference
    results = run(rows, checkpoint)
    check_equal(results, outputs)
    assert all(r["params"] == rows[r["index"]]["params"] for r in results)  # carried through


def test_replica_killed_mid_job_loses_and_duplicates_nothing(
    ray_cluster, checkpoint, reference, tmp_path
) -> None:
    rows, outputs = reference
    marker = tmp_path / "killed"
    results = run(rows, checkpoint, runtime_env={"env_vars": {KILL_ENV: str(marker)}})
    assert marker.exists(), "no replica was killed: the test would prove nothing"
    check_equal(results, outputs)


def test_bad_rows_get_errors_and_the_rest_complete(ray_cluster, checkpoint) -> None:
    rows = [{"index": i, "prompt": f"{i}+{i}=", "params": {"seed": i}} for i in range(40)]
    rows[3]["params"] = {"steps": 100}  # more steps than gen_length
    rows[7]["params"] = {"temperature": -1.0}
    rows[11]["prompt"] = None
    rows[19]["prompt"] = ""
    rows[23]["params"] = {"steps": 4}  # fine: other rows' keys come back as nulls, not given
    results = sorted(run(rows, checkpoint), key=lambda r: r["index"])
    assert [r["index"] for r in results] == list(range(40))
    bad = {3: "steps", 7: "temperature", 11: "prompt: missing", 19: "prompt: is empty"}
    for row in results:
        if row["index"] in bad:
            assert row["finish_reason"] == "error"
            assert bad[row["index"]] in row["error"]
            assert row["token_ids"] == []
        else:
            assert row["finish_reason"] == "steps" and row["error"] is None
            assert len(row["token_ids"]) == 8
    assert results[23]["num_forward_passes"] == 4
    assert results[0]["num_forward_passes"] == 8


def test_cli_replicas_parquet_in_order(ray_cluster, checkpoint, tmp_path) -> None:
    records = [{"prompt": f"{i}*2=", "id": f"r{i}", "params": None} for i in range(30)]
    records[4]["params"] = json.dumps({"bogus": 1})
    records[9]["params"] = json.dumps({"seed": 5, "temperature": 0.5})
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    argv = ["generate", "--model", str(checkpoint), "--file", str(tmp_path / "in.parquet")]
    argv += ["--out", str(out), "--replicas", "2", "--batch-size", "4", "--gen-length", "8"]
    assert main([*argv, "--raw", "--threads", "1", "--dtype", "float64"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(30)]  # input order
    assert "params.bogus: unknown decoding parameter" in rows[4]["error"]
    assert [i for i, r in enumerate(rows) if r["finish_reason"] == "error"] == [4]
    engine = Engine(str(checkpoint), **ENGINE)
    params = DecodeParams(gen_length=8, steps=8, seed=5, temperature=0.5)
    (ref,) = engine.generate([records[9]["prompt"]], params, use_tqdm=False)
    assert rows[9]["token_ids"] == ref.token_ids


def test_predictor_on_one_batch_without_ray(checkpoint) -> None:
    """The actor's class on its own: columns carried, typed outputs, errors per row."""
    predictor = EnginePredictor(str(checkpoint), params={"gen_length": 8}, engine_kwargs=ENGINE)
    assert predictor.params.steps == 8 and predictor.params.block_length == 8
    batch = pa.table(
        {
            "prompt": ["1+1=", "2+2=", None],
            "params": ['{"steps": 2}', "{not json", None],
            "text": ["old", "old", "old"],
        }
    )
    out = predictor(batch)
    assert out.column_names == ["prompt", "params", *OUTPUT_COLUMNS]
    assert out.schema.field("token_ids").type == pa.list_(pa.int64())
    rows = out.to_pylist()
    assert rows[0]["num_forward_passes"] == 2 and rows[0]["finish_reason"] == "steps"
    assert "params: not valid JSON" in rows[1]["error"]
    assert rows[2]["error"] == "prompt: missing"


def test_row_params() -> None:
    base = DecodeParams(gen_length=16, steps=8)
    assert row_params(base, None) == base
    assert row_params(base, '{"seed": 3}').seed == 3
    assert row_params(base, {"seed": None, "steps": 4}).steps == 4  # null: not given
    assert row_params(base, {"constraints": {"2": 5}}).constraints == {2: 5}
    with pytest.raises(ValueError, match=r"params\.nope: unknown"):
        row_params(base, {"nope": 1})
    with pytest.raises(ValueError, match="expected a JSON object"):
        row_params(base, "[1, 2]")
    with pytest.raises(ValueError, match="threshold: must be a finite number"):
        row_params(base, {"threshold": "high"})


def test_predictor_decodes_a_block_causal_model(tmp_path) -> None:
    """An SDAR checkpoint through the bulk-job actor: steps count per block, the model's
    block is the default, and each row equals the engine's own output."""
    from tests.block_checkpoints import sdar_checkpoint

    path = str(sdar_checkpoint(tmp_path / "sdar", seed=4)[0])
    predictor = EnginePredictor(path, params={"gen_length": 12}, engine_kwargs=ENGINE)
    rows = [("abc", '{"steps": 2}'), ("hello", '{"remasking": "confidence_threshold"}')]
    batch = pa.table({"prompt": [p for p, _ in rows], "params": [q for _, q in rows]})
    out = predictor(batch).to_pylist()
    engine = Engine(path, **ENGINE)
    for (prompt, fields), row in zip(rows, out, strict=True):
        params = row_params(engine.default_params.replace(gen_length=12), fields)
        (alone,) = engine.generate([prompt], params, use_tqdm=False)
        assert row["error"] is None
        assert row["token_ids"] == alone.token_ids
        assert row["num_forward_passes"] == alone.num_forward_passes
    assert out[0]["num_forward_passes"] <= 2 * 4  # 2 steps per block of 4, 15 positions
