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
MORPH_FEATURES = (
    "morph_known",  # 1 once the patient has MIN_MORPH_HISTORY earlier beats to compare with
    "best_vs_usual",  # log(distance to the best-matching earlier beat / its running median)
    "mean_vs_usual",  # log(distance to the patient's mean beat / its running median)
    "mean_distance",  # RMS distance to the patient's mean beat (scaled-beat units)
)
N_MORPH = len(MORPH_FEATURES)
MIN_MORPH_HISTORY = 8
UNKNOWN_MORPH = np.zeros(N_MORPH, np.float32)


@dataclass
class Context:
    """What a patient's previous beats say about each beat of a batch."""

    template: np.ndarray  # (n, width) the template the network was trained with (NaN: unknown)
    usual: np.ndarray  # (n, width) the patient's usual beat: the mean of all its earlier beats
    morph: np.ndarray  # (n, N_MORPH) how unlike its patient's earlier beats the beat is


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
        return self.context_batch(beats, missing, lengths, groups).template

    def context_batch(self, beats: np.ndarray, missing: np.ndarray, lengths, groups) -> Context:
        """`batch` with the whole `Context` of every beat."""
        _, slots = np.unique(groups, return_inverse=True)
        return self.store(beats.shape[1]).advance_context(slots, beats, missing, lengths)


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
    # room for a worker's patients at full load (its `make bench` beats/s / 1.25 per patient;
    # README, Sizing) without a copy. Growing by copying stalled the model as a worker met its
    # patients (the copy takes longer the larger the store), and every batch behind it waited.
    INITIAL_SLOTS = 8192

    def __init__(self, spec: TemplateSpec, width: int, capacity: int = INITIAL_SLOTS):
        self.spec = spec
        self.width = width
        # per slot: the observed flags of its last k beats, then their values (contiguous)
        self.history = np.zeros((capacity, 2, spec.beats, width), np.float32)
        # per slot and previous beat: its squared distance to its best match and to the usual
        # beat when it arrived (NaN: none), the scale of "unlike" for this patient
        self.distances = np.full((capacity, 2, spec.beats), np.nan, np.float32)
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
        distances = np.full((capacity, *self.distances.shape[1:]), np.nan, np.float32)
        distances[: len(self.seen)] = self.distances
        self.distances = distances
        self.seen = np.concatenate([self.seen, np.zeros(capacity - len(self.seen), np.int64)])

    def advance(
        self, slots, beats: np.ndarray, missing: np.ndarray, lengths, fresh=()
    ) -> np.ndarray:
        """The template of each beat from its slot's previous beats (earlier rows of the same
        slot included), then remember the beats. Rows of one slot must be in time order.
        `fresh` slots (a new patient's, possibly reused) forget their history first."""
        return self.advance_context(slots, beats, missing, lengths, fresh).template

    def advance_context(
        self, slots, beats: np.ndarray, missing: np.ndarray, lengths, fresh=()
    ) -> Context:
        """`advance`, returning each beat's whole `Context`."""
        slots = np.asarray(slots, np.int64)
        if not len(slots):
            empty = np.empty((0, self.width), np.float32)
            return Context(empty, empty.copy(), np.empty((0, N_MORPH), np.float32))
        self._fit(int(slots.max()) + 1)
        fresh = np.asarray(fresh, np.int64)
        self.seen[fresh] = 0
        self.distances[fresh] = np.nan
        usable = ~missing
        if self.spec.matches:
            usable = usable & (np.arange(self.width) < np.asarray(lengths)[:, None])
        current = np.zeros((len(slots), 3, self.width), np.float32)
        current[:, 0] = usable
        np.copyto(current[:, 1], beats, where=usable)
        np.multiply(current[:, 1], current[:, 1], out=current[:, 2])
        out = Context(
            np.empty((len(slots), self.width), np.float32),
            np.empty((len(slots), self.width), np.float32),
            np.empty((len(slots), N_MORPH), np.float32),
        )
        k = self.spec.beats
        for rows in _rounds(slots):
            ids = slots[rows]
            position = self.seen[ids] % k
            out.template[rows], out.usual[rows], out.morph[rows], dist = self._templates(
                ids, current[rows]
            )
            self.history[ids, :, position] = current[rows, :2]
            self.distances[ids, :, position] = dist
            self.seen[ids] += 1
        return out

    def _templates(self, slots: np.ndarray, current: np.ndarray):
        """(template, usual beat, morph features, the beats' (best, mean) squared distances)
        for distinct slots; current: (n, 3, width) flags, values, squares."""
        n, k = len(slots), self.spec.beats
        history = self.history[slots]  # (n, 2, k, width)
        flags, values = history[:, 0], history[:, 1]
        valid = np.arange(k) < np.minimum(self.seen[slots], k)[:, None]
        usual = _weighted_mean(valid.astype(np.float32), None, flags, values)
        offset = np.zeros((n, k), np.float32)
        chosen = valid
        best_distance = np.full(n, np.nan, np.float32)
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
            best_distance = np.where(alone, np.nan, distance.min(1)).astype(np.float32)
        template = _weighted_mean(chosen.astype(np.float32), offset, flags, values)
        mean_distance = _offset_distance(current, usual)
        morph = self._morph(slots, best_distance, mean_distance, valid.sum(1))
        return template, usual, morph, np.stack([best_distance, mean_distance], 1)

    def _morph(self, slots, best: np.ndarray, mean: np.ndarray, held: np.ndarray) -> np.ndarray:
        """Morphology features: each distance against the patient's running median of it."""
        morph = np.zeros((len(slots), N_MORPH), np.float32)
        earlier = self.distances[slots]  # (n, 2, k)
        enough = (held >= MIN_MORPH_HISTORY) & np.isfinite(mean)
        if not enough.any():
            return morph
        scale = nanmedian_last(earlier[enough])  # (m, 2)
        current = np.stack([best[enough], mean[enough]], 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.log((current + 1e-6) / (scale + 1e-6))
        ratio = np.where(np.isfinite(ratio), np.clip(ratio, -4.0, 6.0), 0.0)
        morph[enough, 0] = 1.0
        morph[enough, 1:3] = ratio
        morph[enough, 3] = np.minimum(np.sqrt(mean[enough]), 1.0)
        return morph


def nanmedian_last(a: np.ndarray) -> np.ndarray:
    """`np.nanmedian(a, axis=-1)`, value for value, from one sort: numpy's own is ~6x slower
    on the short rows of a batch's distances. NaN sorts last, so the middle pair of a row's
    numbers sits at (count - 1) // 2 and count // 2 (one element when the count is odd); a
    row without numbers points at a NaN and stays NaN."""
    ordered = np.sort(a, axis=-1)
    count = (~np.isnan(a)).sum(-1, keepdims=True)
    lower = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, -1)[..., 0]
    upper = np.take_along_axis(ordered, np.minimum(count // 2, a.shape[-1] - 1), -1)[..., 0]
    return (lower + upper) / 2


def _weighted_mean(weights, offset, flags, values) -> np.ndarray:
    """Per row, the mean of the chosen previous beats (weights (n, k)), each shifted by its
    offset (None: unshifted), over the samples each observed; NaN where none did."""
    w = weights[:, None, :]
    total = (w @ values)[:, 0]
    if offset is not None:
        total = ((w * offset[:, None, :]) @ flags)[:, 0] + total
    observed = (w @ flags)[:, 0]
    mean = np.full(total.shape, np.nan, np.float32)
    return np.divide(total, observed, out=mean, where=observed > 0)


def _offset_distance(current: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean squared difference between each beat (current: flags, values, squares) and a
    reference beat over the samples both have, after removing a constant offset; NaN where
    they share fewer than MIN_OVERLAP samples."""
    both = (current[:, 0] > 0) & np.isfinite(reference)
    count = both.sum(1)
    diff = np.where(both, current[:, 1] - np.where(both, reference, 0.0), 0.0)
    shared = np.maximum(count, 1)
    offset = diff.sum(1) / shared
    squared = (diff * diff).sum(1) / shared - offset**2
    return np.where(count >= MIN_OVERLAP, np.maximum(squared, 0.0), np.nan).astype(np.float32)


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
