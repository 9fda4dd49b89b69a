"""``foretell generate --file ... --replicas N``: one bulk job on Ray, from a file to a file.

The driver reads the input (JSONL or Parquet), sends each row as ``index``, ``prompt`` and
``params`` (both as JSON text, so that one file may mix prompt kinds and params fields), and
writes the results in input order as they stream back: each row is the input record with the
output fields added, as the single-process ``--file`` run writes it (plus ``token_ids``). A
progress bar counts rows done and generated tokens per second over the whole job.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from foretell.distributed.predictor import OUTPUT_COLUMNS, ParamsSpec


def read_records(path: str | Path) -> list[dict]:
    """The input rows: JSONL (one object per line) or Parquet (by the ``.parquet`` suffix)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"file: {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {i + 1}: not JSON: {err}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path} line {i + 1}: expected a JSON object")
        records.append(rec)
    return records


def auto_batch_size(rows: int, replicas: int, max_num_seqs: int) -> int:
    """Rows per engine batch: about four batches per replica, so that replicas share the work
    and the last batches overlap, and at most four times ``max_num_seqs`` (enough to
    backfill)."""
    return max(1, min(math.ceil(rows / (4 * replicas)), 4 * max_num_seqs))


def run_job(
    records: list[dict],
    out: str | Path | None,
    *,
    model: str | None,
    params: ParamsSpec,
    replicas: int,
    batch_size: int,
    engine_kwargs: Mapping[str, Any],
    chat_template: bool,
    threads: int | None,
    num_cpus: float | None,
    num_gpus: float | None,
    ray_address: str | None = None,
    progress: bool = True,
) -> dict:
    """Run ``records`` through ``replicas`` engines; write the results to ``out`` (``.parquet``
    or JSONL; stdout if None). Returns counts and times."""
    import ray
    import ray.data

    from foretell.distributed.dataset import generate_dataset

    rows = [_input_row(i, rec) for i, rec in enumerate(records)]
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    if started:
        if ray_address:
            ray.init(address=ray_address)
        else:
            ray.init(include_dashboard=False)
    ray_start = time.perf_counter() - t0
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts rows and tokens over the whole job
        ds = ray.data.from_items(
            rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size))
        )
        results = generate_dataset(
            ds,
            model=model,
            params=params,
            replicas=replicas,
            batch_size=batch_size,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            engine_kwargs=engine_kwargs,
            chat_template=chat_template,
            threads=threads,
            json_prompts=True,
        )
        stats = _write_in_order(records, results, out, progress=progress)
    finally:
        if started:
            ray.shutdown()
    return {**stats, "ray_start_seconds": ray_start}


def _input_row(index: int, rec: dict) -> dict:
    params = rec.get("params")
    return {
        "index": index,
        "prompt": None if rec.get("prompt") is None else json.dumps(rec["prompt"]),
        "params": params if params is None or isinstance(params, str) else json.dumps(params),
    }


def _write_in_order(records: list[dict], results, out, *, progress: bool) -> dict:
    """Stream the results back, write each row as soon as every row before it is written."""
    n = len(records)
    bar = tqdm(total=n, desc="Generating", unit="row", disable=not progress, file=sys.stderr)
    pending: dict[int, dict] = {}
    written, tokens, errors = 0, 0, 0
    start = time.perf_counter()
    first = None
    with _writer(out) as write:
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            first = first if first is not None else time.perf_counter() - start
            for row in batch.select(["index", *OUTPUT_COLUMNS]).to_pylist():
                index = row.pop("index")
                if index in pending or index < written:
                    raise RuntimeError(f"row {index} came back twice")
                pending[index] = row
                if row["finish_reason"] in ("steps", "early_commit", "stop"):
                    tokens += len(row["token_ids"])
                errors += row["finish_reason"] == "error"
                bar.update(1)
            while written in pending:
                write({**records[written], **pending.pop(written)})
                written += 1
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(tok_s=f"{tokens / elapsed:.0f}", errors=errors)
    bar.close()
    if written != n:
        raise RuntimeError(f"{n - written} rows did not come back")
    return {
        "rows": n,
        "errors": errors,
        "generated_tokens": tokens,
        "seconds": time.perf_counter() - start,
        "first_batch_seconds": first,
    }


class _writer:
    """``write(row)`` to JSONL (stdout if no path) or, for ``.parquet``, one table at the end."""

    def __init__(self, out: str | Path | None) -> None:
        self.out = None if out is None else Path(out)
        self.parquet = self.out is not None and self.out.suffix == ".parquet"
        self.rows: list[dict] = []
        self.sink = None

    def __enter__(self) -> Callable[[dict], None]:
        if self.parquet:
            return self.rows.append
        self.sink = sys.stdout if self.out is None else open(self.out, "w")
        return lambda row: self.sink.write(json.dumps(row) + "\n")

    def __exit__(self, exc_type, *exc) -> None:
        if self.parquet:
            if exc_type is None:
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(self.rows), self.out)
        elif self.sink is not None and self.out is not None:
            self.sink.close()
