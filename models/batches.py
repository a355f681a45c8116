"""A batch as the served model takes it and what it returns: plain numpy, so that a process
without torch (the worker's Kafka I/O side) can build and read them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ModelBatch:
    """A worker's micro-batch: every admitted beat, in arrival order.

    Each beat joins its patient's template history (held beside the model, per slot); only
    the `recoverable` rows go through the network."""

    slots: np.ndarray  # (n,) int: the patient's history slot of each beat
    fresh: list[int]  # slots given to a new patient since the last batch: history cleared first
    beats: np.ndarray  # (n, width) float32, zero-padded
    missing: np.ndarray  # (n, width) bool, padding counts as observed
    lengths: np.ndarray  # (n,) received samples per beat
    recoverable: np.ndarray  # row indices to repair (the others are too incomplete)
    rhythm: np.ndarray  # (n, models.rhythm.N_FEATURES) each beat's rhythm features


@dataclass
class Repair:
    """Outputs of one vectorised pass over a batch of beats."""

    samples: np.ndarray  # (B, L) observed samples unchanged, missing ones filled
    probabilities: np.ndarray  # (B, n_classes)
    anomaly_score: np.ndarray  # (B,) reconstruction MSE over observed signal samples
    seconds: float = 0.0  # model time of the batch it answers (templates and the pass)
