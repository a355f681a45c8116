"""Per-patient beat templates: what a patient's previous beats say about a beat's gaps.

The checkpoint decides which kind its network was trained with (`TemplateSpec`):

- **mean**: the sample-wise mean of the observed values of the patient's previous k beats
  (padding counts as observed zeros). EcgNet <= 1.1.0 and the template baseline use it.
- **matched**: of the patient's previous k beats, the m that best match *this* beat's
  observed samples (least mean squared difference after removing a constant offset), each
  shifted by its offset and averaged sample-wise over the signal they observed. An ectopic
  beat so finds the patient's earlier ectopics instead of the mean of mostly normal beats.

Both only ever look at a patient's previous beats, exactly as a worker sees them in the
stream; NaN marks samples none of the chosen beats observed. `TemplateStore` keeps the
previous beats of many patients in one array and computes the templates of a whole batch in
a few array operations; training, evaluation and the worker all use it.
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

    def store(self, width: int) -> TemplateStore:
        """An empty store of this kind."""
        return TemplateStore(self, width)

    def batch(self, beats: np.ndarray, missing: np.ndarray, lengths, groups) -> np.ndarray:
        """The template of every beat from the previous beats of its group (beats in time
        order within a group), exactly as the stream computes them."""
        if not self.matches:
            return running_templates(beats, missing, groups, self.beats)
        _, slots = np.unique(groups, return_inverse=True)
        return self.store(beats.shape[1]).advance(slots, beats, missing, lengths)


def running_templates(
    beats: np.ndarray, missing: np.ndarray, groups: np.ndarray, k: int = TEMPLATE_BEATS
) -> np.ndarray:
    """Vectorised mean templates: per beat, the sample-wise mean of the observed values of
    the previous k beats in its group; NaN where none observed the sample (always for a
    group's first beat). A mean `TemplateStore` computes the same."""
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


class TemplateStore:
    """The last k beats of many patients (one slot each), in one ring-buffer array.

    Per previous beat it keeps the flags of the samples it observed and their values (60 KB
    per patient for k = 40); for a batch, one batched matrix product with the new beats'
    (flags, values, squared values) gives every overlap count, sum and cross term at once.
    A mean store counts padding as observed zeros; a matched store uses only the signal.
    """

    # np.zeros maps lazily zeroed pages, so a slot takes memory only once a patient uses it:
    # room for a worker's patients at full load (~5,800, see README sizing) without a copy.
    # Growing by copying stalled the model as a worker met its patients (512 -> 1,024 slots:
    # 66 ms, 1,024 -> 2,048: 144 ms), and every batch behind the copy waited.
    INITIAL_SLOTS = 8192

    def __init__(self, spec: TemplateSpec, width: int, capacity: int = INITIAL_SLOTS):
        self.spec = spec
        self.width = width
        # per slot: the observed flags of its last k beats, then their values (contiguous)
        self.history = np.zeros((capacity, 2, spec.beats, width), np.float32)
        self.seen = np.zeros(capacity, np.int64)

    def _fit(self, slots: int) -> None:
        """Room for slot numbers below `slots` (capacity doubles: few copies)."""
        capacity = len(self.seen)
        if slots <= capacity:
            return
        while capacity < slots:
            capacity *= 2
        grown = np.zeros((capacity, *self.history.shape[1:]), np.float32)
        grown[: len(self.seen)] = self.history
        self.history = grown
        self.seen = np.concatenate([self.seen, np.zeros(capacity - len(self.seen), np.int64)])

    def advance(
        self, slots, beats: np.ndarray, missing: np.ndarray, lengths, fresh=()
    ) -> np.ndarray:
        """The template of each beat from its slot's previous beats (earlier rows of the same
        slot included), then remember the beats. Rows of one slot must be in time order.
        `fresh` slots (a new patient's, possibly reused) forget their history first."""
        slots = np.asarray(slots, np.int64)
        if not len(slots):
            return np.empty((0, self.width), np.float32)
        self._fit(int(slots.max()) + 1)
        self.seen[np.asarray(fresh, np.int64)] = 0
        usable = ~missing
        if self.spec.matches:
            usable = usable & (np.arange(self.width) < np.asarray(lengths)[:, None])
        current = np.zeros((len(slots), 3, self.width), np.float32)
        current[:, 0] = usable
        np.copyto(current[:, 1], beats, where=usable)
        np.multiply(current[:, 1], current[:, 1], out=current[:, 2])
        out = np.empty((len(slots), self.width), np.float32)
        k = self.spec.beats
        for rows in _rounds(slots):
            ids = slots[rows]
            out[rows] = self._templates(ids, current[rows])
            self.history[ids, :, self.seen[ids] % k] = current[rows, :2]
            self.seen[ids] += 1
        return out

    def _templates(self, slots: np.ndarray, current: np.ndarray) -> np.ndarray:
        """Templates for distinct slots; current: (n, 3, width) flags, values, squares."""
        n, k = len(slots), self.spec.beats
        history = self.history[slots]  # (n, 2, k, width)
        flags, values = history[:, 0], history[:, 1]
        valid = np.arange(k) < np.minimum(self.seen[slots], k)[:, None]
        offset = np.zeros((n, k), np.float32)
        chosen = valid
        if self.spec.matches:
            # sums[i, a, j, b]: over the samples both observed, term a (flag, value) of
            # previous beat j times term b (flag, value, value**2) of beat i.
            sums = (history.reshape(n, 2 * k, -1) @ current.transpose(0, 2, 1)).reshape(n, 2, k, 3)
            count = np.maximum(sums[:, 0, :, 0], 1)
            offset = (sums[:, 0, :, 1] - sums[:, 1, :, 0]) / count
            eligible = valid & (sums[:, 0, :, 0] >= MIN_OVERLAP)
            # sum of (x - x_j)**2 over the overlap, then its mean after removing the offset
            prev_squares = ((values * values) @ current[:, 0, :, None])[..., 0]
            squared = sums[:, 0, :, 2] - 2 * sums[:, 1, :, 1] + prev_squares
            distance = np.where(eligible, squared / count - offset**2, np.inf)
            m = min(self.spec.matches, k)
            best = np.argpartition(distance, m - 1, axis=1)[:, :m]
            chosen = np.zeros((n, k), bool)
            np.put_along_axis(chosen, best, True, axis=1)
            chosen &= eligible
            # nothing overlaps enough (or no history): the plain mean of what there is
            alone = ~eligible.any(1)
            chosen[alone], offset[alone] = valid[alone], 0.0
        weights = chosen.astype(np.float32)[:, None, :]
        total = ((weights * offset[:, None, :]) @ flags + weights @ values)[:, 0]
        observed = (weights @ flags)[:, 0]
        template = np.full((n, self.width), np.nan, np.float32)
        return np.divide(total, observed, out=template, where=observed > 0)


def _rounds(slots: np.ndarray) -> list[np.ndarray]:
    """Row indices split into rounds in which every slot appears at most once: round r holds
    each slot's r-th row, so rounds run in order and keep each slot's rows in time order."""
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(slots)])
    occurrence = np.empty(len(slots), np.int64)
    occurrence[order] = np.arange(len(slots)) - np.repeat(starts, sizes)
    by_round = np.argsort(occurrence, kind="stable")
    bounds = np.searchsorted(occurrence[by_round], np.arange(1, occurrence.max() + 1))
    return np.split(by_round, bounds)
