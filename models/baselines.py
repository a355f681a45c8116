"""Simple gap fillers, all vectorised numpy (patient templates live in `models.templates`).

Conventions: `beats` is (n, L) float32, `missing` is (n, L) bool (True = missing). Fillers
return a copy in which only missing samples change.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import CubicSpline


def zero_fill(beats: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Missing samples set to 0."""
    return np.where(missing, 0.0, beats).astype(np.float32)


def linear_fill(beats: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Linear interpolation between the nearest observed neighbours (held flat at the edges)."""
    n, width = beats.shape
    pos = np.broadcast_to(np.arange(width), (n, width))
    observed = ~missing
    prev = np.maximum.accumulate(np.where(observed, pos, -1), axis=1)
    nxt = np.minimum.accumulate(np.where(observed, pos, width)[:, ::-1], axis=1)[:, ::-1]
    has_prev, has_next = prev >= 0, nxt < width
    rows = np.arange(n)[:, None]
    left = beats[rows, np.clip(prev, 0, width - 1)]
    right = beats[rows, np.clip(nxt, 0, width - 1)]
    span = np.maximum(nxt - prev, 1)
    frac = (pos - prev) / span
    inner = left + (right - left) * frac
    filled = np.where(has_prev & has_next, inner, np.where(has_prev, left, right))
    filled = np.where(has_prev | has_next, filled, 0.0)
    return np.where(missing, filled, beats).astype(np.float32)


def spline_fill(beats: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Natural cubic spline through the observed samples (overshoots on long gaps).

    Gaps before the first or after the last observed sample are held flat, as in
    `linear_fill`: a cubic extrapolated past the data diverges and measures nothing.
    """
    out = linear_fill(beats, missing)
    positions = np.arange(beats.shape[1])
    for i in np.flatnonzero(missing.any(1)):
        obs = ~missing[i]
        if obs.sum() >= 4:
            spline = CubicSpline(
                positions[obs], beats[i, obs], bc_type="natural", extrapolate=False
            )
            values = spline(positions[missing[i]])
            out[i, missing[i]] = np.where(np.isnan(values), out[i, missing[i]], values)
    return out


def template_fill(beats: np.ndarray, missing: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Missing samples taken from the patient's template (mean of recent beats); where the
    template has no data (NaN) they are linearly interpolated instead."""
    known = np.where(np.isnan(template), linear_fill(beats, missing), template)
    return np.where(missing, known, beats).astype(np.float32)
