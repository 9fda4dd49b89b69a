"""The model's forward in a process of its own, for ``Engine(overlap="process")``.

An overlapped engine decodes one group's pass while the other group's forward runs. On a
thread, that forward shares the interpreter's lock with the decoding beside it and runs
slower (docs/benchmarks.md, sixteenth round); in a process of its own it keeps its speed, and
the host work is hidden behind it. The process holds the engine's model (its weights in
shared memory, not copied) and reads and writes the KV pool's tensor, also in shared memory;
each pass's packed inputs (int64 host arrays) cross through a shared input buffer with a
short message, and the hidden states and the gathered rows' logits come back through shared
output buffers. Everything else (scheduling, decoding, the pool's pages) stays in the
engine's process. CPU only: on a GPU the device runs the forward and a thread only launches
it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing.connection
import multiprocessing.process
import signal
import time
import weakref

import numpy as np
import torch
import torch.multiprocessing as torch_mp

from foretell.engine.runner import ForwardResult, PassForward, packed_forward
from foretell.models.attention import PoolUses
from foretell.models.transformer import DiffusionLM

logger = logging.getLogger(__name__)

# How long the model's process may take to start (importing torch, mapping the weights).
START_TIMEOUT_S = 120.0
# Processes that may die in a row, each replaced, before the engine stops using one.
MAX_DEATHS = 3


class ForwardProcessError(RuntimeError):
    """The forward failed in the model's process, or that process ended."""


@dataclasses.dataclass
class _Call:
    """One pass's inputs, as they cross to the model's process: its arrays' places in the
    shared input buffer (pickling and piping them cost about a millisecond a pass at B=64),
    and what is sent only when it is new: the input buffer, the KV pool's tensor."""

    number: int  # the pass's, echoed in its reply: the two sides never take another's
    arrays: dict[str, tuple[int, tuple[int, ...]] | np.ndarray]  # (offset, shape) or itself
    seq_lens: list[int]
    inputs: torch.Tensor | None  # the shared input buffer, when it is a new one
    storage: torch.Tensor | None  # the KV pool's tensor, when it is a new one


_POOL_FIELDS = tuple(f.name for f in dataclasses.fields(PoolUses))


def _pass_arrays(
    ids: np.ndarray,
    positions: np.ndarray,
    in_seq: np.ndarray,
    rows: np.ndarray,
    caches: PoolUses | None,
) -> dict[str, np.ndarray]:
    arrays = {"ids": ids, "positions": positions, "in_seq": in_seq, "rows": rows}
    if caches is not None:
        # Only the page tables the pass's sequences use: ``slots`` holds every running
        # request's row (the canvas rows' matrix), which is most of what would cross.
        used = caches.table >= 0
        tables, inverse = np.unique(caches.table[used], return_inverse=True)
        table = np.full_like(caches.table, -1)
        table[used] = inverse
        caches = dataclasses.replace(caches, slots=caches.slots[tables], table=table)
        arrays.update({f"pool.{name}": getattr(caches, name) for name in _POOL_FIELDS})
    return arrays


def _read_arrays(call: _Call, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """The pass's arrays, as views of the shared input buffer (or as they came)."""
    out = {}
    for name, place in call.arrays.items():
        if isinstance(place, np.ndarray):
            out[name] = place
        else:
            offset, shape = place
            out[name] = inputs[offset : offset + math.prod(shape)].reshape(shape)
    return out


def _serve(
    conn: multiprocessing.connection.Connection,
    model: DiffusionLM,
    chunk_tokens: int | None,
    threads: int,
) -> None:
    """The model process's loop: a pass's inputs in, its results into the shared buffers,
    a short reply out; ends when the engine closes its end of the pipe or sends None."""
    # Ctrl-C reaches the whole process group: the engine decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    storage = inputs = None
    hidden_buf = logits_buf = None
    conn.send(("ready", 0, torch.get_num_threads()))
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):
            return
        if call is None:
            return
        try:
            start = time.perf_counter()
            if call.storage is not None:
                storage = call.storage
            if call.inputs is not None:
                inputs = call.inputs.numpy()
            arrays = _read_arrays(call, inputs)
            caches = None
            if "pool.table" in arrays:  # some sequence uses the KV pool
                caches = PoolUses(*(arrays[f"pool.{name}"] for name in _POOL_FIELDS))
            with torch.inference_mode():
                hidden = packed_forward(
                    model,
                    torch.from_numpy(arrays["ids"]),
                    torch.from_numpy(arrays["positions"]),
                    call.seq_lens,
                    caches,
                    storage if caches is not None else None,
                    chunk_tokens,
                )
                gathered = model.logits_at(
                    hidden, torch.from_numpy(arrays["in_seq"]), torch.from_numpy(arrays["rows"])
                )
                new_hidden = new_logits = None
                if hidden_buf is None or not _fits(hidden_buf, hidden):
                    hidden_buf = new_hidden = _shared_like(hidden, hidden_buf)
                if logits_buf is None or not _fits(logits_buf, gathered):
                    logits_buf = new_logits = _shared_like(gathered, logits_buf)
                hidden_buf[: len(hidden)] = hidden
                logits_buf[: len(gathered)] = gathered
            grown = None
            if new_hidden is not None or new_logits is not None:
                grown = (new_hidden, new_logits)
            seconds = time.perf_counter() - start
        except Exception as err:  # the engine runs the pass again itself, in halves
            # New buffers may not have reached the engine: both are made and sent anew.
            hidden_buf = logits_buf = None
            reply = ("error", call.number, f"{type(err).__name__}: {err}")
        else:
            reply = ("ok", call.number, (len(hidden), len(gathered), seconds, grown))
        try:
            conn.send(reply)
        except (OSError, ValueError):  # the engine has gone
            return


def _fits(buffer: torch.Tensor, value: torch.Tensor) -> bool:
    return (
        buffer.shape[1:] == value.shape[1:]
        and buffer.dtype == value.dtype
        and (len(buffer) >= len(value))
    )


def _shared_like(value: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """A shared buffer for ``value``'s rows, with room to grow (twice the old one's rows)."""
    rows = max(len(value), 2 * len(old) if old is not None else 0, 1)
    return torch.empty((rows, *value.shape[1:]), dtype=value.dtype).share_memory_()


def _stop_process(
    conn: multiprocessing.connection.Connection | None,
    process: multiprocessing.process.BaseProcess | None,
) -> None:
    """Ask the model's process to end (closing the pipe ends it too), then make sure it has."""
    if conn is not None:
        with contextlib.suppress(OSError, ValueError):
            conn.send(None)
        conn.close()
    if process is not None:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


def _place(
    arrays: dict[str, np.ndarray], inputs: np.ndarray
) -> dict[str, tuple[int, tuple[int, ...]] | np.ndarray]:
    """Copy the int64 ``arrays`` end to end into ``inputs``; their places, and any other
    array as it is."""
    places: dict[str, tuple[int, tuple[int, ...]] | np.ndarray] = {}
    offset = 0
    for name, array in arrays.items():
        if array.dtype != np.int64:
            places[name] = array
            continue
        inputs[offset : offset + array.size] = array.reshape(-1)
        places[name] = (offset, array.shape)
        offset += array.size
    return places


class PendingForward:
    """A forward the model's process is running; :meth:`result` waits for it (once: later
    calls return the same result or raise the same error)."""

    def __init__(
        self, owner: ForwardProcess, number: int, work: PassForward, in_seq_d: torch.Tensor
    ) -> None:
        self._owner = owner
        self._number = number
        self._work = work
        self._in_seq_d = in_seq_d
        self._result: ForwardResult | None = None
        self._error: Exception | None = None

    def result(self) -> ForwardResult:
        if self._result is None and self._error is None:
            try:
                self._result = self._owner._receive(self._number, self._work, self._in_seq_d)
            except Exception as err:
                self._error = err
            self._work = None  # the pass's inputs are no longer needed here
        if self._error is not None:
            raise self._error
        return self._result


class ForwardProcess:
    """A process that runs the forward of ``model`` (:func:`packed_forward` and the LM head on
    the gathered rows), one pass at a time. It starts at once and ends with :meth:`close`;
    one that ended otherwise is started again at the next pass."""

    def __init__(self, model: DiffusionLM, chunk_tokens: int | None, threads: int) -> None:
        if next(model.parameters()).device.type != "cpu":
            raise ValueError("a forward process runs a model on the CPU only")
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.threads = threads
        self._context = torch_mp.get_context("spawn")
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        # What the process has: the KV pool's tensor (weakly: a grown pool frees the old
        # one), the shared input buffer (this process's view) and the output buffers.
        self._storage_sent: weakref.ref[torch.Tensor] | None = None
        self._inputs: np.ndarray | None = None
        self._hidden: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._busy = False
        self._closed = False
        self._finalizer: weakref.finalize | None = None
        self._number = 0  # the last pass sent
        self._deaths = 0  # processes that died in a row, with no pass collected between
        self.starts = 0  # processes started (more than one: one ended and was replaced)
        # The process cannot be started or fed (no shared memory, dying at every pass): the
        # engine stops using it.
        self.unusable = False
        self.passes = 0  # passes the process ran
        self.storages_sent = 0  # KV pool tensors sent (the pool grew in between)
        self.process_threads: int | None = None  # torch threads, as the process reports
        self._start()

    def _start(self) -> None:
        self.unusable = True  # until it has started
        parent = child = None
        try:
            parent, child = self._context.Pipe()
            process = self._context.Process(
                target=_serve,
                args=(child, self.model, self.chunk_tokens, self.threads),
                name="foretell-forward",
                daemon=True,
            )
            self.model.share_memory()  # mapped there: the weights are not copied per process
            process.start()
        except Exception as err:  # an unpicklable model, a daemonic parent, no /dev/shm
            for end in (parent, child):
                if end is not None:
                    end.close()
            raise ForwardProcessError(
                f"overlap='process': the model's process could not start ({err!r}); "
                "overlap='thread' runs the forward in this process"
            ) from err
        child.close()
        self._conn, self._process = parent, process
        # A dropped engine's process ends with it, not only at the interpreter's exit.
        self._finalizer = weakref.finalize(self, _stop_process, parent, process)
        self._storage_sent = self._inputs = self._hidden = self._logits = None
        self._busy = self._closed = False
        self.starts += 1
        failure = None
        try:
            if not parent.poll(START_TIMEOUT_S):
                failure = f"did not start in {START_TIMEOUT_S}s"
            else:
                _, _, self.process_threads = parent.recv()
        except (EOFError, OSError):
            failure = "ended at start"
        except BaseException:  # interrupted: its "ready" would be read as a pass's reply
            self._stop()
            raise
        if failure is not None:
            self._stop()
            raise ForwardProcessError(
                f"overlap='process': the model's process {failure} (exit {process.exitcode}); "
                "overlap='thread' runs the forward in this process"
            )
        self.unusable = False

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def submit(self, work: PassForward, storage: torch.Tensor | None) -> PendingForward:
        """Send ``work``'s inputs (and the KV pool's tensor ``storage`` when it is a new one)
        and return at once; the pass runs while the caller goes on."""
        if self._busy:  # a pass sent, never collected: its reply would pass for this one's
            logger.warning("the model's process has a pass nobody collected; starting a new one")
            self.close()  # stopped here, not dead: no death counted
        if not self.alive:
            if not self._closed and self.starts:
                self._deaths += 1
                if self._deaths >= MAX_DEATHS:
                    self.unusable = True
                    raise ForwardProcessError(
                        f"the model's process died {self._deaths} times in a row"
                    )
                logger.warning("the model's process ended; starting a new one")
            self._stop()
            self._start()
        step = work.step
        in_seq_d = step.places_on(torch.device("cpu"), work.runner.model.shifted_logits)
        caches = step.pool_uses
        send_storage = None
        sent = None if self._storage_sent is None else self._storage_sent()
        if caches is not None and storage is not None and storage is not sent:
            try:
                storage.share_memory_()  # in place: the pool keeps the same tensor
            except Exception as err:  # no room in /dev/shm for the (grown) pool
                self.unusable = True
                raise ForwardProcessError(f"the KV pool cannot be shared: {err!r}") from err
            send_storage = storage
        arrays = _pass_arrays(step.ids, step.positions, in_seq_d.numpy(), work.rows, caches)
        number = self._number + 1
        try:
            inputs, send_inputs = self._input_buffer(arrays)
            places = _place(arrays, inputs)
            call = _Call(number, places, list(work.seq_lens), send_inputs, send_storage)
            self._busy = True
            self._conn.send(call)
        except BaseException as err:
            # Whatever the process has now is unknown: a new one starts at the next pass.
            self._stop()
            if isinstance(err, Exception):
                raise ForwardProcessError(f"the pass could not be sent: {err!r}") from err
            raise
        self._number = number
        if send_inputs is not None:
            self._inputs = inputs
        if send_storage is not None:
            self._storage_sent = weakref.ref(send_storage)
            self.storages_sent += 1
        return PendingForward(self, number, work, in_seq_d)

    def _input_buffer(
        self, arrays: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """The shared input buffer for ``arrays``: the current one, or a new, larger one
        (returned as a tensor, to be sent) when their int64 ones do not fit."""
        size = sum(a.size for a in arrays.values() if a.dtype == np.int64)
        if self._inputs is not None and len(self._inputs) >= size:
            return self._inputs, None
        old = 0 if self._inputs is None else len(self._inputs)
        new = torch.empty(max(size, 2 * old, 1), dtype=torch.int64).share_memory_()
        return new.numpy(), new

    def _receive(self, number: int, work: PassForward, in_seq_d: torch.Tensor) -> ForwardResult:
        if self._conn is None or number != self._number or not self._busy:
            raise ForwardProcessError("the model's process was stopped before this pass ended")
        try:
            kind, replied, payload = self._conn.recv()
        except (EOFError, OSError) as err:
            process = self._process
            self._stop()
            code = None if process is None else process.exitcode
            raise ForwardProcessError(f"the model's process ended (exit {code})") from err
        except BaseException:  # interrupted: the process may still be reading its inputs
            self._stop()
            raise
        self._busy = False
        if replied != number:  # cannot happen while every pass is collected: never trust it
            self._stop()
            raise ForwardProcessError(f"the model's process answered pass {replied} for {number}")
        self._deaths = 0
        if kind == "error":
            raise ForwardProcessError(f"forward failed in the model's process: {payload}")
        tokens, rows, seconds, grown = payload
        if grown is not None:
            hidden, logits = grown
            self._hidden = hidden if hidden is not None else self._hidden
            self._logits = logits if logits is not None else self._logits
        runner = work.runner
        runner.forward_seconds += seconds
        runner.forward_passes += 1
        self.passes += 1
        # Copies: the buffers take the next pass's results while this pass is decoded.
        with torch.inference_mode():
            hidden_out = self._hidden[:tokens].clone()
            gathered = self._logits[:rows].clone()
        return in_seq_d, hidden_out, torch.from_numpy(work.rows), gathered

    def _stop(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        self._busy = False
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        _stop_process(conn, process)

    def close(self) -> None:
        """Stop the model's process (a pass in flight is waited for by the caller first); the
        next pass starts a new one."""
        self._stop()
        self._closed = True
