"""Host work per engine step against the batch size (issue #24): ops, host reads, host time.

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --batch-sizes 16,64 \
        --out benchmarks/results/host_overhead.json

On a GPU every dispatched op is a kernel launch (5-10 us of host time) and every read of a
tensor's value stalls the host until the device drains, so a GPU-shaped step does a constant
amount of both whatever the batch. This script measures that shape on the CPU: a micro model
(one layer of width 32, so the forward costs almost nothing) runs a realistic mix of requests
(prompts of 4-200 tokens, gen_length 32/64, blocks of 8/16/32, no cache / prefix / dual,
Prophet on half, low-confidence / random / threshold remasking) with the batch kept full, and
for each batch size it reports per engine step:

- dispatched aten ops: every op that reaches the dispatcher (a ``TorchDispatchMode``), model
  forward included;
- host reads of tensor values: calls of ``.item/.tolist/.cpu/.numpy`` and of ``bool/float/
  int/index`` on a tensor (a ``TorchFunctionMode``). Here every tensor is on the host, so the
  calls themselves are counted: on a GPU each is a synchronisation. ``Tensor.to`` calls whose
  target device differs from the tensor's are counted apart, as transfers;
- Python function calls per step outside the model's methods (``cProfile``, a run of its
  own; calls of C functions counted apart): how much per-request Python a step runs, which a
  GPU cannot take off the host. Their growth from the smallest batch to the largest, per
  extra request, is printed under the table;
- host microseconds per request-step: wall time of the ``step()`` calls less the time inside
  the model's forward (``engine.runner.forward_seconds``), over the request-steps run
  (``engine.metrics.sequences_in_passes``), from separate runs without the counting modes,
  which inflate time. Only steps whose batch was full count;
- the host time less every call of the model's methods ("less model"): a step also calls
  the model outside its pass's timed forward (a commit's read-only rows, a fill's rows not
  gathered), which the host time above includes;
- that time again with the model replayed ("replayed"): the steps run again with every call
  of the model's methods answered from a recording made in a run of its own (its outputs,
  copied; the requests' outputs and every step's canvases must come out the same, or the
  script fails). On this CPU the host work after a forward runs slower than the same work
  run back to back, as it is replayed (``forward_interference.py`` measures what the gap
  does). What the replay takes off, against "less model", is that slowdown. Both are
  reported for the reader; the target is read on the host time as the issue defines it
  (above);
- the cyclic garbage collector's work inside the timed steps (:class:`GcWatch`): collections,
  their time, and the unreachable objects they found. A step that leaves reference cycles
  keeps what they hold (on a GPU, device memory) until a collection finds it. A collection
  runs where an allocation triggers it, often inside the model's forward, whose time the
  host time subtracts: a step's collections can raise its wall time and leave its host time
  as it was.

Targets (issue #24): ops and reads per step grow by at most 1.25x from the smallest batch to
the largest; host time at most 30 us per request-step at the largest batch.

The engine runs with ``forward_chunk_tokens=None`` (what "auto" means on a GPU: the CPU's
chunking would add forward passes, and ops, that grow with the batch's tokens),
``kv_cache_memory=None`` and an unlimited token budget, so ``max_num_seqs`` alone bounds the
batch. Requests are added outside ``step()``; their validation is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gc
import random
import statistics
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from foretell import DecodeParams, Engine, Prophet
from foretell.bench.report import machine_info, model_info, write_json
from foretell.engine.engine import OVERLAP_MODES
from foretell.models.registry import LoadedModel
from foretell.models.tiny import tiny_model

OPS_GROWTH_GOAL = 1.25  # ops and reads per step, largest batch over smallest
HOST_US_GOAL = 30.0  # host microseconds per request-step at the largest batch

PROMPT_LENGTHS = (4, 200)
GEN_LENGTHS = (32, 64)
BLOCK_LENGTHS = (8, 16, 32)
KV_CACHES = (None, "prefix", "dual")
REMASKINGS = ("low_confidence", "random", "confidence_threshold")
# The scheduler's token budget is not what this measures: only max_num_seqs bounds a batch.
UNLIMITED_TOKENS = 1 << 30

# Reads of a tensor's values into Python or a host array: one device sync each on a GPU.
HOST_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index",
}


class OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher: on a GPU, about one kernel launch each.

    Ops outside the model's methods (``in_model`` is raised around them, see
    :func:`model_calls_marked`) are also timed: on this CPU an op's time is its execution as
    well as its dispatch, which a GPU would run on the device, asynchronously; the rest of the
    host time is Python."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_op: Counter[str] = Counter()
        self.in_model = 0
        self.outside = 0
        self.outside_seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.by_op[str(func.overloadpacket)] += 1
        if self.in_model:
            return func(*args, **(kwargs or {}))
        self.outside += 1
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.outside_seconds += time.perf_counter() - start
        return out


MODEL_METHODS = ("forward_packed", "logits_at")  # what the runner calls of the model


@contextlib.contextmanager
def model_methods_wrapped(
    model: torch.nn.Module, wrap: Callable[[Callable], Callable]
) -> Iterator[None]:
    """Shadow the model's own methods (``MODEL_METHODS``) on the instance with ``wrap(method)``
    for the duration, so that a run can time, count or replay the model's calls. Nests when
    the inner one ends first (a ``with`` inside a ``with``): a method already shadowed is
    wrapped as it is, and shadowed again as it was afterwards. If ``wrap`` fails, the methods
    already wrapped are put back."""
    before = {name: model.__dict__.get(name) for name in MODEL_METHODS}
    try:
        for name in MODEL_METHODS:
            setattr(model, name, wrap(getattr(model, name)))
        yield
    finally:
        for name, shadow in before.items():
            if shadow is None:
                model.__dict__.pop(name, None)
            else:
                setattr(model, name, shadow)


def around_model_calls(
    model: torch.nn.Module, enter: Callable[[], object], leave: Callable[[], object]
) -> contextlib.AbstractContextManager[None]:
    """Call ``enter`` before and ``leave`` after every call of the model's own methods."""

    def wrapped(method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            enter()
            try:
                return method(*args, **kwargs)
            finally:
                leave()

        return call

    return model_methods_wrapped(model, wrapped)


@dataclass
class ModelClock:
    """Seconds spent inside the model's methods: the runner times its pass's forward
    (``forward_seconds``), but a step also calls the model outside it (a commit's read-only
    rows, a fill's rows not gathered), which the host time as the issue defines it includes."""

    seconds: float = 0.0


def _clocked(method: Callable, clock: ModelClock) -> Callable:
    """``method``, with the time of each call added to ``clock``."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            clock.seconds += time.perf_counter() - start

    return call


def model_calls_timed(
    model: torch.nn.Module, clock: ModelClock
) -> contextlib.AbstractContextManager[None]:
    return model_methods_wrapped(model, lambda method: _clocked(method, clock))


@dataclass
class ForwardTape(ModelClock):
    """Every output of the model's methods in one run, in call order (copies), so that a run
    of the same steps can take them instead of running the model (:func:`taped_model_calls`);
    and, as a :class:`ModelClock`, the time spent in those calls (recording or replaying)."""

    outputs: list[torch.Tensor] = field(default_factory=list)
    played: int = 0
    # The recording run's outputs and canvases (``MixRun.outputs``, ``MixRun.canvases``): a
    # replay must give them back (``run_mix`` fails otherwise).
    recorded: tuple[list, list[int]] | None = None
    # Work to run after each replayed forward pass, on the model's clock: what running it in
    # the forward's place does to the host work after (benchmarks/forward_interference.py).
    after_forward: Callable[[], object] | None = None

    def settle(self, replay: bool, batch_size: int, outputs: list, canvases: list[int]) -> None:
        """After a run on this tape: a recording keeps the run's outputs and canvases
        (:func:`step_results`); a replay must have answered every recorded call and given them
        back, or its times are not of the recorded steps."""
        if not replay:
            self.recorded = (outputs, canvases)
            return
        if self.played != len(self.outputs):
            raise RuntimeError(
                f"B={batch_size}: the replayed run calls the model less often than recorded"
            )
        if (outputs, canvases) != self.recorded:
            raise RuntimeError(
                f"B={batch_size}: the replayed run's outputs differ from the recorded"
            )


def step_results(engine: Engine, outputs: list) -> tuple[list[tuple], int]:
    """What a run keeps of one step to compare it with another run of the same steps: the
    finished outputs (request id, token ids, finish reason) and a checksum of every canvas.
    A request that failed fails the run: the engine retries a failed pass in halves and
    carries on, so a timed run would otherwise report a broken run's times."""
    errors = [out for out in outputs if out.finish_reason == "error"]
    if errors:
        raise RuntimeError(f"request {errors[0].request_id} failed: {errors[0].error}")
    finished = [(o.request_id, tuple(o.token_ids), o.finish_reason) for o in outputs]
    return finished, zlib.crc32(engine.runner.canvas_rows.tokens.tobytes())


def taped_model_calls(
    model: torch.nn.Module, tape: ForwardTape, replay: bool
) -> contextlib.AbstractContextManager[None]:
    """Record a copy of every output of the model's methods on ``tape``; or, with ``replay``,
    answer each call with a copy of the next one recorded, without running the model (a copy:
    the runner writes some logits in place). Either way the call's time goes on the tape's
    clock. A recording needs an empty tape; a replay, one a live run has settled
    (:meth:`ForwardTape.settle`)."""
    if replay and tape.recorded is None:
        raise ValueError("a replay needs a tape recorded by a live run")
    if not replay and tape.outputs:
        raise ValueError("record on an empty tape")
    tape.played = 0

    def taped(method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            if not replay:
                out = method(*args, **kwargs)
                tape.outputs.append(out.clone())
                return out
            if tape.played == len(tape.outputs):
                raise RuntimeError("the replayed run calls the model more often than recorded")
            tape.played += 1
            if tape.after_forward is not None and method.__name__ == "forward_packed":
                tape.after_forward()  # before the output is made, as a forward's work is
            return tape.outputs[tape.played - 1].clone()

        return _clocked(call, tape)

    return model_methods_wrapped(model, taped)


def model_calls_marked(
    model: torch.nn.Module, ops: OpCounter
) -> contextlib.AbstractContextManager[None]:
    """Raise ``ops.in_model`` while the model's own methods run."""

    def enter() -> None:
        ops.in_model += 1

    def leave() -> None:
        ops.in_model -= 1

    return around_model_calls(model, enter, leave)


def model_calls_unprofiled(
    model: torch.nn.Module, profiler: cProfile.Profile
) -> contextlib.AbstractContextManager[None]:
    """Pause ``profiler`` while the model's own methods run: the calls counted are the
    engine's own."""
    return around_model_calls(model, profiler.disable, profiler.enable)


def profiled_calls(profiler: cProfile.Profile) -> tuple[int, int]:
    """(Python function calls, calls of C functions) the profiler recorded."""
    profiler.create_stats()
    python = builtin = 0
    for (filename, _, _), (_, calls, *_) in profiler.stats.items():
        if filename == "~":  # cProfile's name for built-in (C) functions
            builtin += calls
        else:
            python += calls
    return python, builtin


class GcWatch:
    """The cyclic garbage collector's work while ``active``: collections, their time and the
    unreachable objects they found. A step that leaves reference cycles makes the collector
    run more often and find its tensors (held until then: on a GPU, device memory)."""

    def __init__(self) -> None:
        self.active = False
        self.collections = 0
        self.seconds = 0.0
        self.unreachable = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.collections += 1
        self.seconds += time.perf_counter() - self._start
        self.unreachable += info["collected"] + info["uncollectable"]

    def take(self) -> tuple[int, float, int]:
        """(collections, seconds, unreachable) counted since the last take; then zero again."""
        taken = (self.collections, self.seconds, self.unreachable)
        self.collections, self.seconds, self.unreachable = 0, 0.0, 0
        return taken

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


class HostReadCounter(TorchFunctionMode):
    """Counts host reads of tensor values (``HOST_READS``) and cross-device ``Tensor.to`` calls.

    Calls made inside a counted call (``tolist`` reading through ``item``, say) run with the
    mode off, so each read is counted once, at the engine's call."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.transfers = 0
        self.by_kind: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = HOST_READS.get(func)
        if kind is not None:
            self.reads += 1
            self.by_kind[kind] += 1
        elif func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor):
            target = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            if target is not None and torch.device(target) != args[0].device:
                self.transfers += 1
                self.by_kind["to (other device)"] += 1
        return func(*args, **kwargs)


def micro_model(seed: int = 0, family: str = "llada") -> LoadedModel:
    """A one-layer model of width 32: its forward is nearly free, so the rest is host work."""
    return tiny_model(
        family,
        seed=seed,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )


def takes_unseeded() -> bool:
    """Whether ``DecodeParams(seed=None)`` is accepted: issue #24 gives unseeded requests one
    batched device stream and allows one draw per seeded request per step, so once the engine
    has that stream the mix leaves seeds out (seeding every request would make even a fixed
    engine's ops grow with the batch); until then each request gets a seed of the mix's own."""
    try:
        DecodeParams(seed=None)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return False
    return True


# The mixes (``--mix``): the (greedy LLaDA rules), and every request kind the batched
# step takes, per family (each on its own micro model: an engine serves one model); the
# block-causal family (SDAR) is stepped by ``block_step.advance_blocks``.
MIXES = ("issue", "every-kind-llada", "every-kind-dream", "every-kind-block")


def mix_family(mix: str) -> str:
    return {"every-kind-dream": "dream", "every-kind-block": "sdar"}.get(mix, "llada")


def mix_stream(
    loaded: LoadedModel, seed: int = 0, mix: str = "issue"
) -> Iterator[tuple[list[int], DecodeParams]]:
    """An endless, seeded stream of (prompt token ids, params) drawn from the realistic mix;
    every second request has Prophet (``answer_start=None``: the whole remaining generation)."""
    if mix not in MIXES:
        raise ValueError(f"mix: choose one of {MIXES}, got {mix!r}")
    rng = random.Random(seed)
    unseeded = takes_unseeded()
    special = set(loaded.tokenizer.all_special_ids) | {loaded.model.mask_token_id}
    vocab = [t for t in range(loaded.model.vocab_size) if t not in special]
    for index in range(sys.maxsize):
        gen = rng.choice(GEN_LENGTHS)
        drawn = rng.randrange(2**31)  # drawn either way, so the mix is the same either way
        if mix != "issue":
            params = every_kind(rng, mix_family(mix), gen, index)
            prompt = [rng.choice(vocab) for _ in range(rng.randint(*PROMPT_LENGTHS))]
            yield prompt, params
            continue
        params = DecodeParams(
            gen_length=gen,
            steps=rng.choice((gen, gen // 2)),
            block_length=rng.choice(BLOCK_LENGTHS),
            remasking=rng.choice(REMASKINGS),
            kv_cache=rng.choice(KV_CACHES),
            early_commit=Prophet(answer_start=None) if index % 2 else None,
            seed=None if unseeded else drawn,  # type: ignore[arg-type]
        )
        prompt = [rng.choice(vocab) for _ in range(rng.randint(*PROMPT_LENGTHS))]
        yield prompt, params


def every_kind(rng: random.Random, family: str, gen: int, index: int) -> DecodeParams:
    """One request of an every-kind mix: every rule of the family, sampling (temperature,
    top-p, top-k) on a third, Fast-dLLM's caches where the rule takes one (with Prophet and
    sampling too), guidance (LLaDA) on some uncached ones (Prophet with an explicit span),
    ``alg_temp`` (Dream) on some uncached ranked ones, Dream's ``origin`` rule among its rules,
    Prophet on every second; no seeds (the engine's stream)."""
    prophet = Prophet(answer_start=None) if index % 2 else None
    block = rng.choice(BLOCK_LENGTHS)
    kw: dict = {"gen_length": gen, "seed": None, "early_commit": prophet}
    if rng.random() < 1 / 3:
        kw.update(temperature=0.7, top_p=rng.choice((None, 0.9)), top_k=rng.choice((None, 8)))
    if family == "sdar":  # static and dynamic schedules, sampled on a third, EOS ignored
        rule = rng.choice(("low_confidence", "confidence_threshold"))
        kw.update(remasking=rule, block_length=block, steps=rng.choice((block, block // 2)))
        kw.update(ignore_eos=True)
    elif family == "llada":
        rule = rng.choice(("low_confidence", "random", "confidence_threshold", "margin", "entropy"))
        kw.update(remasking=rule, block_length=block, steps=rng.choice((gen, gen // 2)))
        cacheable = rule in ("low_confidence", "random", "confidence_threshold")
        if cacheable and rng.random() < 2 / 3:
            kw["kv_cache"] = rng.choice(("prefix", "dual"))
        elif rng.random() < 0.25:
            kw["cfg_scale"] = 1.0
            if prophet:  # an explicit span: a commit asks for guided rows not gathered
                kw["early_commit"] = Prophet(answer_start=0, answer_length=gen // 4)
    else:
        rules = ("maskgit_plus", "topk_margin", "entropy", "random", "confidence_threshold")
        rules += ("origin",)
        rule = rng.choice(rules)
        kw["remasking"] = rule
        if rule in ("entropy", "confidence_threshold") and rng.random() < 0.5:
            kw.update(kv_cache=rng.choice(("prefix", "dual")), early_commit=None)
            kw.update(block_length=block, steps=rng.choice((gen, gen // 2)))
        else:
            kw.update(block_length=gen, steps=rng.choice((gen, gen // 2)))
            if rule not in ("confidence_threshold", "origin") and rng.random() < 0.3:
                kw["alg_temp"] = 0.5  # its reveal drawn from softmax(scores / alg_temp)
    return DecodeParams(**kw)


def make_engine(
    loaded: LoadedModel,
    batch_size: int,
    backend: str = "auto",
    overlap: str | None = None,
    forward_threads: int | None = None,
) -> Engine:
    """A fresh engine over the shared micro model, bounded by ``max_num_seqs`` alone. With
    ``overlap`` (a mode of ``Engine(overlap=...)``), two groups of ``batch_size`` take turns
    (``max_num_seqs`` is twice it), so that every pass still holds ``batch_size`` requests."""
    return Engine(
        LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, path=loaded.path),
        attention_backend=backend,
        max_num_seqs=2 * batch_size if overlap else batch_size,
        max_num_batched_tokens=UNLIMITED_TOKENS,
        kv_cache_memory=None,
        forward_chunk_tokens=None,
        overlap=overlap or False,
        forward_threads=forward_threads,
    )


def engine_counters(engine: Engine) -> tuple[float, int, int]:
    """(seconds inside the model's forward, steps, request-steps) as the engine counts them.

    The host time is computed from these; if the engine renames them, fail loudly rather than
    report a number that means something else."""
    try:
        return (
            float(engine.runner.forward_seconds),
            int(engine.metrics.steps),
            int(engine.metrics.sequences_in_passes),
        )
    except AttributeError as err:
        raise RuntimeError(
            "host_overhead.py reads engine.runner.forward_seconds, engine.metrics.steps and "
            f"engine.metrics.sequences_in_passes; the engine no longer has one: {err}"
        ) from err


@dataclass
class MixRun:
    """Totals over the measured steps whose batch was full."""

    batch_size: int
    steps: int = 0
    skipped_steps: int = 0  # measured steps whose batch was not full (not counted)
    request_steps: int = 0
    wall_s: float = 0.0
    # From each counted step's start to the next one's: its wall time and the run's own work
    # after it (checking outputs, queueing requests), which a forward in flight overlaps too.
    period_s: float = 0.0
    forward_s: float = 0.0
    model_s: float = 0.0  # inside the model's methods (timed runs), forward or not
    ops: int = 0
    ops_outside: int = 0  # ops outside the model's methods
    op_seconds_outside: float = 0.0  # their time (execution and dispatch)
    reads: int = 0
    transfers: int = 0
    finished: int = 0
    python_calls: int = 0  # profiled runs: Python function calls outside the model
    c_calls: int = 0  # and calls of C functions
    # The garbage collector's work inside measured steps (GcWatch), wherever a step's
    # allocations trigger it: inside the model's forward it is in ``forward_s`` too.
    gc_collections: int = 0
    gc_seconds: float = 0.0
    gc_unreachable: int = 0
    ops_by_name: Counter[str] = field(default_factory=Counter)
    reads_by_kind: Counter[str] = field(default_factory=Counter)
    # Every output of the run, measured or not: (request id, token ids, finish reason); and
    # after every step, a checksum of every canvas (which a replay must give back).
    outputs: list[tuple[str, tuple[int, ...], str | None]] = field(default_factory=list)
    canvases: list[int] = field(default_factory=list)

    @property
    def ops_per_step(self) -> float:
        return self.ops / self.steps

    @property
    def reads_per_step(self) -> float:
        return self.reads / self.steps

    @property
    def transfers_per_step(self) -> float:
        return self.transfers / self.steps

    @property
    def host_us_per_request_step(self) -> float:
        return 1e6 * (self.wall_s - self.forward_s) / self.request_steps

    @property
    def host_us_per_request_step_period(self) -> float:
        """The step's period less its forward, per request-step: with ``overlap`` the fair
        measure (the forward in flight runs on through the run's own work between steps,
        which the step's wall time leaves out)."""
        return 1e6 * (self.period_s - self.forward_s) / self.request_steps

    @property
    def host_us_less_model_calls(self) -> float:
        """Wall time less every call of the model's methods, per request-step."""
        return 1e6 * (self.wall_s - self.model_s) / self.request_steps


def run_mix(
    loaded: LoadedModel,
    batch_size: int,
    *,
    warmup_steps: int,
    steps: int,
    seed: int = 0,
    count: bool,
    backend: str = "auto",
    mix: str = "issue",
    profile: bool = False,
    tape: ForwardTape | None = None,
    replay: bool = False,
    expect: tuple[list, list[int]] | None = None,
    overlap: str | None = None,
    forward_threads: int | None = None,
) -> MixRun:
    """Run the mix at ``batch_size`` and total the measured steps.

    The queue holds 2B live requests at every step (3B with ``overlap``; refilled from the
    stream as requests finish), so each step runs B of them; the first ``warmup_steps`` steps
    are not measured, so that the batch holds requests at every stage of decoding, as a
    server's does. With ``count`` the measured steps run under the op and read counters
    (their wall times are then inflated and mean nothing; the counter also times each op
    outside the model, see
    :class:`OpCounter`); without, only times are taken. With ``profile`` each measured step
    runs under ``cProfile`` (outside the model's methods) and its calls are counted. With a
    ``tape``, every step's model calls are recorded on it, or with ``replay`` answered from it
    (:func:`taped_model_calls`), and the replay must give the recording's outputs and canvases
    back. ``expect``: outputs and canvases (``MixRun.outputs``, ``MixRun.canvases``) any other
    run must give, or it fails (a live run against a tape's recording). ``overlap``: the
    engine overlaps its two groups' passes in this mode (:func:`make_engine`; timed runs only:
    the forward then runs on a worker, which the counters, the profiler and a tape's order of
    calls do not follow), with 3B live requests so that both groups stay full. In
    ``"process"`` the model's calls here are not timed (its process maps the model, which must
    not carry this process's timing wrappers); the forward's time is the engine's own count,
    as in every mode; ``forward_threads``: that process's torch threads."""
    if overlap and (count or profile or tape is not None):
        raise ValueError("run_mix: overlap is for timed runs (no counters, profile or tape)")
    clock = None
    timed = contextlib.nullcontext()
    if tape is not None:
        if count or profile:  # their own wrappers of the model's methods would undo the tape's
            raise ValueError("run_mix: a tape is for timed runs (count=False, profile=False)")
        clock, timed = tape, taped_model_calls(loaded.model, tape, replay)
    elif not (count or profile) and overlap != "process":
        clock = ModelClock()
        timed = model_calls_timed(loaded.model, clock)
    with timed:
        run = _run_mix(
            loaded,
            batch_size,
            warmup_steps,
            steps,
            seed,
            count,
            backend,
            mix,
            profile,
            clock,
            overlap,
            forward_threads,
        )
    if tape is not None:
        tape.settle(replay, batch_size, run.outputs, run.canvases)
    if expect is not None and (run.outputs, run.canvases) != expect:
        raise RuntimeError(f"B={batch_size}: the run's outputs differ from the recorded")
    return run


def _run_mix(
    loaded: LoadedModel,
    batch_size: int,
    warmup_steps: int,
    steps: int,
    seed: int,
    count: bool,
    backend: str,
    mix: str,
    profile: bool,
    clock: ModelClock | None,
    overlap: str | None = None,
    forward_threads: int | None = None,
) -> MixRun:
    # Closed at the end: a pass in flight would run on beside the next run's engine.
    engine = make_engine(loaded, batch_size, backend, overlap, forward_threads)
    with contextlib.closing(engine):
        queued = (3 if overlap else 2) * batch_size
        stream = mix_stream(loaded, seed, mix)
        run = MixRun(batch_size)
        with GcWatch() as watch:
            live = 0
            counted_start = None  # the start of the last step counted, until the next starts
            for index in range(warmup_steps + steps):
                while live < queued:
                    prompt, params = next(stream)
                    engine.add_request(prompt, params)
                    live += 1
                measured = index >= warmup_steps
                ops, reads = OpCounter(), HostReadCounter()
                forward0, steps0, seqs0 = engine_counters(engine)
                model0 = clock.seconds if clock is not None else 0.0
                watch.active = measured
                start = time.perf_counter()
                if counted_start is not None:
                    run.period_s += start - counted_start
                    counted_start = None
                profiler = None
                if measured and count:
                    with model_calls_marked(loaded.model, ops), reads, ops:
                        outputs = engine.step()
                elif measured and profile:
                    profiler = cProfile.Profile()
                    with model_calls_unprofiled(loaded.model, profiler):
                        profiler.enable()
                        try:
                            outputs = engine.step()
                        finally:
                            profiler.disable()
                else:
                    outputs = engine.step()
                wall = time.perf_counter() - start
                watch.active = False
                collections, gc_seconds, unreachable = watch.take()  # this step's (if measured)
                forward1, steps1, seqs1 = engine_counters(engine)
                finished, canvas = step_results(engine, outputs)
                live -= len(outputs)
                run.outputs += finished
                run.canvases.append(canvas)
                if not measured:
                    continue
                if steps1 - steps0 != 1 or seqs1 - seqs0 != batch_size:
                    run.skipped_steps += 1
                    continue
                run.steps += 1
                run.request_steps += seqs1 - seqs0
                run.wall_s += wall
                counted_start = start
                run.forward_s += forward1 - forward0
                run.model_s += (clock.seconds if clock is not None else 0.0) - model0
                run.finished += len(outputs)
                run.gc_collections += collections
                run.gc_seconds += gc_seconds
                run.gc_unreachable += unreachable
                run.ops += ops.count
                run.ops_outside += ops.outside
                run.op_seconds_outside += ops.outside_seconds
                run.reads += reads.reads
                run.transfers += reads.transfers
                run.ops_by_name.update(ops.by_op)
                run.reads_by_kind.update(reads.by_kind)
                if profiler is not None:
                    python, builtin = profiled_calls(profiler)
                    run.python_calls += python
                    run.c_calls += builtin
        if counted_start is not None:
            run.period_s += time.perf_counter() - counted_start
        if run.steps == 0:
            raise RuntimeError(f"B={batch_size}: no measured step ran a full batch")
        if run.forward_s <= 0:
            raise RuntimeError(
                "engine.runner.forward_seconds did not move: it no longer times a pass"
            )
        return run


def measure(
    loaded: LoadedModel,
    batch_size: int,
    *,
    warmup_steps: int,
    steps: int,
    seed: int,
    repeats: int,
    backend: str = "auto",
    mix: str = "issue",
    mode_extra: float = 0.0,
    overlap: str | None = None,
) -> dict:
    """One counted run, one profiled run (Python calls), then ``repeats`` timed runs of the
    same steps (median host time), then one recording the model's outputs and ``repeats``
    replaying them. With ``overlap`` (a mode), each timed run is followed by one of the same
    mix with the engine overlapping its groups' passes in that mode (the issue's measure side
    by side).
    ``mode_extra``: :func:`mode_extra_us`."""
    kw = {"warmup_steps": warmup_steps, "steps": steps, "seed": seed, "backend": backend}
    kw["mix"] = mix
    counted = run_mix(loaded, batch_size, count=True, **kw)
    profiled = run_mix(loaded, batch_size, count=False, profile=True, **kw)
    timed, overlapped = [], []
    for _ in range(repeats):
        timed.append(run_mix(loaded, batch_size, count=False, **kw))
        if overlap:
            overlapped.append(run_mix(loaded, batch_size, count=False, overlap=overlap, **kw))
    host_us = [run.host_us_per_request_step for run in timed]
    median = statistics.median(host_us)
    # The model's outputs recorded in a run of their own (not timed), then replayed.
    tape = ForwardTape()
    run_mix(loaded, batch_size, count=False, tape=tape, **kw)
    replayed = [  # each checked to give the recording's outputs and canvases back
        run_mix(loaded, batch_size, count=False, tape=tape, replay=True, **kw)
        for _ in range(repeats)
    ]
    replayed_us = [run.host_us_less_model_calls for run in replayed]
    # The host time's share spent in ops outside the model (their execution, which a GPU
    # would overlap, and dispatch), from the counted run (the same steps) less what the timing
    # itself adds per op (``mode_extra``, us); the rest is Python.
    op_seconds = counted.op_seconds_outside - counted.ops_outside * mode_extra * 1e-6
    op_us = 1e6 * max(0.0, op_seconds) / counted.request_steps
    mid = min(timed, key=lambda run: abs(run.host_us_per_request_step - median))
    timed_steps = sum(run.steps for run in timed)
    return {
        "batch_size": batch_size,
        "measured_steps": counted.steps,
        "skipped_steps": counted.skipped_steps + sum(run.skipped_steps for run in timed),
        "requests_finished": counted.finished,
        "ops_per_step": counted.ops_per_step,
        "reads_per_step": counted.reads_per_step,
        "transfers_per_step": counted.transfers_per_step,
        "reads_per_step_by_kind": {
            k: v / counted.steps for k, v in counted.reads_by_kind.most_common()
        },
        "top_ops_per_step": {k: v / counted.steps for k, v in counted.ops_by_name.most_common(15)},
        "python_calls_per_step": profiled.python_calls / profiled.steps,
        "c_calls_per_step": profiled.c_calls / profiled.steps,
        "host_us_per_request_step": median,
        "ops_outside_model_per_step": counted.ops_outside / counted.steps,
        "op_us_outside_model_per_request_step": op_us,
        "python_us_per_request_step": median - op_us,
        "host_us_per_request_step_runs": host_us,
        "host_us_less_model_calls": statistics.median(
            run.host_us_less_model_calls for run in timed
        ),
        "host_us_per_request_step_replayed": statistics.median(replayed_us),
        "host_us_per_request_step_replayed_runs": replayed_us,
        # The collector's work inside the timed runs' measured steps, all runs together.
        "gc_collections_per_100_steps": 100 * sum(r.gc_collections for r in timed) / timed_steps,
        "gc_us_per_step": 1e6 * sum(r.gc_seconds for r in timed) / timed_steps,
        "gc_unreachable_per_step": sum(r.gc_unreachable for r in timed) / timed_steps,
        "gc_ms_per_timed_run": [1e3 * r.gc_seconds for r in timed],
        "wall_ms_per_step": 1e3 * mid.wall_s / mid.steps,
        "forward_ms_per_step": 1e3 * mid.forward_s / mid.steps,
        "wall_ms_per_step_runs": [1e3 * run.wall_s / run.steps for run in timed],
        "period_ms_per_step_runs": [1e3 * run.period_s / run.steps for run in timed],
        "forward_ms_per_step_runs": [1e3 * run.forward_s / run.steps for run in timed],
        "host_us_per_request_step_period_runs": [
            run.host_us_per_request_step_period for run in timed
        ],
        **(overlapped_record(overlapped, overlap) if overlap else {}),
    }


def overlapped_record(runs: list[MixRun], mode: str) -> dict:
    """The overlapped timed runs' part of a record: the issue's measure (wall less the
    forward, which ran on the worker), and each run's wall and forward a step."""
    host_us = [run.host_us_per_request_step for run in runs]
    period_us = [run.host_us_per_request_step_period for run in runs]
    return {
        "overlap": mode,
        # The measure for an overlapped engine: the period less the forward.
        "host_us_per_request_step_overlapped": statistics.median(period_us),
        "host_us_per_request_step_overlapped_runs": period_us,
        # Its wall time less the forward, which overlaps the run's own work and reads low.
        "host_us_per_request_step_overlapped_wall_runs": host_us,
        "period_ms_per_step_overlapped_runs": [1e3 * run.period_s / run.steps for run in runs],
        "wall_ms_per_step_overlapped_runs": [1e3 * run.wall_s / run.steps for run in runs],
        "forward_ms_per_step_overlapped_runs": [1e3 * run.forward_s / run.steps for run in runs],
        "skipped_steps_overlapped": sum(run.skipped_steps for run in runs),
    }


def op_cost_us(calls: int = 20000, repeats: int = 5) -> float:
    """Microseconds of one trivial op (``a + 1`` on 100 integers), median of ``repeats``: the
    machine's cost of a dispatch in this run, so that host times from a loaded or slower
    machine can be read against it."""
    a = torch.arange(100)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                a + 1
            times.append((time.perf_counter() - start) / calls)
    return 1e6 * statistics.median(times)


def mode_extra_us(calls: int = 20000, repeats: int = 5) -> float:
    """Microseconds that :class:`OpCounter`'s timing adds to each op it times (its call goes
    through the dispatcher's Python path): a trivial op timed inside the mode, less the same op
    called plainly (:func:`op_cost_us`, whose loop also counts, so this errs low and the op
    time it corrects stays an upper bound)."""
    a = torch.arange(100)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            ops = OpCounter()
            with ops:
                for _ in range(calls):
                    a + 1
            times.append(ops.outside_seconds / ops.outside)
    return max(0.0, 1e6 * statistics.median(times) - op_cost_us(calls, repeats))


def calls_per_extra_request(records: list[dict]) -> dict[str, float]:
    """Python and C function calls per step that each request beyond the smallest batch adds
    (the slope from the smallest batch to the largest): the per-request Python of a step."""
    small = min(records, key=lambda r: r["batch_size"])
    large = max(records, key=lambda r: r["batch_size"])
    extra = large["batch_size"] - small["batch_size"]
    if not extra:
        return {"python": 0.0, "c": 0.0}
    return {
        kind: (large[f"{kind}_calls_per_step"] - small[f"{kind}_calls_per_step"]) / extra
        for kind in ("python", "c")
    }


def targets(records: list[dict]) -> list[dict]:
    """The issue's targets, from the smallest batch to the largest."""
    small = min(records, key=lambda r: r["batch_size"])
    large = max(records, key=lambda r: r["batch_size"])
    label = f"B={large['batch_size']} / B={small['batch_size']}"
    out = []
    for key, what in (("ops_per_step", "dispatched ops"), ("reads_per_step", "host reads")):
        value = large[key] / small[key] if small[key] else float("inf")
        if not small[key] and not large[key]:
            value = 1.0
        out.append(
            {
                "target": f"{what} per step, {label}",
                "goal": f"<= {OPS_GROWTH_GOAL}",
                "value": value,
                "met": value <= OPS_GROWTH_GOAL,
            }
        )
    for key, how in (
        ("host_us_per_request_step", ""),
        ("host_us_per_request_step_overlapped", ", overlapped (period less forward)"),
    ):
        if key not in large:
            continue
        value = large[key]
        out.append(
            {
                "target": f"host us per request-step at B={large['batch_size']}{how}",
                "goal": f"<= {HOST_US_GOAL}",
                "value": value,
                "met": value <= HOST_US_GOAL,
            }
        )
    return out


def format_report(
    records: list[dict], goals: list[dict], op_us: float, mode_extra: float = 0.0
) -> str:
    header = (
        f"{'B':>4} {'steps':>6} {'ops/step':>9} {'reads/step':>10} {'xfers/step':>10} "
        f"{'host us/req-step':>16} {'less model':>10} {'replayed':>8} {'of it ops':>9} "
        f"{'python':>7} {'ops outside':>11} "
        f"{'py calls/step':>13} {'wall ms/step':>12} {'fwd ms/step':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r['batch_size']:>4} {r['measured_steps']:>6} {r['ops_per_step']:>9.1f} "
            f"{r['reads_per_step']:>10.1f} {r['transfers_per_step']:>10.1f} "
            f"{r['host_us_per_request_step']:>16.1f} {r['host_us_less_model_calls']:>10.1f} "
            f"{r['host_us_per_request_step_replayed']:>8.1f} "
            f"{r['op_us_outside_model_per_request_step']:>9.1f} "
            f"{r['python_us_per_request_step']:>7.1f} "
            f"{r['ops_outside_model_per_step']:>11.1f} "
            f"{r['python_calls_per_step']:>13.1f} {r['wall_ms_per_step']:>12.2f} "
            f"{r['forward_ms_per_step']:>11.2f}"
        )
    lines.append(
        "ops: aten ops dispatched in step() (model forward included); reads: .item/.tolist/"
        ".cpu/.numpy/bool/float/int/index on a tensor; xfers: Tensor.to another device; host "
        "us: (wall - model forward) / request-steps, median of the timed runs (no counters); "
        "less model: the same runs' wall less every call of the model's methods (the pass's "
        "forward, and a commit's read-only rows or a fill's rows outside it); replayed: the "
        "same as less model, of the same steps with the model's outputs replayed from a "
        "recorded run (no gap between one step's host work and the next; for the reader, "
        "not the target); "
        "of it ops: the time of the ops dispatched outside the model's forward_packed and "
        "logits_at (counted run, less what timing adds per op: an estimate; execution and "
        "dispatch, which a GPU runs asynchronously); python: the rest (an estimate, with the "
        "rare model calls outside the timed forward); ops outside: how many; py calls: "
        "Python function calls in step() outside the model's methods (cProfile, a run of its "
        "own)."
    )
    for r in records:
        if "host_us_per_request_step_overlapped" in r:

            def shown(key: str, digits: int = 1, r: dict = r) -> str:
                return ", ".join(f"{v:.{digits}f}" for v in r[key])

            value = r["host_us_per_request_step_overlapped"]
            lines.append(
                f"B={r['batch_size']} overlapped (Engine(overlap={r.get('overlap', 'thread')!r}), "
                f"two groups of "
                f"{r['batch_size']}): host us/req-step {value:.1f}, period less forward (runs "
                f"{shown('host_us_per_request_step_overlapped_runs')}; wall less forward "
                f"{shown('host_us_per_request_step_overlapped_wall_runs')}); serial, period "
                f"less forward: {shown('host_us_per_request_step_period_runs')}; period ms/step "
                f"overlapped {shown('period_ms_per_step_overlapped_runs', 2)}, serial "
                f"{shown('period_ms_per_step_runs', 2)}"
            )
    slope = calls_per_extra_request(records)
    lines.append(
        f"per extra request per step: {slope['python']:.1f} Python calls, "
        f"{slope['c']:.1f} calls of C functions"
    )
    lines.append(
        "garbage collector in the timed steps: "
        + "; ".join(
            f"B={r['batch_size']}: {r['gc_collections_per_100_steps']:.1f} collections per 100 "
            f"steps, {r['gc_us_per_step']:.1f} us a step, {r['gc_unreachable_per_step']:.1f} "
            "unreachable objects a step"
            for r in records
        )
    )
    lines.append(f"one trivial op (a + 1) costs {op_us:.1f} us on this machine now")
    lines.append(f"timing an op inside the counting mode adds {mode_extra:.1f} us (subtracted)")
    lines.append("targets:")
    for t in goals:
        mark = "met" if t["met"] else "NOT MET"
        lines.append(f"  {t['target']}: {t['value']:.2f} (goal {t['goal']}) {mark}")
    return "\n".join(lines)


def add_run_arguments(p: argparse.ArgumentParser, *, rounds: int, warmup_steps: int = 64) -> None:
    """The options of the scripts that run this mix at one batch size in interleaved rounds
    (forward_beside.py, forward_interference.py, overlap_throughput.py); check them with
    :func:`check_run_arguments`."""
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (median)")
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--out", default=None, help="write the result as JSON here")


def check_run_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if min(args.rounds, args.batch_size, args.steps) < 1:
        p.error("--rounds, --batch-size and --steps: must be >= 1")
    if args.warmup_steps < 0:
        p.error("--warmup-steps: must be >= 0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="16,64", help="comma-separated max_num_seqs values")
    p.add_argument("--warmup-steps", type=int, default=64, help="unmeasured steps first")
    p.add_argument("--steps", type=int, default=64, help="measured steps per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median)")
    p.add_argument("--seed", type=int, default=0, help="the mix's seed (and the model's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--attention-backend",
        default="auto",
        help="the engine's attention backend (sdpa_buckets: one call per length bucket)",
    )
    p.add_argument(
        "--mix",
        default="issue",
        choices=MIXES,
        help="issue: the issue's greedy LLaDA mix; every-kind-*: every request kind the batched "
        "step takes (rules, sampling, caches, guidance, Prophet) for one family; "
        "every-kind-block: SDAR's (both schedules, sampling on a third, Prophet on half)",
    )
    p.add_argument(
        "--overlap",
        nargs="?",
        const="thread",
        choices=OVERLAP_MODES,
        help="also time each run with Engine(overlap=MODE) (thread when no mode is given), "
        "two groups of B taking turns",
    )
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    loaded = micro_model(args.seed, mix_family(args.mix))
    mode_extra = mode_extra_us()
    records = []
    for size in sizes:
        print(f"B={size}: counting, then {args.repeats} timed runs", file=sys.stderr, flush=True)
        records.append(
            measure(
                loaded,
                size,
                warmup_steps=args.warmup_steps,
                steps=args.steps,
                seed=args.seed,
                repeats=args.repeats,
                backend=args.attention_backend,
                mix=args.mix,
                mode_extra=mode_extra,
                overlap=args.overlap,
            )
        )
    goals = targets(records)
    op_us = op_cost_us()
    print(format_report(records, goals, op_us, mode_extra))
    if args.out:
        write_json(
            args.out,
            {
                "records": records,
                "targets": goals,
                "calls_per_extra_request": calls_per_extra_request(records),
                "trivial_op_us": op_us,
                "timing_mode_extra_us_per_op": mode_extra,
                "mix": {
                    "name": args.mix,
                    "prompt_lengths": list(PROMPT_LENGTHS),
                    "gen_lengths": list(GEN_LENGTHS),
                    "block_lengths": list(BLOCK_LENGTHS),
                    "steps": "gen_length or gen_length / 2",
                    "kv_caches": list(KV_CACHES),
                    "remaskings": list(REMASKINGS),
                    "prophet": "every second request, Prophet(answer_start=None)",
                    "request_seeds": "None (engine stream)" if takes_unseeded() else "per request",
                    "seed": args.seed,
                    "attention_backend": args.attention_backend,
                    "warmup_steps": args.warmup_steps,
                    "measured_steps": args.steps,
                    "repeats": args.repeats,
                    "overlap": args.overlap,
                },
                "machine": machine_info(),
                "model": model_info(loaded.model, loaded.path),
                "command": "python benchmarks/host_overhead.py " + " ".join(sys.argv[1:]),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
