"""Per-patient state kept by a worker for the partitions it owns.

A patient's beats all land in one partition, so the state is grouped by partition: when a
rebalance takes a partition away, its patients' state is dropped, and the next owner rebuilds
it from the beats that follow (counted in `ecg_state_resets_total`). A patient's state is its
sequence and clock, its template slot and its rhythm (`models.rhythm.RhythmState`: the
previous R-peak time and the recent RR intervals), dropped and rebuilt together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.rhythm import RhythmState
from stream.messages import InvalidMessage, RawBeat


@dataclass
class PatientState:
    last_seq: int
    last_timestamp: float
    slot: int  # the patient's previous beats in the registry's TemplateStore
    rhythm: RhythmState = field(default_factory=RhythmState)


@dataclass
class Admitted:
    lost: int  # beats never received before this one
    slot: int  # the patient's template slot
    new: bool  # the patient's first beat here: its slot's old history must be forgotten
    rhythm: np.ndarray  # the beat's rhythm features (`models.rhythm.FEATURES`)
    rr_s: float | None  # pre-RR interval; None when unknown (first beat, after lost beats)
    heart_rate_bpm: float | None  # from the recent RR intervals; None before any is known


@dataclass
class PartitionState:
    patients: dict[str, PatientState] = field(default_factory=dict)


class SlotPool:
    """Numbers for the patients' template slots: released numbers are reused first, so the
    history store beside the model stays as large as the most patients held at once."""

    def __init__(self):
        self.free: list[int] = []
        self.size = 0

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        self.size += 1
        return self.size - 1

    def release(self, slots) -> None:
        self.free.extend(slots)


class PatientRegistry:
    """Sequence checks and template slots for the patients of the assigned partitions (the
    template history itself lives beside the model: `stream.engine.Engine.serve`)."""

    def __init__(self):
        self.slots = SlotPool()
        self.partitions: dict[int, PartitionState] = {}

    def drop_partitions(self, partitions) -> int:
        """Forget the state of revoked partitions; returns how many had state."""
        dropped = [self.partitions.pop(p, None) for p in partitions]
        for state in filter(None, dropped):
            self.slots.release([patient.slot for patient in state.patients.values()])
        return sum(state is not None for state in dropped)

    def patient_count(self) -> int:
        return sum(len(s.patients) for s in self.partitions.values())

    def admit(self, partition: int, beat: RawBeat) -> Admitted:
        """Check a beat against its patient's history and register it.

        Returns the beats lost before this one and the patient's template slot.
        Raises InvalidMessage for a repeated/out-of-order sequence number or a timestamp
        going back.
        """
        patients = self.partitions.setdefault(partition, PartitionState()).patients
        state = patients.get(beat.patient_id)
        lost = 0
        new = state is None
        if new:
            state = PatientState(-1, -1.0, self.slots.take())
            patients[beat.patient_id] = state
        else:
            if beat.seq <= state.last_seq:
                raise InvalidMessage(
                    "duplicate_seq",
                    f"seq {beat.seq} <= last seq {state.last_seq} of patient {beat.patient_id}",
                )
            if beat.timestamp <= state.last_timestamp:
                raise InvalidMessage(
                    "non_monotonic_timestamp",
                    f"timestamp {beat.timestamp} <= previous "
                    f"{state.last_timestamp} of patient {beat.patient_id}",
                )
            lost = beat.seq - state.last_seq - 1
        state.last_seq, state.last_timestamp = beat.seq, beat.timestamp
        rhythm, rr = state.rhythm.observe(beat.timestamp, after_gap=lost > 0)
        return Admitted(lost, state.slot, new, rhythm, rr, state.rhythm.heart_rate_bpm())


def pad(beats: list[RawBeat], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of beats zero-padded to the model width: samples (n, width) float32, missing
    (n, width) bool (padding counts as observed) and the received lengths (n,)."""
    samples = np.zeros((len(beats), width), np.float32)
    missing = np.zeros((len(beats), width), bool)
    lengths = np.array([len(b.samples) for b in beats])
    for i, (beat, n) in enumerate(zip(beats, lengths)):
        samples[i, :n], missing[i, :n] = beat.samples, beat.missing
    return samples, missing, lengths
