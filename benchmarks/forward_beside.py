"""Whether running the forward beside a step's host work hides that work on this CPU (#24).

    OMP_NUM_THREADS=1 python benchmarks/forward_beside.py \
        --out benchmarks/results/forward_beside.json

Issue #24 measures a step's host time as its wall time less its forward. An engine that runs
one group of requests' forward while the host decodes another group's step (as engines
overlap a GPU's work with the host's) leaves only the host work that outlasts the forward,
as long as the two do not slow each other much. This script measures that on this machine,
without building such an engine: it replays ``host_overhead.py``'s steps of the issue's mix
(the model's outputs from a recording, so the host work is the engine's own, checked to give
the recording's outputs and canvases), and at each step's first replayed forward (a
commit's read-only passes start none) it waits for the model pass started at the previous
step's, then starts the next. So every step's host work runs while a pass runs:

- ``serial``: the pass runs in the forward's place, the host waiting (the engine as it is,
  with this pass as its forward);
- ``thread``: on another thread of this process (the interpreter's lock is shared: a torch
  op gives it up only while it computes);
- ``process``: in another process, this script run with ``--pass-server`` (POSIX only);
- ``none``: no pass (the replay alone, for the host work's own time).

The pass stands in for the forward: the micro model's forward and LM head over ``SEQS``
uncached sequences of ``SEQ_LEN`` tokens (about the issue's mix at B=64, ~4,600 tokens a
pass) with every fourth row's logits, in the engine's attention backend here
(``sdpa_buckets``); the other process must give this process's logits (a checksum when it
starts), and only a line crosses between them a pass. Each run also times the pass alone just
before it. Per kind: a step's period (its start to the next step's: the caller's work
between steps in), its wall time, the pass beside and alone, the host work (wall less the
waits for passes), the issue's measure (wall less the pass: it reads below zero once the
host work is shorter than the pass, whatever the pass's own slowdown) and the period less
the pass alone; and each overlapped kind's period against ``serial`` in the same round,
which is what overlap saves.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead

from foretell.bench.report import machine_info, write_json
from foretell.engine.engine import Engine
from foretell.models.registry import LoadedModel

SEQS, SEQ_LEN = 64, 72  # 4,608 tokens: about a pass of the mix at B=64
BACKEND = "sdpa_buckets"  # the one host_overhead.py's engines run
KINDS = ("none", "serial", "thread", "process")
ALONE_CALLS = 5  # the pass timed alone this often before each run (the median is kept)


def model_pass(loaded: LoadedModel, backend: str = BACKEND) -> Callable[[], torch.Tensor]:
    """The model's forward and LM head over one pass of the issue's size (every fourth row's
    logits, about the rows a step gathers), called through the model's class so that no
    wrapper of its methods (a tape's, a clock's) sees it."""
    model, cls = loaded.model, type(loaded.model)
    model.set_attention_backend(backend)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.embed.weight.shape[0], (SEQS * SEQ_LEN,), generator=gen)
    positions = torch.arange(SEQ_LEN).repeat(SEQS)
    rows = torch.arange(0, SEQS * SEQ_LEN, 4)
    lens = [SEQ_LEN] * SEQS

    def run() -> torch.Tensor:
        with torch.inference_mode():  # per thread
            hidden = cls.forward_packed(model, ids, positions, lens)
            return cls.logits_at(model, hidden, positions, rows)

    return run


def checksum(logits: torch.Tensor) -> str:
    """The logits' bytes, summed up (two processes running the same pass must agree)."""
    return f"{zlib.crc32(logits.contiguous().numpy().tobytes()):08x}"


def timed_once(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def timed_alone(work: Callable[[], object], calls: int = ALONE_CALLS) -> float:
    """The median ms of ``calls`` calls of ``work`` (after one not timed)."""
    work()
    return 1e3 * statistics.median(timed_once(work) for _ in range(calls))


class Pass(Protocol):
    """Where a kind runs the pass: ``start`` begins one, ``finish`` waits for it and gives
    its seconds (raising its failure); one at a time."""

    def alone(self, calls: int = ALONE_CALLS) -> float: ...
    def start(self) -> None: ...
    def finish(self) -> float: ...
    def close(self) -> None: ...


class PassInline:
    """The pass run at once by ``start``, in the caller's thread (the ``serial`` kind)."""

    def __init__(self, work: Callable[[], object]) -> None:
        self.work = work
        self.last_s: float | None = None

    def alone(self, calls: int = ALONE_CALLS) -> float:
        return timed_alone(self.work, calls)

    def start(self) -> None:
        self.last_s = timed_once(self.work)

    def finish(self) -> float:
        if self.last_s is None:
            raise RuntimeError("no pass to finish")
        seconds, self.last_s = self.last_s, None
        return seconds

    def close(self) -> None:
        pass


class PassThread:
    """The pass on a thread of its own (the ``thread`` kind): ``start`` hands it over,
    ``finish`` waits for it. Timed alone on the caller's thread (the same pass, one thread)."""

    def __init__(self, work: Callable[[], object], timeout_s: float = 120.0) -> None:
        self.work = work
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pass")
        self.pending: Future[float] | None = None

    def alone(self, calls: int = ALONE_CALLS) -> float:
        return timed_alone(self.work, calls)

    def start(self) -> None:
        self.pending = self.pool.submit(timed_once, self.work)

    def finish(self) -> float:
        if self.pending is None:
            raise RuntimeError("no pass to finish")
        pending, self.pending = self.pending, None
        return pending.result(timeout=self.timeout_s)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class PassProcess:
    """This script as a process of its own that runs the pass when told (``--pass-server``;
    the ``process`` kind): commands and answers are lines on its standard input and output,
    one answer awaited at a time; it ends when its input does. It must give ``expect``'s
    logits (:func:`checksum`), or it is no measure of the same pass."""

    def __init__(self, expect: str, threads: int = 1, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s  # for each answer, and for the process to end
        # Its errors go to a file: a full pipe would stall it. Closed by ``close``.
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115
        script = str(Path(__file__).resolve())
        try:
            self.process = subprocess.Popen(
                [sys.executable, script, "--pass-server", "--threads", str(threads)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.errors,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            )
        except BaseException:
            self.errors.close()
            raise
        try:
            got = self._answer("ready")
            if got != expect:
                raise self._ended(f"its logits' checksum is {got}, not {expect}")
        except BaseException:
            self.close()
            raise

    def _send(self, line: str) -> None:
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except OSError as err:  # a broken pipe: it has ended
            raise self._ended(f"could not be told {line!r}") from err

    def _answer(self, expect: str) -> str:
        """The word after ``expect`` in the next answer line."""
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout_s)
        if not ready:
            raise self._ended(f"no answer in {self.timeout_s:g} s")
        words = self.process.stdout.readline().split()
        if len(words) != 2 or words[0] != expect:
            raise self._ended(f"answered {' '.join(words)!r}, not {expect!r}")
        return words[1]

    def _ended(self, why: str) -> RuntimeError:
        """Kill it; the error to raise, with what it wrote to its standard error."""
        self.process.kill()
        self.process.wait()
        self.errors.seek(0)
        errors = self.errors.read().strip()[-2000:] or "nothing on its standard error"
        return RuntimeError(f"the pass process ended ({why}): {errors}")

    def alone(self, calls: int = ALONE_CALLS) -> float:
        self._send(f"alone {calls}")
        return float(self._answer("alone"))

    def start(self) -> None:
        self._send("once")

    def finish(self) -> float:
        return float(self._answer("once"))

    def close(self) -> None:
        """Close its input, so it ends; kill it if it has not within ``timeout_s``."""
        with contextlib.suppress(OSError):  # it has ended already
            self.process.stdin.close()
        try:
            self.process.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.errors.close()


def serve_pass(threads: int) -> int:
    """``--pass-server``: :class:`PassProcess`'s other end. Its answers go to the standard
    output it was started with; anything else printing to standard output (Python or C) goes
    to its standard error, so it cannot break an answer."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    torch.set_num_threads(threads)
    work = model_pass(host_overhead.micro_model(0, "llada"))

    def answer(*words: object) -> None:
        answers.write(" ".join(map(str, words)) + "\n")
        answers.flush()

    answer("ready", checksum(work()))
    for line in sys.stdin:
        command = line.split()
        if command == ["once"]:
            answer("once", timed_once(work))
        elif command[:1] == ["alone"] and len(command) == 2:
            answer("alone", timed_alone(work, int(command[1])))
        else:
            raise ValueError(f"unknown command {line.strip()!r}")
    return 0


def pass_beside(kind: str, work: Callable[[], torch.Tensor], threads: int = 1) -> Pass | None:
    """Where ``kind`` runs the pass (None: it runs none)."""
    if kind == "none":
        return None
    if kind == "serial":
        return PassInline(work)
    if kind == "thread":
        return PassThread(work)
    if kind == "process":
        return PassProcess(checksum(work()), threads=threads)
    raise ValueError(f"kind: one of {KINDS}, got {kind!r}")


class StepClock:
    """While in use, ``Engine.step`` raises ``new_step`` and records its start time as each
    call starts: so a hook on the model's calls can tell a step's first forward pass from a
    commit's read-only ones, and a step's period (start to next start) takes in the work a
    caller does between steps, which the step's own wall time leaves out."""

    def __init__(self) -> None:
        self.new_step = False
        self.starts: list[float] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[StepClock]:
        original = Engine.step

        @functools.wraps(original)
        def step(engine: Engine, *args: object, **kwargs: object) -> object:
            self.starts.append(time.perf_counter())
            self.new_step = True
            return original(engine, *args, **kwargs)

        Engine.step = step
        try:
            yield self
        finally:
            Engine.step = original


class PassSchedule:
    """A pass started at each step's first forward, the one started at the previous step's
    finished first: so each step's host work runs beside a pass. ``seconds[k]`` is the pass
    started at step ``k``. A pass's failure is kept (``error``) and no pass starts after it:
    raised from the model's call, the engine would take it for a failed forward."""

    def __init__(self, beside: Pass, clock: StepClock) -> None:
        self.beside = beside
        self.clock = clock
        self.seconds: list[float] = []
        self.pending = False
        self.error: BaseException | None = None

    def at_forward(self) -> None:
        if not self.clock.new_step or self.error is not None:  # a read-only pass, or failed
            return
        self.clock.new_step = False
        try:
            self.finish()
            self.beside.start()
            self.pending = True
        except BaseException as err:  # raised by ``settle`` (after the run), not here
            self.error = err

    def finish(self) -> None:
        """Finish the pending pass, if any."""
        if self.pending:
            self.pending = False
            self.seconds.append(self.beside.finish())

    def settle(self) -> None:
        """After the run: finish the last pass; raise a pass's failure."""
        if self.error is None:
            try:
                self.finish()
            except BaseException as err:
                self.error = err
        if self.error is not None:
            raise RuntimeError(f"a pass beside the steps failed: {self.error!r}") from self.error


def replay_beside(
    loaded: LoadedModel,
    tape: host_overhead.ForwardTape,
    batch_size: int,
    beside: Pass | None,
    *,
    warmup_steps: int,
    steps: int,
) -> dict:
    """One replay of the recorded steps with a pass beside each step's host work
    (:class:`PassSchedule`; none without ``beside``); the run's times."""
    clock = StepClock()
    schedule = PassSchedule(beside, clock) if beside is not None else None
    alone_ms = beside.alone() if beside is not None else 0.0
    previous = tape.after_forward
    tape.after_forward = schedule.at_forward if schedule is not None else previous
    kw = {"warmup_steps": warmup_steps, "steps": steps, "backend": BACKEND}
    try:
        with clock.installed():
            run = host_overhead.run_mix(
                loaded, batch_size, count=False, tape=tape, replay=True, **kw
            )
    finally:  # run_mix checked the replay against the recording
        tape.after_forward = previous
        if schedule is not None:
            schedule.settle()
    total = warmup_steps + steps
    if run.skipped_steps:  # the wall would then cover fewer steps than the passes
        raise RuntimeError(f"{run.skipped_steps} steps ran short of a full batch")
    if schedule is not None and len(schedule.seconds) != total:
        raise RuntimeError(f"{len(schedule.seconds)} passes ran beside {total} steps")
    if len(clock.starts) != total:
        raise RuntimeError(f"{len(clock.starts)} steps started, not {total}")
    wall_ms = 1e3 * run.wall_s / run.steps
    # From the first measured step's start to the last's: the steps and the caller's work
    # between them.
    period_ms = 1e3 * (clock.starts[-1] - clock.starts[warmup_steps]) / max(steps - 1, 1)
    # The passes beside the measured steps: a measured step waits for the one started at the
    # step before it (the first measured one, for the warm-up's last): the same passes but
    # one, in the mean.
    measured = schedule.seconds[warmup_steps:] if schedule is not None else []
    pass_ms = 1e3 * statistics.fmean(measured) if measured else 0.0
    return {
        "wall_ms_per_step": wall_ms,
        "period_ms_per_step": period_ms,
        "pass_ms": pass_ms,  # beside the host work (the mean over the measured steps)
        "pass_alone_ms": alone_ms,  # just before the run
        # The host work itself: wall less the time in the model's calls (the waits for passes).
        "host_us_per_request_step": run.host_us_less_model_calls,
        # The measure: wall less the forward (the pass beside), a request-step.
        "wall_less_pass_us_per_request_step": 1e3 * (wall_ms - pass_ms) / batch_size,
    }


def measure(
    batch_size: int,
    rounds: int,
    warmup_steps: int,
    steps: int,
    seed: int = 0,
    threads: int = 1,
) -> dict:
    """``rounds`` rounds at ``batch_size``, each running every kind once in a shuffled order
    (seeded by ``seed``): each kind's runs and medians."""
    loaded = host_overhead.micro_model(0, "llada")
    tape = host_overhead.ForwardTape()
    host_overhead.run_mix(
        loaded,
        batch_size,
        count=False,
        tape=tape,
        warmup_steps=warmup_steps,
        steps=steps,
        backend=BACKEND,
    )
    work = model_pass(loaded)
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    orders = []
    shuffle = random.Random(seed)
    for _ in range(rounds):
        order = shuffle.sample(KINDS, len(KINDS))
        orders.append(order)
        for kind in order:
            beside = pass_beside(kind, work, threads)
            try:
                runs[kind].append(
                    replay_beside(
                        loaded, tape, batch_size, beside, warmup_steps=warmup_steps, steps=steps
                    )
                )
            finally:
                if beside is not None:
                    beside.close()
    for kind_runs in runs.values():
        for run in kind_runs:
            # The step's time beyond its pass alone: host work not hidden, and what running
            # beside the host work added to the pass.
            beyond = run["period_ms_per_step"] - run["pass_alone_ms"]
            run["period_less_pass_alone_us_per_request_step"] = 1e3 * beyond / batch_size
    medians = {
        kind: {key: statistics.median(run[key] for run in kind_runs) for key in kind_runs[0]}
        for kind, kind_runs in runs.items()
    }
    # Each overlapped kind against ``serial`` in the same round: the period it saves a step.
    saved = {
        kind: [
            serial["period_ms_per_step"] - run["period_ms_per_step"]
            for serial, run in zip(runs["serial"], runs[kind], strict=True)
        ]
        for kind in ("thread", "process")
    }
    return {
        "batch_size": batch_size,
        "medians": medians,
        "period_saved_ms_per_step_runs": saved,
        "runs": runs,
        "orders": orders,
    }


def format_report(result: dict) -> str:
    """The medians as a table, and each overlapped kind's saving against ``serial``."""
    b = result["batch_size"]
    medians = result["medians"]
    lines = [
        f"B={b}, issue's mix replayed, a pass of {SEQS}x{SEQ_LEN} tokens beside each step",
        f"{'kind':>8} {'period ms':>10} {'wall ms':>8} {'pass ms':>8} {'alone':>6} "
        f"{'host us/rs':>11} {'wall-pass us/rs':>16} {'period-alone us/rs':>19}",
    ]
    for kind, m in medians.items():
        lines.append(
            f"{kind:>8} {m['period_ms_per_step']:>10.2f} {m['wall_ms_per_step']:>8.2f} "
            f"{m['pass_ms']:>8.2f} {m['pass_alone_ms']:>6.2f} "
            f"{m['host_us_per_request_step']:>11.1f} "
            f"{m['wall_less_pass_us_per_request_step']:>16.1f} "
            f"{m['period_less_pass_alone_us_per_request_step']:>19.1f}"
        )
    for kind, saved in result["period_saved_ms_per_step_runs"].items():
        shown = ", ".join(f"{v:.2f}" for v in saved)
        lines.append(
            f"{kind} against serial, the same round: {statistics.median(saved):.2f} ms a step "
            f"saved (median; each round: {shown})"
        )
    lines += [
        "period: a step's start to the next one's (the caller's work between steps in);",
        "wall: the step() call alone; pass: beside the host work (the measured steps' mean);",
        "alone: the pass just before the run; host: wall less the waits for passes;",
        "wall-pass: the issue's measure with the pass as the forward; period-alone: a step's",
        "time beyond its pass alone. Medians of each kind's runs, a request-step where /rs.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    host_overhead.add_run_arguments(p, rounds=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads, in each process")
    p.add_argument("--pass-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pass_server:
        return serve_pass(args.threads)
    host_overhead.check_run_arguments(p, args)
    if args.threads < 1:
        p.error("--threads: must be >= 1")
    torch.set_num_threads(args.threads)
    result = measure(
        args.batch_size, args.rounds, args.warmup_steps, args.steps, threads=args.threads
    )
    print(format_report(result))
    if args.out:
        write_json(args.out, {"machine": machine_info(), "rounds": args.rounds, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
