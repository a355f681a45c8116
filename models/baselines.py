"""Simple gap fillers, all vectorised (patient templates live in `models.templates`).

Conventions: `beats` is (n, L) float32, `missing` is (n, L) bool (True = missing). Fillers
return a copy in which only missing samples change.
"""

from __future__ import annotations

import numpy as np
import torch


def zero_fill(beats: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Missing samples set to 0."""
    return np.where(missing, 0.0, beats).astype(np.float32)


def linear_fill(beats: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Linear interpolation between the nearest observed neighbours (held flat at the edges)."""
    filled = linear_fill_tensor(torch.from_numpy(np.asarray(beats)), torch.from_numpy(missing))
    return filled.numpy().astype(np.float32)


def linear_fill_tensor(beats: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """`linear_fill` on tensors, in torch ops only, so that it runs inside the served repair
    pass (`models.model.RepairPass`, exported to ONNX)."""
    width = beats.shape[1]
    pos = torch.arange(width).expand_as(beats)
    prev, nxt = observed_neighbours(missing)
    has_prev, has_next = prev >= 0, nxt < width
    left = beats.gather(1, prev.clamp(0, width - 1))
    right = beats.gather(1, nxt.clamp(0, width - 1))
    frac = (pos - prev).to(beats.dtype) / (nxt - prev).clamp(min=1).to(beats.dtype)
    inner = left + (right - left) * frac
    filled = torch.where(has_prev & has_next, inner, torch.where(has_prev, left, right))
    filled = torch.where(has_prev | has_next, filled, torch.zeros_like(filled))
    return torch.where(missing, filled, beats)


def observed_neighbours(missing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev, next): per sample, the position of the nearest observed sample at or before it
    and at or after it (-1 and the width where there is none). Computed from the row's
    observed positions in order and a running count, not a running max, so that it exports to
    ONNX (which has no cumulative max)."""
    width = missing.shape[1]
    observed = ~missing
    pos = torch.arange(width).expand_as(missing)
    in_order = torch.argsort(torch.where(observed, pos, pos + width), dim=1)  # observed first
    through = torch.cumsum(observed.long(), 1)  # observed samples at or before each sample
    before = through - observed.long()  # ... strictly before it
    prev = torch.where(through > 0, in_order.gather(1, (through - 1).clamp(min=0)), -1)
    nxt = in_order.gather(1, before.clamp(max=width - 1))
    return prev, torch.where(before < through[:, -1:], nxt, width)


def spline_fill(beats: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Natural cubic spline through the observed samples (overshoots on long gaps).

    Gaps before the first or after the last observed sample are held flat, as in
    `linear_fill`: a cubic extrapolated past the data diverges and measures nothing.
    """
    from scipy.interpolate import CubicSpline  # here: the worker never loads scipy (40 MB)

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
