"""The model in this process: the loaded checkpoint, its traced serving pass and the template
history of the worker's patients."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.batches import ModelBatch, Repair
from models.config import DEFAULT_CHECKPOINT
from models.data import BEAT_LEN
from models.model import EcgNet, load_checkpoint, repair, trace_repair, unknown_context
from models.templates import TemplateSpec, TemplateStore
from stream.config import WorkerConfig


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
    runner: torch.jit.ScriptModule = field(init=False, repr=False)  # trace_repair(net)
    templates: TemplateStore = field(init=False, repr=False)  # by slot (the worker's registry)
    executor: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    # Beats/s of one pass at the largest batch, measured by warm_up on this machine's CPU:
    # what sizing should start from (the same network runs several times slower on some CPUs).
    throughput: float = field(default=0.0, init=False)

    def __post_init__(self):
        self.runner = trace_repair(self.net)
        self.templates = self.template.store(BEAT_LEN)

    @classmethod
    def load(
        cls, checkpoint: str | Path = "", threads: int = 2, max_batch: int = WorkerConfig.max_batch
    ) -> Engine:
        """The checkpoint (empty: the packaged one), warmed up for batches up to max_batch."""
        torch.set_num_threads(threads)
        net, meta = load_checkpoint(checkpoint or DEFAULT_CHECKPOINT)
        engine = cls(net, meta["version"], float(meta["anomaly_threshold"]))
        engine.warm_up(max_batch)
        return engine

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
        extra = padded_rows(n) - n
        if not extra:
            return repair(self.runner, beats, missing, template, lengths, usual, context)
        beats, missing, template, usual, context = (
            np.concatenate([a, np.zeros((extra, a.shape[1]), a.dtype)])
            for a in (beats, missing, template, usual, context)
        )
        lengths = np.concatenate([np.asarray(lengths), np.full(extra, beats.shape[1])])
        result = repair(self.runner, beats, missing, template, lengths, usual, context)
        return Repair(result.samples[:n], result.probabilities[:n], result.anomaly_score[:n])

    def warm_up(self, max_batch: int = WorkerConfig.max_batch) -> None:
        """Two throwaway passes at every padded size up to max_batch, so no real batch pays
        for first-time initialisation (oneDNN kernels per batch shape, TorchScript's
        optimisation of the graph on its first calls). The second pass at the largest size
        gives `throughput`."""
        for rows in sorted({padded_rows(n) for n in range(1, max_batch + 1)}):
            beats = np.zeros((rows, BEAT_LEN), np.float32)
            for _ in range(2):
                started = time.perf_counter()
                self.repair(beats, np.zeros_like(beats, bool), beats, np.full(rows, BEAT_LEN))
            self.throughput = rows / max(time.perf_counter() - started, 1e-9)

    def close(self) -> None:
        """Stop the inference thread (batches not started yet are dropped)."""
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
            self.executor = None
