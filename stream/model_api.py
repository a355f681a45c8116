"""What the worker needs of the model, wherever it runs.

The model serves either in the worker's process (`stream.engine.Engine`, on an inference
thread) or in a process of its own (`stream.model_process.ModelProcess`); the worker and its
processor use both the same way, through this interface, and never import torch.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from models.batches import ModelBatch, Repair


class ServedModel(Protocol):
    """The served model as the worker sees it: its identity on every message, and batches
    handed over without waiting for the pass."""

    version: str  # stamped on every repaired beat, alert and event
    threshold: float  # the anomaly score above which a beat is flagged
    throughput: float  # beats/s of one pass at the largest batch, measured at start-up

    def submit(self, batch: ModelBatch) -> Future[Repair | None]:
        """Queue the batch (templates, then one pass over its recoverable rows); batches run
        one at a time in submission order, so the caller prepares the next one meanwhile."""
        ...
