"""Synthetic beats for machines without MIT-BIH data and without network.

A sum of Gaussians (P, Q, R, S, T waves) with per-beat jitter, cut and scaled like the
canonical MIT-BIH beats. Clearly labelled: the records are called "synthetic-N" and the
demo says so. Only for trying the pipeline, never for evaluating the models.
"""

from __future__ import annotations

import numpy as np

from models import data as D

# (centre as a fraction of the RR interval after the R-peak, width in s, amplitude): this
# beat's R, S and T waves, then the next beat's P, Q and R (a beat runs to 1.2 x RR).
WAVES = (
    (0.0, 0.012, 1.0),
    (0.05, 0.015, -0.25),
    (0.35, 0.05, 0.3),
    (0.85, 0.03, 0.12),
    (0.97, 0.012, -0.15),
    (1.0, 0.012, 1.0),
)


def synthetic_beats(record: str, n: int = 2000, seed: int = 0) -> D.Beats:
    """n synthetic normal beats with RR around 0.8 s."""
    rng = np.random.default_rng(seed)
    rr = np.clip(rng.normal(0.8, 0.05, n), 0.5, 1.2)
    samples = np.zeros((n, D.BEAT_LEN), np.float32)
    lengths = np.minimum(np.round(1.2 * rr * D.FS_BEAT).astype(int), D.BEAT_LEN)
    for i in range(n):
        t = np.arange(lengths[i]) / D.FS_BEAT
        beat = sum(
            a * rng.uniform(0.9, 1.1) * np.exp(-((t - c * rr[i]) ** 2) / (2 * w**2))
            for c, w, a in WAVES
        )
        beat = beat + rng.normal(0, 0.01, len(t))
        samples[i, : lengths[i]] = (beat - beat.min()) / (beat.max() - beat.min())
    times = np.concatenate([[0.0], np.cumsum(rr[:-1])])
    return D.Beats(
        samples, lengths.astype(np.int16), np.zeros(n, np.int8), np.full(n, record), times
    )
