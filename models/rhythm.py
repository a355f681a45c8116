"""A patient's rhythm: causal RR-interval features of each beat, one definition for all.

Training (from the annotated R-peak times of a record), evaluation and the stream worker
(from the beats' `timestamp`) all feed beats to `RhythmState.observe` in order, so the same
beats give the same features everywhere. Only earlier beats are used: the next beat would add
one RR interval of latency, and a stream does not have it yet.

The pre-RR interval of a beat is *unknown*, never guessed, when there is no valid previous
beat: a patient's first beat, the first beat after a state reset, a beat after a sequence gap
(lost beats: the interval would span them) and an interval outside (0, MAX_RR_S].
"""

from __future__ import annotations

import statistics
from collections import deque

import numpy as np

RR_HISTORY = 32  # known intervals kept per patient: the longer-term average
LOCAL_BEATS = 8  # the recent average (and the heart rate) uses the last this many
MAX_RR_S = 6.0  # a longer "interval" is a device or clock problem, not one RR
IRREGULAR_DELTA = 0.1  # successive intervals differing by > 10% of the median: irregular
PAUSE_RATIO = 1.5  # an interval this many times the median is a pause, not AF's irregularity
MIN_SHARE_INTERVALS = 8  # intervals (pauses left out) needed before the share is measured
FEATURES = (
    "rr_known",  # 1 when the pre-RR interval is known
    "pre_rr_s",  # the pre-RR interval in seconds (0 when unknown), clipped at 3 s
    "pre_rr_vs_local",  # pre-RR / mean of the previous LOCAL_BEATS intervals (1 when unknown)
    "pre_rr_vs_last",  # pre-RR / the previous interval (1 when unknown)
    "local_vs_long",  # recent average / the average of up to RR_HISTORY intervals
    "history",  # known intervals held / RR_HISTORY: how much the averages can be trusted
    "pre_rr_vs_long",  # pre-RR / the longer-term average (1 when unknown)
    "irregularity",  # mean |successive difference| of the recent intervals / their mean
    "irregular_share",  # the AF test's share of irregular intervals (`irregular_share`)
)
N_FEATURES = len(FEATURES)
UNKNOWN = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0], np.float32)


def irregular_steps(rr: list[float], delta: float) -> list[bool]:
    """For each successive pair of intervals: do they differ by more than delta of their
    median (the RR-irregularity of atrial fibrillation)."""
    scale = delta * statistics.median(rr)
    return [abs(b - a) > scale for a, b in zip(rr, rr[1:])]


def irregular_share(intervals) -> float:
    """Share of irregular successive intervals, pauses left out (0 with too few intervals).

    Atrial fibrillation is irregularly irregular: most successive intervals differ. A
    regular rhythm broken by pauses (sinus arrest, blocked beats) differs only around each
    pause, so intervals over PAUSE_RATIO x the median are left out before the test."""
    if len(intervals) < MIN_SHARE_INTERVALS:
        return 0.0
    longest = PAUSE_RATIO * statistics.median(intervals)
    usable = [rr for rr in intervals if rr <= longest]
    if len(usable) < MIN_SHARE_INTERVALS:
        return 0.0
    steps = irregular_steps(usable, IRREGULAR_DELTA)
    return sum(steps) / len(steps)


class RhythmState:
    """The rhythm history of one patient: the previous R-peak time and recent intervals."""

    __slots__ = ("last_time", "intervals")

    def __init__(self):
        self.last_time: float | None = None
        self.intervals: deque[float] = deque(maxlen=RR_HISTORY)

    def observe(self, time: float, after_gap: bool = False) -> tuple[np.ndarray, float | None]:
        """Features of the beat at R-peak `time` (seconds) from the beats before it, then
        remember it. `after_gap`: beats were lost just before this one. Returns (features,
        pre-RR in seconds or None when unknown)."""
        rr = None
        if self.last_time is not None and not after_gap:
            interval = time - self.last_time
            if 0.0 < interval <= MAX_RR_S:
                rr = interval
        self.last_time = time
        features = UNKNOWN.copy()
        held = len(self.intervals)
        if held:
            recent = list(self.intervals)[-LOCAL_BEATS:]
            local = sum(recent) / len(recent)
            long = sum(self.intervals) / held
            features[4] = local / long
            features[5] = held / RR_HISTORY
            if len(recent) > 1:
                steps = sum(abs(b - a) for a, b in zip(recent, recent[1:]))
                features[7] = steps / (len(recent) - 1) / local
            features[8] = irregular_share(self.intervals)
            if rr is not None:
                features[2] = rr / local
                features[3] = rr / self.intervals[-1]
                features[6] = rr / long
        if rr is not None:
            features[0] = 1.0
            features[1] = min(rr, 3.0)
            self.intervals.append(rr)
        return features, rr

    def heart_rate_bpm(self) -> float | None:
        """Beats per minute from the recent average interval (None before any is known)."""
        if not self.intervals:
            return None
        recent = list(self.intervals)[-LOCAL_BEATS:]
        return 60.0 * len(recent) / sum(recent)


def sequence_features(times: np.ndarray, after_gap: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(n, N_FEATURES) features of beats in time order through `RhythmState`, exactly as a
    worker computes them: `starts` marks where a patient's state begins afresh (a new
    record or a reset), `after_gap` the beats that follow lost beats."""
    out = np.empty((len(times), N_FEATURES), np.float32)
    state = RhythmState()
    for i, (t, gap, start) in enumerate(zip(times.tolist(), after_gap, starts, strict=True)):
        if start:
            state = RhythmState()
        out[i] = state.observe(t, bool(gap))[0]
    return out
