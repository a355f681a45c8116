"""The model in this process: the loaded checkpoint, its traced serving pass and the template
history of the worker's patients."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from models.batches import ModelBatch, Repair
from models.config import DEFAULT_CHECKPOINT
from models.data import BEAT_LEN
from models.model import EcgNet, load_checkpoint, repair, trace_repair, unknown_context
from models.templates import TemplateSpec, TemplateStore
from stream.config import RUNTIMES, ModelConfig, WorkerConfig

log = logging.getLogger(__name__)


def padded_rows(n: int) -> int:
    """The batch size a pass of n beats runs at: 1, 2, 4 or 8, then multiples of 8.

    oneDNN builds its LSTM kernels for each batch shape the first time it meets it (a
    one-off cost per new size), and a worker at low load sees every size from 1 up:
    those first calls were latency spikes in its first seconds. With padding the engine only
    runs 35 sizes up to 256, all warmed up before it serves (`Engine.warm_up`)."""
    return 1 << (n - 1).bit_length() if 0 < n <= 8 else -(-n // 8) * 8


@dataclass
class Engine:
    """The loaded model, its traced serving pass and what the stream needs to know about it.
    `stream.model_process.ModelProcess` offers the same interface from a process of its own.
    It keeps one worker's patient templates: one Engine per worker."""

    net: EcgNet
    version: str
    threshold: float
    # auto: each batch size served by the faster of TorchScript and ONNX Runtime, measured by
    # warm_up on this CPU (`models.onnx_pass`); or one of them for every size
    runtime: str = "auto"
    threads: int = 1
    runner: torch.jit.ScriptModule = field(init=False, repr=False)  # trace_repair(net)
    # the passes a batch may run on, by runtime name (numpy in, Repair out)
    passes: dict[str, Callable] = field(default_factory=dict, init=False, repr=False)
    chosen: dict[int, str] = field(default_factory=dict, init=False)  # padded rows -> runtime
    templates: TemplateStore = field(init=False, repr=False)  # by slot (the worker's registry)
    executor: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    # Beats/s of one pass at the largest batch, measured by warm_up on this machine's CPU:
    # what sizing should start from (the same network runs several times slower on some CPUs).
    throughput: float = field(default=0.0, init=False)

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"model.runtime must be one of {', '.join(RUNTIMES)}")
        self.runner = trace_repair(self.net)
        if self.runtime != "onnx":  # onnx: that one for every size, never the trace
            self.passes["torchscript"] = partial(repair, self.runner)
        if self.runtime != "torchscript":
            try:
                from models.onnx_pass import OnnxRepair

                self.passes["onnx"] = OnnxRepair(self.net, self.threads)
            except Exception as exc:  # noqa: BLE001 - auto: TorchScript alone still serves
                if self.runtime == "onnx":
                    raise
                log.warning("ONNX Runtime unavailable, serving with TorchScript only: %s", exc)
        self.templates = self.template.store(BEAT_LEN)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path = "",
        threads: int = 2,
        max_batch: int = WorkerConfig.max_batch,
        runtime: str = ModelConfig.runtime,
    ) -> Engine:
        """The checkpoint (empty: the packaged one), warmed up for batches up to max_batch."""
        torch.set_num_threads(threads)
        net, meta = load_checkpoint(checkpoint or DEFAULT_CHECKPOINT)
        engine = cls(net, meta["version"], float(meta["anomaly_threshold"]), runtime, threads)
        engine.warm_up(max_batch)
        return engine

    def describe_runtimes(self) -> str:
        """Which runtime serves which padded batch sizes, for the start-up log."""
        spans: list[list] = []
        for rows, name in sorted(self.chosen.items()):
            if spans and spans[-1][0] == name:
                spans[-1][2] = rows
            else:
                spans.append([name, rows, rows])
        return ", ".join(f"{name} {a}-{b}" if a != b else f"{name} {a}" for name, a, b in spans)

    @property
    def template(self) -> TemplateSpec:
        """How the model wants each patient's template built from earlier beats."""
        return self.net.config.template

    def serve(self, batch: ModelBatch) -> Repair | None:
        """A worker's batch: every beat's template from its patient's earlier beats (then the
        beat joins that history), and one pass over the recoverable rows (None if none)."""
        started = time.perf_counter()
        context = self.templates.advance_context(
            batch.slots,
            batch.beats,
            batch.missing,
            batch.lengths,
            batch.fresh,
        )
        rows = batch.recoverable
        if not len(rows):
            return None
        features = np.concatenate([batch.rhythm[rows], context.morph[rows]], axis=1)
        result = self.repair(
            batch.beats[rows],
            batch.missing[rows],
            context.template[rows],
            batch.lengths[rows],
            context.usual[rows],
            features,
        )
        result.seconds = time.perf_counter() - started
        return result

    def submit(self, batch: ModelBatch) -> Future:
        """`serve` on this engine's inference thread (batches run one at a time, in order),
        so the caller prepares the next batch meanwhile."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        return self.executor.submit(self.serve, batch)

    def repair(self, beats, missing, template, lengths, usual=None, context=None) -> Repair:
        """One pass of the served model over a batch (see `models.model.repair`), run at
        `padded_rows` rows (the padding rows are empty beats, dropped from the answer).
        `usual` and `context` default to unknown."""
        n = len(beats)
        usual = np.full(np.shape(beats), np.nan, np.float32) if usual is None else usual
        context = unknown_context(n) if context is None else context
        rows = padded_rows(n)
        run = self.passes[self.runtime_for(n)]
        if rows == n:
            return run(beats, missing, template, lengths, usual, context)
        extra = rows - n
        beats, missing, template, usual, context = (
            np.concatenate([a, np.zeros((extra, a.shape[1]), a.dtype)])
            for a in (beats, missing, template, usual, context)
        )
        lengths = np.concatenate([np.asarray(lengths), np.full(extra, beats.shape[1])])
        result = run(beats, missing, template, lengths, usual, context)
        return Repair(result.samples[:n], result.probabilities[:n], result.anomaly_score[:n])

    def runtime_for(self, n: int) -> str:
        """The runtime a pass of n beats runs on: the one warm_up chose for its padded size;
        beyond the sizes it measured, ONNX Runtime if it is the only one asked for."""
        default = "onnx" if self.runtime == "onnx" else "torchscript"
        return self.chosen.get(padded_rows(n), default)

    def warm_up(self, max_batch: int = WorkerConfig.max_batch) -> None:
        """Throwaway passes at every padded size up to max_batch, so no real batch pays for
        first-time initialisation (oneDNN kernels per batch shape, TorchScript's optimisation
        of the graph on its first calls, ONNX Runtime's buffers). Each runtime runs each size
        WARM_UP_PASSES times; their fastest passes decide which one serves that size
        (`chosen`, see `_faster`), and the chosen one's at the largest size gives
        `throughput`."""
        rng = np.random.default_rng(0)  # beat-like inputs: some kernels run faster on zeros
        for rows in sorted({padded_rows(n) for n in range(1, max_batch + 1)}):
            beats = rng.random((rows, BEAT_LEN), dtype=np.float32)
            missing = rng.random(beats.shape) < 0.15
            args = (beats, missing, beats, np.full(rows, BEAT_LEN), beats, unknown_context(rows))
            seconds = {}
            for name, run in self.passes.items():
                seconds[name] = min(_timed(run, args) for _ in range(WARM_UP_PASSES))
            self.chosen[rows] = _faster(seconds)
            self.throughput = rows / max(seconds[self.chosen[rows]], 1e-9)

    def close(self) -> None:
        """Stop the inference thread (batches not started yet are dropped)."""
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
            self.executor = None


WARM_UP_PASSES = 3
SWITCH_MARGIN = 0.05  # ONNX Runtime serves a size only where it is this much faster


def _faster(seconds: dict[str, float]) -> str:
    """The runtime to serve a batch size with, from each one's fastest warm-up pass: ONNX
    Runtime where it is clearly faster (the small batches), else TorchScript. At a near tie
    (the large batches, on the CPUs measured) noise alone would pick, and flip, the winner."""
    if "torchscript" not in seconds:
        return "onnx"
    onnx = seconds.get("onnx", float("inf"))
    return "onnx" if onnx < seconds["torchscript"] * (1 - SWITCH_MARGIN) else "torchscript"


def _timed(run: Callable, args: tuple) -> float:
    started = time.perf_counter()
    run(*args)
    return time.perf_counter() - started
