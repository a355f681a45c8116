"""Simple gap fillers and the per-patient beat template, all vectorised numpy.

Conventions: `beats` is (n, L) float32, `missing` is (n, L) bool (True = missing). Fillers
return a copy in which only missing samples change.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import CubicSpline

TEMPLATE_BEATS = 20


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


def running_templates(
    beats: np.ndarray, missing: np.ndarray, groups: np.ndarray, k: int = TEMPLATE_BEATS
) -> np.ndarray:
    """Per-patient template of each beat from that patient's previous k beats only.

    Sample-wise mean of the *observed* values of the previous k beats in the same group
    (beats must be in time order within a group); NaN where none of them observed the sample
    (always for a patient's first beat). This is exactly what `TemplateTracker` computes in
    the stream.
    """
    out = np.zeros_like(beats, dtype=np.float32)
    observed = (~missing).astype(np.float64)
    values = np.where(missing, 0.0, beats).astype(np.float64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        csum = np.vstack([np.zeros((1, beats.shape[1])), np.cumsum(values[idx], axis=0)])
        ccnt = np.vstack([np.zeros((1, beats.shape[1])), np.cumsum(observed[idx], axis=0)])
        hi = np.arange(len(idx))
        lo = np.maximum(hi - k, 0)
        total, count = csum[hi] - csum[lo], ccnt[hi] - ccnt[lo]
        out[idx] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


class TemplateTracker:
    """One patient's running template over the last k beats, updated in O(L) per beat."""

    def __init__(self, width: int, k: int = TEMPLATE_BEATS):
        self.k = k
        self.values = np.zeros((k, width))
        self.observed = np.zeros((k, width))
        self.total = np.zeros(width)
        self.count = np.zeros(width)
        self.seen = 0

    def template(self) -> np.ndarray:
        """The template for the next beat (mean of observed values, NaN where none)."""
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan).astype(
            np.float32
        )

    def add(self, beat: np.ndarray, missing: np.ndarray) -> None:
        """Add a received beat (only its observed samples count)."""
        slot = self.seen % self.k
        obs = (~missing).astype(np.float64)
        vals = np.where(missing, 0.0, beat)
        self.total += vals - self.values[slot]
        self.count += obs - self.observed[slot]
        self.values[slot], self.observed[slot] = vals, obs
        self.seen += 1
