"""The model in this process: the loaded checkpoint and its traced serving pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import models
from models.data import BEAT_LEN
from models.model import EcgNet, load_checkpoint, repair, trace_repair
from models.outputs import Repair
from models.templates import TemplateSpec

DEFAULT_CHECKPOINT = Path(models.__file__).parent / "weights" / "ecgnet-ds1.pt"


@dataclass
class Engine:
    """The loaded model, its traced serving pass and what the stream needs to know about it.
    `stream.model_process.ModelProcess` offers the same interface from a process of its own."""

    net: EcgNet
    version: str
    threshold: float
    runner: torch.jit.ScriptModule = field(init=False, repr=False)  # trace_repair(net)

    def __post_init__(self):
        self.runner = trace_repair(self.net)

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
        """Nothing to release in-process (symmetry with ModelProcess)."""
