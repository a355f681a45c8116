"""Per-patient state kept by a worker for the partitions it owns.

A patient's beats all land in one partition, so the state is grouped by partition: when a
rebalance takes a partition away, its patients' state is dropped, and the next owner rebuilds
it from the partition's recent raw beats before it goes on (`Worker.warm_up`; counted in
`ecg_state_resets_total`). A patient's state is its
sequence and clock, its device session, its template slot and its rhythm
(`models.rhythm.RhythmState`: the previous R-peak time and the recent RR intervals).

A **device reset** (a reboot renumbers the beats) is recognised at its first beat: the beat
carries a new `session` id, or, without one, its seq drops far back (to at most half the last
seq, or `RESET_SEQ_DROP` below it) while its timestamp moves forward. The patient's sequence,
clock and rhythm then start afresh; its templates are kept (the same patient: the matched
template follows its beats within 40 beats if the morphology changed). A repeated seq that
does not drop that far, or whose timestamp does not move forward, is still a duplicate.

State is **bounded**: a patient with no beat for `patient_idle_s` is forgotten, and above
`max_patients` the least recently seen patient is evicted; either frees its template slot.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from models.rhythm import RhythmState
from stream.messages import InvalidMessage, RawBeat

RESET_SEQ_DROP = 100  # a seq this far below the last one, with time moving on: a device reset


@dataclass
class PatientState:
    last_seq: int
    last_timestamp: float
    slot: int  # the patient's previous beats in the registry's TemplateStore
    rhythm: RhythmState = field(default_factory=RhythmState)
    session: str | None = None


@dataclass
class Admitted:
    lost: int  # beats never received before this one
    slot: int  # the patient's template slot
    new: bool  # the patient's first beat here: its slot's old history must be forgotten
    rhythm: np.ndarray  # the beat's rhythm features (`models.rhythm.FEATURES`)
    rr_s: float | None  # pre-RR interval; None when unknown (first beat, after lost beats)
    heart_rate_bpm: float | None  # from the recent RR intervals; None before any is known
    reset: bool = False  # the first beat after a device reset


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
    """Sequence checks, device sessions and template slots for the patients of the assigned
    partitions (the template history itself lives beside the model:
    `stream.engine.Engine.serve`)."""

    def __init__(self, max_patients: int = 0, idle_s: float = 0.0, clock=time.monotonic):
        self.slots = SlotPool()
        self.partitions: dict[int, PartitionState] = {}
        self.max_patients = max_patients  # 0: no cap
        self.idle_s = idle_s  # 0: never forget an idle patient
        self.clock = clock
        self.seen: OrderedDict[tuple[int, str], float] = OrderedDict()  # least recent first

    def drop_partitions(self, partitions) -> int:
        """Forget the state of revoked partitions; returns how many had state."""
        dropped = [self.partitions.pop(p, None) for p in partitions]
        for partition, state in zip(partitions, dropped):
            if state is None:
                continue
            self.slots.release([patient.slot for patient in state.patients.values()])
            for patient_id in state.patients:
                self.seen.pop((partition, patient_id), None)
        return sum(state is not None for state in dropped)

    def patient_count(self) -> int:
        return sum(len(s.patients) for s in self.partitions.values())

    def admit(self, partition: int, beat: RawBeat) -> Admitted:
        """Check a beat against its patient's history and register it.

        Returns the beats lost before this one and the patient's template slot.
        Raises InvalidMessage for a repeated/out-of-order sequence number or a timestamp
        going back (a device reset is neither: see the module docstring).
        """
        patients = self.partitions.setdefault(partition, PartitionState()).patients
        state = patients.get(beat.patient_id)
        lost = 0
        new = state is None
        reset = not new and is_device_reset(state, beat)
        if new:
            state = PatientState(-1, -1.0, self.slots.take(), session=beat.session)
            patients[beat.patient_id] = state
        elif reset:
            state.last_seq, state.last_timestamp = -1, -1.0
            state.rhythm, state.session = RhythmState(), beat.session
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
            state.session = beat.session or state.session  # learnt once a device sends one
        state.last_seq, state.last_timestamp = beat.seq, beat.timestamp
        key = (partition, beat.patient_id)
        self.seen[key] = self.clock()
        self.seen.move_to_end(key)
        rhythm, rr = state.rhythm.observe(beat.timestamp, after_gap=lost > 0)
        hr = state.rhythm.heart_rate_bpm()
        return Admitted(lost, state.slot, new, rhythm, rr, hr, reset)

    def evict(self) -> list[tuple[int, str, str]]:
        """Forget idle patients and those above the cap (least recently seen first);
        returns (partition, patient_id, reason 'idle' or 'cap') of each."""
        now, evicted = self.clock(), []
        while self.seen:
            (partition, patient_id), at = next(iter(self.seen.items()))
            if self.max_patients and len(self.seen) > self.max_patients:
                reason = "cap"
            elif self.idle_s and now - at >= self.idle_s:
                reason = "idle"
            else:
                break
            del self.seen[(partition, patient_id)]
            state = self.partitions[partition].patients.pop(patient_id)
            self.slots.release([state.slot])
            evicted.append((partition, patient_id, reason))
        return evicted


def is_device_reset(state: PatientState, beat: RawBeat) -> bool:
    """A new session id, or a seq far below the last one while the clock moved on. A first
    session id from a device that sent none before is a reset only if the seq went back."""
    if beat.session is not None and beat.session != state.session:
        return state.session is not None or beat.seq <= state.last_seq
    if beat.session is not None:  # the same session: a repeated seq is a duplicate
        return False
    far_back = beat.seq <= state.last_seq // 2 or beat.seq <= state.last_seq - RESET_SEQ_DROP
    return far_back and beat.timestamp > state.last_timestamp


def pad(beats: list[RawBeat], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of beats zero-padded to the model width: samples (n, width) float32, missing
    (n, width) bool (padding counts as observed) and the received lengths (n,)."""
    samples = np.zeros((len(beats), width), np.float32)
    missing = np.zeros((len(beats), width), bool)
    lengths = np.array([len(b.samples) for b in beats])
    for i, (beat, n) in enumerate(zip(beats, lengths)):
        samples[i, :n], missing[i, :n] = beat.samples, beat.missing
    return samples, missing, lengths
