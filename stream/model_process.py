"""The model in a process of its own, beside the worker's Kafka I/O process.

A worker's Python side (kafka-python, decoding, message building) and the model (with the
patients' templates) each need about one core at full load. In one process they share one
interpreter lock, and the model pass waits for it at every hand-over; in two they run side by
side on two cores. The worker sends each batch's arrays down one pipe and gets the pass's
arrays back on another; the child also keeps the patients' template history (the I/O side
only numbers the slots). Only this child process imports torch, so the I/O process stays
small.

Batches are pipelined: the worker hands over the next batch while the model computes the
current one, and a receiver thread resolves each batch's future as its answer arrives (in
submission order). Both pipes are widened to hold a whole batch, so neither side waits for
the other to read: the model never waits for the worker's interpreter lock between batches,
and the worker never blocks on a busy model.

The child ignores SIGINT/SIGTERM (the worker finishes its batches in flight first, then
closes the pipe) and exits when the pipe closes, so it never outlives its worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import multiprocessing
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from models.batches import ModelBatch, Repair
from stream.config import ModelConfig, WorkerConfig

log = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0  # importing torch and tracing the model on a slow, busy node
STOP_TIMEOUT_S = 5.0
PIPE_BYTES = 1 << 20  # a batch of 256 beats pickles to ~0.25 MB, its answer to ~0.2 MB


class ModelProcessError(RuntimeError):
    """The model process failed to start or died: the worker must stop (nothing of the
    batches in flight is committed, so they are replayed)."""


class ModelProcess:
    """What a worker uses of `stream.engine.Engine` (version, threshold, submit, serve,
    close), served by a child process."""

    def __init__(
        self,
        checkpoint: str | Path = "",
        threads: int = 1,
        max_batch: int = WorkerConfig.max_batch,
        runtime: str = ModelConfig.runtime,
    ):
        if checkpoint and not Path(checkpoint).is_file():  # before a process is started
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        self._max_batch = max_batch
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads
        batches_in, self._batches = ctx.Pipe(duplex=False)
        self._results, results_out = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=serve,
            args=(batches_in, results_out, str(checkpoint), threads, max_batch, runtime),
            name="ecg-model",
            daemon=True,
        )
        self._process.start()
        batches_in.close()
        results_out.close()
        for conn in (self._batches, self._results):
            _widen(conn)
        self._lock = threading.Lock()  # guards _waiting, _dead and the batch pipe
        self._waiting: deque[Future] = deque()  # submitted, in order, result not back yet
        self._dead: ModelProcessError | None = None
        self._receiver: threading.Thread | None = None  # started by wait_ready()
        self.version = ""  # all three known after wait_ready()
        self.threshold = 0.0
        self.throughput = 0.0  # beats/s at the largest batch, measured in the warm-up

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> ModelProcess:
        """Block until the model is loaded and warmed up; raises ModelProcessError if not."""
        started = time.monotonic()
        if not self._results.poll(timeout_s):
            self.close()
            raise ModelProcessError(f"the model process did not start within {timeout_s:.0f} s")
        try:
            kind, payload = self._results.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc
        if kind == "error":
            raise ModelProcessError(f"model process: {payload}")
        self.version, self.threshold, self.throughput, runtimes = payload
        self._receiver = threading.Thread(target=self._receive, name="model-results", daemon=True)
        self._receiver.start()
        log.info(
            "model %s ready in process %d after %.1f s: %.0f beats/s at batch %d on this CPU "
            "(batch sizes by runtime: %s)",
            self.version,
            self._process.pid,
            time.monotonic() - started,
            self.throughput,
            self._max_batch,
            runtimes,
        )
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def submit(self, batch: ModelBatch) -> Future:
        """Hand a batch to the model process; the future gives `Engine.serve`'s answer (or
        raises ModelProcessError). Returns once the batch is in the pipe."""
        future: Future = Future()
        with self._lock:
            if self._dead is not None:
                raise self._dead
            try:
                self._batches.send(batch)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as exc:
                raise self._died() from exc
            self._waiting.append(future)
        return future

    def serve(self, batch: ModelBatch) -> Repair | None:
        """`Engine.serve` in the model process (which keeps the template history)."""
        return self.submit(batch).result()

    def _receive(self) -> None:
        """Resolve the submitted futures in order, until the child's pipe closes."""
        while True:
            try:
                kind, payload = self._results.recv()
            except (EOFError, OSError):
                with self._lock:
                    self._dead = self._died()
                    while self._waiting:
                        self._waiting.popleft().set_exception(self._dead)
                return
            with self._lock:
                future = self._waiting.popleft()
            if kind == "error":
                future.set_exception(ModelProcessError(f"model process: {payload}"))
            else:
                future.set_result(payload)

    def _died(self) -> ModelProcessError:
        self._process.join(1.0)
        return ModelProcessError(f"the model process died (exit code {self._process.exitcode})")

    def close(self) -> None:
        """Stop the child: close its batch pipe (it answers what it has, then exits), wait
        briefly, then terminate it."""
        with self._lock:
            self._batches.close()
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(STOP_TIMEOUT_S)
        if self._receiver is not None:
            self._receiver.join(STOP_TIMEOUT_S)  # it ends at the child's EOF
        self._results.close()

    def __enter__(self) -> ModelProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(batches, results, checkpoint: str, threads: int, max_batch: int, runtime: str) -> None:
    """The child's main: load the model, announce it, then answer batches until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from stream.engine import Engine

        engine = Engine.load(checkpoint, threads, max_batch, runtime)
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which stops with it
        why = " ".join(str(exc).split())[:300]  # one line for the worker's error message
        results.send(("error", f"cannot load the model: {type(exc).__name__}: {why}"))
        return
    ready = (engine.version, engine.threshold, engine.throughput, engine.describe_runtimes())
    results.send(("ready", ready))
    gc.freeze()  # the model is long-lived: keep it out of the cyclic collector's scans
    while True:
        try:
            batch = batches.recv()
        except (EOFError, OSError):
            return  # the worker closed the pipe or died
        try:
            result = engine.serve(batch)
        except Exception as exc:  # noqa: BLE001 - reported; the worker stops with it
            results.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        results.send(("ok", result))


def _widen(conn) -> None:
    """Let the pipe under `conn` hold PIPE_BYTES (Linux), so a batch or an answer is written
    without waiting for the reader. Elsewhere, or beyond the system's limit, a large send
    waits for the other side: slower, never wrong."""
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
