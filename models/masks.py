"""Dropout models: which samples of a beat go missing. Used for training, evaluation and the
simulator alike, so that the stream sees the same kinds of loss the models were trained on.

Every function returns a boolean array, True where a sample is missing, and only ever marks
samples inside the signal-bearing part of a beat (`length`).
"""

from __future__ import annotations

import numpy as np

REFERENCE_BLOCK = (100, 138)  # the reference notebook zeroes samples 100-137


def block(length: int, width: int, start: int = REFERENCE_BLOCK[0], stop: int = REFERENCE_BLOCK[1]):
    """A fixed block of samples [start, stop), clipped to the signal."""
    missing = np.zeros(width, bool)
    missing[start : min(stop, length)] = True
    return missing


def contiguous_gap(rng, length: int, width: int, min_frac=0.05, max_frac=0.40):
    """One contiguous gap covering a random 5-40% (by default) of the signal."""
    missing = np.zeros(width, bool)
    if length < 3:
        return missing
    size = max(1, int(round(rng.uniform(min_frac, max_frac) * length)))
    start = int(rng.integers(0, length - size + 1))
    missing[start : start + size] = True
    return missing


def bursty(rng, length: int, width: int, p_enter=0.02, p_leave=0.15, packet=5):
    """Gilbert-Elliott packet loss: packets of `packet` samples, a two-state Markov chain.

    In the bad state every packet is lost; `p_enter` and `p_leave` are the per-packet
    probabilities of entering and leaving it (mean burst = 1 / p_leave packets).
    """
    missing = np.zeros(width, bool)
    n_packets = -(-length // packet)
    bad = rng.random() < p_enter / (p_enter + p_leave)  # start in the stationary distribution
    draws = rng.random(n_packets)
    for k in range(n_packets):
        if bad:
            missing[k * packet : min((k + 1) * packet, length)] = True
        bad = draws[k] >= p_leave if bad else draws[k] < p_enter
    return missing


def sample_drops(rng, length: int, width: int, p=0.05):
    """Independent drops of single samples with probability p."""
    missing = np.zeros(width, bool)
    missing[:length] = rng.random(length) < p
    return missing


def training_mask(rng, length: int, width: int):
    """A random mask from the mix used in training: gaps, the block, bursts, drops, or none."""
    kind = rng.random()
    if kind < 0.45:
        missing = contiguous_gap(rng, length, width)
    elif kind < 0.55:
        missing = block(length, width)
    elif kind < 0.70:
        missing = bursty(rng, length, width, p_enter=rng.uniform(0.02, 0.1))
    elif kind < 0.80:
        missing = sample_drops(rng, length, width, p=rng.uniform(0.01, 0.2))
    elif kind < 0.92:
        missing = contiguous_gap(rng, length, width) | sample_drops(rng, length, width, p=0.03)
    else:
        missing = np.zeros(width, bool)
    return missing


def mask_batch(fn, rng, lengths, width: int) -> np.ndarray:
    """Apply a per-beat mask function to every beat: (n, width) bool, True = missing."""
    return (
        np.stack([fn(rng, int(n), width) for n in lengths])
        if len(lengths)
        else np.zeros((0, width), bool)
    )
