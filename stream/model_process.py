"""The model in a process of its own, beside the worker's Kafka I/O process.

A worker's Python side (kafka-python, decoding, message building) and the model (with the
patients' templates) each need about one core at full load. In one process they share one
interpreter lock, and the model pass waits for it at every hand-over; in two they run side by
side on two cores. The worker sends each batch's arrays over a pipe and gets the pass's arrays
back; the child also keeps the patients' template history (the I/O side only numbers the
slots). Only this child process imports torch, so the I/O process stays small.

The child ignores SIGINT/SIGTERM (the worker finishes its batches in flight first, then
closes the pipe) and exits when the pipe closes, so it never outlives its worker.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import time
from pathlib import Path

from models.batches import ModelBatch, Repair

log = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0  # importing torch and tracing the model on a slow, busy node
STOP_TIMEOUT_S = 5.0


class ModelProcessError(RuntimeError):
    """The model process failed to start or died: the worker must stop (nothing of the
    batches in flight is committed, so they are replayed)."""


class ModelProcess:
    """What a worker uses of `stream.engine.Engine` (version, threshold, serve, close),
    served by a child process. Use from one thread at a time."""

    def __init__(self, checkpoint: str | Path = "", threads: int = 1):
        if checkpoint and not Path(checkpoint).is_file():  # before a process is started
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads
        self._conn, child_end = ctx.Pipe()
        self._process = ctx.Process(
            target=serve, args=(child_end, str(checkpoint), threads), name="ecg-model", daemon=True
        )
        self._process.start()
        child_end.close()
        self.version = ""  # both known after wait_ready()
        self.threshold = 0.0

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> ModelProcess:
        """Block until the model is loaded and warmed up; raises ModelProcessError if not."""
        started = time.monotonic()
        if not self._conn.poll(timeout_s):
            self.close()
            raise ModelProcessError(f"the model process did not start within {timeout_s:.0f} s")
        self.version, self.threshold = self._receive()
        log.info(
            "model %s ready in process %d after %.1f s",
            self.version,
            self._process.pid,
            time.monotonic() - started,
        )
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def serve(self, batch: ModelBatch) -> Repair | None:
        """`Engine.serve` in the model process (which keeps the template history)."""
        try:
            self._conn.send(batch)
        except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
            raise self._died() from exc
        arrays = self._receive()
        return None if arrays is None else Repair(*arrays)

    def _receive(self):
        try:
            kind, payload = self._conn.recv()
        except (EOFError, ConnectionResetError) as exc:
            raise self._died() from exc
        if kind == "error":
            raise ModelProcessError(f"model process: {payload}")
        return payload

    def _died(self) -> ModelProcessError:
        self._process.join(1.0)
        return ModelProcessError(f"the model process died (exit code {self._process.exitcode})")

    def close(self) -> None:
        """Stop the child: close its pipe, wait briefly, then terminate it."""
        self._conn.close()
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(STOP_TIMEOUT_S)

    def __enter__(self) -> ModelProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(conn, checkpoint: str, threads: int) -> None:
    """The child's main: load the model, announce it, then answer batches until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from stream.engine import Engine

        engine = Engine.load(checkpoint, threads)
    except Exception as exc:  # noqa: BLE001 - reported to the worker, which stops with it
        why = " ".join(str(exc).split())[:300]  # one line for the worker's error message
        conn.send(("error", f"cannot load the model: {type(exc).__name__}: {why}"))
        return
    conn.send(("ready", (engine.version, engine.threshold)))
    gc.freeze()  # the model is long-lived: keep it out of the cyclic collector's scans
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return  # the worker closed the pipe or died
        try:
            result = engine.serve(batch)
        except Exception as exc:  # noqa: BLE001 - reported; the worker stops with it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        if result is not None:
            result = (result.samples, result.probabilities, result.anomaly_score)
        conn.send(("ok", result))
