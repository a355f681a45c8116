"""What one served pass over a batch returns (plain numpy: no torch needed to read it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Repair:
    """Outputs of one vectorised pass over a batch of beats."""

    samples: np.ndarray  # (B, L) observed samples unchanged, missing ones filled
    probabilities: np.ndarray  # (B, n_classes)
    anomaly_score: np.ndarray  # (B,) reconstruction MSE over observed signal samples
