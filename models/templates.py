"""Per-patient beat templates: what a patient's previous beats say about a beat's gaps.

The checkpoint decides which kind its network was trained with (`TemplateSpec`):

- **mean**: the sample-wise mean of the observed values of the patient's previous k beats
  (padding counts as observed zeros). EcgNet <= 1.1.0 and the template baseline use it.
- **matched**: of the patient's previous k beats, the m that best match *this* beat's
  observed samples (least mean squared difference after removing a constant offset), each
  shifted by its offset and averaged sample-wise over the signal they observed. An ectopic
  beat so finds the patient's earlier ectopics instead of the mean of mostly normal beats.

Both only ever look at a patient's previous beats, exactly as a worker sees them in the
stream; NaN marks samples none of the chosen beats observed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEMPLATE_BEATS = 20
MIN_OVERLAP = 16  # samples both beats observed before a previous beat counts as a match


@dataclass(frozen=True)
class TemplateSpec:
    beats: int = TEMPLATE_BEATS  # previous beats of a patient kept
    matches: int = 0  # 0: mean template; m > 0: matched template of the m best matches

    def tracker(self, width: int) -> MeanTemplate | MatchedTemplate:
        """A fresh per-patient tracker of this kind."""
        if self.matches:
            return MatchedTemplate(width, self.beats, self.matches)
        return MeanTemplate(width, self.beats)

    def batch(self, beats: np.ndarray, missing: np.ndarray, lengths, groups) -> np.ndarray:
        """The template of every beat from the previous beats of its group (beats in time
        order within a group), exactly as the stream's trackers compute them."""
        if not self.matches:
            return running_templates(beats, missing, groups, self.beats)
        out = np.empty(beats.shape, np.float32)
        for g in np.unique(groups):
            tracker = self.tracker(beats.shape[1])
            for i in np.flatnonzero(groups == g):
                out[i] = tracker.advance(beats[i], missing[i], int(lengths[i]))
        return out


def running_templates(
    beats: np.ndarray, missing: np.ndarray, groups: np.ndarray, k: int = TEMPLATE_BEATS
) -> np.ndarray:
    """Vectorised mean templates: per beat, the sample-wise mean of the observed values of
    the previous k beats in its group; NaN where none observed the sample (always for a
    group's first beat). `MeanTemplate` computes the same, one beat at a time."""
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


class MeanTemplate:
    """One patient's mean template over the last k beats, updated in O(L) per beat."""

    def __init__(self, width: int, k: int = TEMPLATE_BEATS):
        self.k = k
        self.values = np.zeros((k, width))
        self.observed = np.zeros((k, width))
        self.total = np.zeros(width)
        self.count = np.zeros(width)
        self.seen = 0

    def advance(self, beat: np.ndarray, missing: np.ndarray, length: int) -> np.ndarray:
        """The template for this beat (from the previous ones), then remember the beat."""
        template = np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)
        slot = self.seen % self.k
        obs = (~missing).astype(np.float64)
        vals = np.where(missing, 0.0, beat)
        self.total += vals - self.values[slot]
        self.count += obs - self.observed[slot]
        self.values[slot], self.observed[slot] = vals, obs
        self.seen += 1
        return template.astype(np.float32)


class MatchedTemplate:
    """One patient's matched template over the last k beats.

    A ring buffer holds, per previous beat, its observed-signal flags, values and squared
    values; one matrix product with the new beat's (flags, values, squares) gives every
    overlap count, sum and sum of squared differences at once, so a beat costs O(k L).
    """

    def __init__(self, width: int, k: int, matches: int):
        self.matches = matches
        self.history = np.zeros((k, 3, width), np.float32)  # per beat: flag, value, value**2
        self.current = np.zeros((3, width), np.float32)
        self.weights = np.zeros((k, 3), np.float32)
        self.positions = np.arange(width)
        self.seen = 0

    def advance(self, beat: np.ndarray, missing: np.ndarray, length: int) -> np.ndarray:
        """The template for this beat (from the previous ones), then remember the beat."""
        usable = self.positions < length
        usable &= ~missing
        flags, values, squares = self.current
        flags[:] = usable
        values[:] = 0.0
        np.copyto(values, beat, where=usable)
        np.multiply(values, values, out=squares)
        template = self._match()
        self.history[self.seen % len(self.history)] = self.current
        self.seen += 1
        return template

    def _match(self) -> np.ndarray:
        n = min(self.seen, len(self.history))
        if n == 0:
            return np.full(self.current.shape[1], np.nan, np.float32)
        history = self.history[:n].reshape(3 * n, -1)
        # sums[j, a, b]: over the samples both observed, the sum of term a (flag, value,
        # square) of previous beat j times term b of this beat.
        sums = (history @ self.current.T).reshape(n, 3, 3)
        count = sums[:, 0, 0]
        offset = (sums[:, 0, 1] - sums[:, 1, 0]) / np.maximum(count, 1)
        eligible = count >= MIN_OVERLAP
        chosen = np.zeros(n, np.float32)
        if eligible.sum() > self.matches:
            squared = sums[:, 0, 2] - 2 * sums[:, 1, 1] + sums[:, 2, 0]  # sum of (x - x_j)**2
            distance = np.where(eligible, squared / np.maximum(count, 1) - offset**2, np.inf)
            chosen[np.argpartition(distance, self.matches - 1)[: self.matches]] = 1.0
        elif eligible.any():
            chosen[eligible] = 1.0
        else:  # nothing overlaps enough (or no history): the plain mean of what there is
            chosen[:], offset = 1.0, np.zeros(n, np.float32)
        weights = self.weights[:n]  # the zero third column skips the squares
        weights[:, 0], weights[:, 1] = chosen * offset, chosen
        total = weights.reshape(-1) @ history
        observed = chosen @ self.history[:n, 0]
        template = np.full_like(total, np.nan)
        return np.divide(total, observed, out=template, where=observed > 0)
