"""Virtual patients replaying MIT-BIH records, and the dropout applied to their beats.

Patient i replays record i mod R, starting (i div R) x 997 beats into it, so any number of
patients can share the 48 records without sending identical streams at the same moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import data as D
from models import masks
from simulator.synthetic import synthetic_beats
from stream.config import DropoutConfig

OFFSET_BEATS = 997


@dataclass
class SimBeat:
    """One beat as the patient's device would send it, plus its ground truth."""

    patient_id: str
    seq: int
    samples: np.ndarray  # signal-bearing part only (no padding), possibly noisy
    clean: np.ndarray  # the same samples before noise and dropout
    missing: np.ndarray  # bool, True = not received
    label: str
    lost: bool  # the whole beat never leaves the device
    record: str
    beat_index: int
    rr_s: float  # time to the next beat in the record, seconds


class Patient:
    """A virtual patient cycling through one record's beats."""

    def __init__(self, index: int, beats: D.Beats, record: str, offset: int):
        self.patient_id = f"p{index:05d}"
        self.beats = beats
        self.record = record
        self.position = offset % len(beats)
        self.seq = 0

    def next_beat(self) -> tuple[int, float]:
        """(beat index, seconds until the following beat) and advance."""
        i = self.position
        self.position = (i + 1) % len(self.beats)
        gap = self.beats.time[self.position] - self.beats.time[i]
        return i, float(gap if gap > 0 else 0.8)


def build_patients(n: int, records: list[str], data_dir: Path | None) -> list[Patient]:
    """n virtual patients over the given records (beats loaded once per record).

    Without a data directory the records are synthetic (see simulator.synthetic).
    """
    if data_dir is None:
        by_record = {r: synthetic_beats(r, seed=i) for i, r in enumerate(records)}
    else:
        by_record = {r: D.load_beats([r], data_dir) for r in records}
    return [
        Patient(
            i,
            by_record[records[i % len(records)]],
            records[i % len(records)],
            (i // len(records)) * OFFSET_BEATS,
        )
        for i in range(n)
    ]


class Dropout:
    """The configured mix of dropout models, each applied independently, plus noise."""

    def __init__(self, cfg: DropoutConfig, rng: np.random.Generator, noise: np.ndarray | None):
        self.cfg = cfg
        self.rng = rng
        self.noise = noise

    def missing(self, length: int) -> np.ndarray:
        """The union of the dropout models that fire for this beat."""
        c, rng = self.cfg, self.rng
        out = np.zeros(length, bool)
        if rng.random() < c.block_prob:
            out |= masks.block(length, length)
        if rng.random() < c.gap_prob:
            out |= masks.contiguous_gap(rng, length, length, c.gap_min, c.gap_max)
        if rng.random() < c.burst_prob:
            out |= masks.bursty(rng, length, length, c.burst_enter, c.burst_leave)
        if rng.random() < c.drop_prob:
            out |= masks.sample_drops(rng, length, length, c.drop_rate)
        if out.all():  # keep at least one sample: a beat with nothing is a lost beat
            out[0] = False
        return out

    def lost(self) -> bool:
        return bool(self.rng.random() < self.cfg.lost_beat_prob)

    def add_noise(self, samples: np.ndarray) -> np.ndarray:
        """Noise from an nstdb record added at the configured SNR (dB)."""
        if self.noise is None or len(samples) < 2:
            return samples
        start = int(self.rng.integers(0, len(self.noise) - len(samples)))
        piece = self.noise[start : start + len(samples)]
        piece = piece - piece.mean()
        signal_power = float(np.var(samples)) or 1e-6
        noise_power = float(np.mean(piece**2)) or 1e-6
        scale = np.sqrt(signal_power / (noise_power * 10 ** (self.cfg.noise_snr_db / 10)))
        return (samples + scale * piece).astype(np.float32)

    def apply(self, patient: Patient, index: int, rr_s: float) -> SimBeat:
        """Turn the patient's beat `index` into what the device sends."""
        beats = patient.beats
        clean = beats.samples[index, : beats.length[index]]
        beat = SimBeat(
            patient.patient_id,
            patient.seq,
            self.add_noise(clean),
            clean,
            self.missing(len(clean)),
            D.AAMI_CLASSES[beats.label[index]],
            self.lost(),
            patient.record,
            int(index),
            rr_s,
        )
        patient.seq += 1
        return beat
