"""``generate_dataset``: a Ray Data dataset of prompts in, the same rows with outputs out.

Data parallelism over engine replicas: a fixed pool of ``replicas`` actors, each running one
:class:`~foretell.distributed.predictor.EnginePredictor`, consumes batches of rows. Ray restarts
an actor that dies and retries its batch on it (``max_restarts`` / ``max_task_retries``), so
every input row comes out exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from foretell.distributed.predictor import EnginePredictor, ParamsSpec


def generate_dataset(
    ds,
    *,
    model: str | os.PathLike | None = None,
    params: ParamsSpec = None,
    replicas: int = 1,
    batch_size: int = 256,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    engine_kwargs: Mapping[str, Any] | None = None,
    chat_template: bool = False,
    threads: int | None = None,
    json_prompts: bool = False,
    max_restarts: int | None = None,
    max_task_retries: int | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    map_batches_kwargs: Mapping[str, Any] | None = None,
):
    """Generate for every row of ``ds`` (a ``ray.data.Dataset`` with a ``prompt`` column and
    optionally ``params``: a mapping or JSON text per row); returns a lazy dataset with the
    input columns and ``text``, ``token_ids``, ``num_forward_passes``, ``committed_early``,
    ``commit_step``, ``finish_reason``, ``error``.

    ``batch_size`` rows go to an engine at once: keep it several times its ``max_num_seqs`` so
    that it can backfill, and well below rows / replicas so that the replicas share the work.
    Ray Data hands a replica whole blocks (small ones bundled up to ``batch_size`` rows), so
    the input needs blocks of at most ``batch_size`` rows (docs/distributed.md).

    ``num_gpus`` per replica (the engine then runs on ``cuda`` unless ``engine_kwargs`` says
    otherwise); ``num_cpus`` per replica (default 1, and that many torch threads unless
    ``threads`` is given). ``chat_template``, ``json_prompts``: see
    :class:`~foretell.distributed.predictor.EnginePredictor`. ``max_restarts`` and
    ``max_task_retries``: None keeps Ray Data's defaults for actor pools (restart a dead
    replica and retry its batch, without limit). ``runtime_env`` (e.g. environment variables
    for the replicas) and ``map_batches_kwargs`` go to ``Dataset.map_batches``. Row order is
    not kept: carry an index column.
    """
    import ray.data  # fails here, with its own message, without the ray extra

    for name, value in (("replicas", replicas), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if num_gpus is not None and not num_gpus >= 0:
        raise ValueError(f"num_gpus: must be >= 0, got {num_gpus!r}")
    if num_cpus is not None and not num_cpus > 0:
        raise ValueError(f"num_cpus: must be > 0, got {num_cpus!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: must be a positive integer, got {threads!r}")
    cpus = 1.0 if num_cpus is None else float(num_cpus)
    kwargs = dict(engine_kwargs or {})
    if num_gpus and "device" not in kwargs:
        kwargs["device"] = "cuda"
    if isinstance(params, Mapping):
        params = dict(params)
    # Ray Data's own defaults for an actor pool are what we want: restart a dead actor without
    # limit and retry its batch (-1, -1). Passed on only when set: Ray 2.60 takes them through
    # its deprecated ``**ray_remote_args``.
    remote_args = {
        name: value
        for name, value in (("max_restarts", max_restarts), ("max_task_retries", max_task_retries))
        if value is not None
    }
    remote_args.update(map_batches_kwargs or {})
    if runtime_env is not None:
        remote_args["runtime_env"] = dict(runtime_env)
    return ds.map_batches(
        EnginePredictor,
        fn_constructor_kwargs={
            "model": None if model is None else str(model),
            "params": params,
            "engine_kwargs": kwargs,
            "chat_template": chat_template,
            "threads": threads if threads is not None else max(1, int(cpus)),
            "json_prompts": json_prompts,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        # A fixed pool; one call at a time per actor (the engine is not thread-safe).
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=cpus,
        num_gpus=num_gpus,
        **remote_args,
    )
