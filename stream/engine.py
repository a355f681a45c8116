"""The model in this process: the loaded checkpoint, its traced serving pass and the template
history of the worker's patients."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import models
from models.batches import ModelBatch, Repair
from models.data import BEAT_LEN
from models.model import EcgNet, load_checkpoint, repair, trace_repair
from models.templates import TemplateSpec, TemplateStore

DEFAULT_CHECKPOINT = Path(models.__file__).parent / "weights" / "ecgnet-ds1.pt"


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

    def __post_init__(self):
        self.runner = trace_repair(self.net)
        self.templates = self.template.store(BEAT_LEN)

    @classmethod
    def load(cls, checkpoint: str | Path = "", threads: int = 2) -> Engine:
        torch.set_num_threads(threads)
        net, meta = load_checkpoint(checkpoint or DEFAULT_CHECKPOINT)
        engine = cls(net, meta["version"], float(meta["anomaly_threshold"]))
        engine.warm_up()
        return engine

    @property
    def template(self) -> TemplateSpec:
        """How the model wants each patient's template built from earlier beats."""
        return self.net.config.template

    def serve(self, batch: ModelBatch) -> Repair | None:
        """A worker's batch: every beat's template from its patient's earlier beats (then the
        beat joins that history), and one pass over the recoverable rows (None if none)."""
        started = time.perf_counter()
        templates = self.templates.advance(
            batch.slots, batch.beats, batch.missing, batch.lengths, batch.fresh
        )
        rows = batch.recoverable
        if not len(rows):
            return None
        result = self.repair(
            batch.beats[rows], batch.missing[rows], templates[rows], batch.lengths[rows]
        )
        result.seconds = time.perf_counter() - started
        return result

    def submit(self, batch: ModelBatch) -> Future:
        """`serve` on this engine's inference thread (batches run one at a time, in order),
        so the caller prepares the next batch meanwhile."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        return self.executor.submit(self.serve, batch)

    def repair(self, beats, missing, template, lengths) -> Repair:
        """One pass of the served model over a batch (see `models.model.repair`)."""
        return repair(self.runner, beats, missing, template, lengths)

    def warm_up(self) -> None:
        """Throwaway passes, so the first real batches do not pay for lazy initialisation
        (TorchScript optimises a graph on its first calls)."""
        beats = np.zeros((8, BEAT_LEN), np.float32)
        for _ in range(3):
            self.repair(beats, np.zeros_like(beats, bool), beats, np.full(8, BEAT_LEN))

    def close(self) -> None:
        """Stop the inference thread (batches not started yet are dropped)."""
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
            self.executor = None
