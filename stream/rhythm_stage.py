"""The worker's rhythm stage: each patient's episodes from its classified beats, and the
changelog that lets the next owner of a partition go on where this one stopped.

It runs inside the worker, right after the model pass, rather than as its own consumer group
on the repaired topic: a patient's beats already arrive here in order, on one partition, with
their classes just computed; a second group would re-read and decode every repaired beat
(~4 KB) for four of its fields, add a hop of latency, and be one more deployment to scale and
watch. It scales with the workers, by partition.

State survives restarts and rebalances through a compacted changelog topic
(`topics.rhythm_state`, key = patient, written to the partition number of the raw partition
the patient's beats come from, so both topics need the same partition count). After each
batch the worker writes the state of the patients it changed, in the same publish as the
batch's outputs and before it commits the batch's offsets; a patient with something in
progress (an open episode, a run, a V in its last cycles) is written after every batch, a
quiet one at most every `worker.snapshot_interval_s` of its own time. A partition's new owner
reads its changelog to the end before processing the partition; beats the snapshot already
holds (a replay of a batch published but not committed) change nothing, so an episode is
neither lost nor opened twice. Events are delivered at least once: de-duplicate by event_id.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import orjson

from models.episodes import EPISODE_TYPES, SEVERITY, Beat, Event, PatientRhythm
from stream import messages
from stream.config import Config
from stream.metrics import WorkerMetrics

STATE_VERSION = 1  # of the changelog records (internal: read only by workers)
log = logging.getLogger(__name__)


class RhythmStage:
    """Rhythm state of the patients of the assigned partitions."""

    def __init__(self, cfg: Config, metrics: WorkerMetrics, model_version: str, worker_id: str):
        self.cfg, self.metrics = cfg, metrics
        self.model_version, self.worker_id = model_version, worker_id  # stamped on every event
        self.partitions: dict[int, dict[str, PatientRhythm]] = {}
        self.arrived: dict[tuple[int, str], float] = {}  # last beat received, monotonic
        self.snapshot_at: dict[str, float] = {}  # patient time of its last snapshot
        self.touched: set[tuple[int, str]] = set()
        self.open_gauges = {t: metrics.episodes_open.labels(t) for t in EPISODE_TYPES}
        self.started = {t: metrics.episodes_started.labels(t) for t in EPISODE_TYPES}

    def arrival(self, partition: int, patient_id: str) -> None:
        """A beat of the patient was received (it may still be in the model)."""
        self.arrived[(partition, patient_id)] = time.monotonic()

    def observe(self, partition: int, patient_id: str, beat: Beat, out) -> None:
        """Feed one beat; its events go into `out.messages`, its counts into `out.counts`."""
        patients = self.partitions.setdefault(partition, {})
        rhythm = patients.get(patient_id)
        if rhythm is None:
            rhythm = patients[patient_id] = PatientRhythm(patient_id, self.cfg.episodes)
        previous_seq, previous_time = rhythm.last_seq, rhythm.last_time
        self._publish(rhythm, rhythm.observe(beat), out)
        if previous_seq is not None and beat.seq == previous_seq + 1:
            out.counts[self.metrics.patient_seconds] += max(0.0, beat.time - previous_time)
        self.touched.add((partition, patient_id))

    def reset(self, partition: int, patient_id: str, out) -> None:
        """A device reset: close the patient's open episodes and start it afresh."""
        patients = self.partitions.setdefault(partition, {})
        old = patients.get(patient_id)
        if old is not None:
            self._publish(old, old.close_all("device_reset"), out)
        patients[patient_id] = PatientRhythm(patient_id, self.cfg.episodes)
        self.touched.add((partition, patient_id))

    def forget(self, partition: int, patient_id: str, out) -> None:
        """An evicted patient: drop its state here and in the changelog (a tombstone)."""
        rhythm = self.partitions.get(partition, {}).pop(patient_id, None)
        if rhythm is not None:
            self._gauge_open(rhythm, -1)
        self.arrived.pop((partition, patient_id), None)
        self.snapshot_at.pop(patient_id, None)
        self.touched.discard((partition, patient_id))
        out.state.append((partition, patient_id.encode(), None))

    def snapshots(self, out) -> None:
        """Changelog records of the patients changed since the last call (see the module)."""
        every = self.cfg.worker.snapshot_interval_s
        for partition, patient_id in self.touched:
            rhythm = self.partitions.get(partition, {}).get(patient_id)
            if rhythm is None or rhythm.last_time is None:
                continue
            last = self.snapshot_at.get(patient_id)
            if rhythm.busy() or last is None or rhythm.last_time - last >= every:
                self.snapshot_at[patient_id] = rhythm.last_time
                out.state.append((partition, patient_id.encode(), self._snapshot(rhythm)))
        self.touched.clear()

    def sweep(self, out) -> None:
        """Signal loss for patients with no beat for `episodes.silence_s` (wall clock)."""
        limit = self.cfg.episodes.silence_s
        now = time.monotonic()
        for (partition, patient_id), at in self.arrived.items():
            if now - at < limit:
                continue
            rhythm = self.partitions.get(partition, {}).get(patient_id)
            if rhythm is not None and "signal_loss" not in rhythm.open:
                self._publish(rhythm, rhythm.went_silent(now - at), out)
                self.touched.add((partition, patient_id))
        self.snapshots(out)

    def _publish(self, rhythm: PatientRhythm, events: list[Event], out) -> None:
        if not events:
            return
        for event in events:
            ep = event.episode
            if event.kind == "open" or event.whole:
                out.counts[self.started[ep.type]] += 1
            if event.kind == "open":
                self.open_gauges[ep.type].inc()
            elif event.kind == "close" and not event.whole:
                self.open_gauges[ep.type].dec()
            out.counts[self.metrics.events.labels(event.kind, ep.type)] += 1
            msg = messages.event(
                event.kind,
                rhythm.patient_id,
                ep,
                SEVERITY[ep.type],
                self.model_version,
                self.worker_id,
            )
            out.messages.append(
                (self.cfg.topics.events, rhythm.patient_id.encode(), messages.dumps(msg))
            )

    def _snapshot(self, rhythm: PatientRhythm) -> bytes:
        return orjson.dumps(
            {
                "state_version": STATE_VERSION,
                "patient_id": rhythm.patient_id,
                "state": rhythm.snapshot(),
                "worker_id": self.worker_id,
            }
        )

    # ------------------------------------------------------------------ assignment

    def restore(self, partition: int, records) -> int:
        """Load a partition's changelog records (oldest first); returns the patients held."""
        patients = self.partitions.setdefault(partition, {})
        for rec in records:
            if rec.key is None:
                continue
            patient_id = rec.key.decode(errors="replace")  # keys are the workers' own
            old = patients.pop(patient_id, None)
            if old is not None:
                self._gauge_open(old, -1)
            if rec.value is None:  # a tombstone: the patient's state was deleted
                continue
            try:
                body = orjson.loads(rec.value)
                if body.get("state_version") != STATE_VERSION:
                    raise ValueError(f"state_version {body.get('state_version')!r}")
                rhythm = PatientRhythm.restore(patient_id, self.cfg.episodes, body["state"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # Never fatal: the patient starts afresh, as it would without a changelog.
                log.warning(
                    "partition %d: unreadable rhythm state of %s skipped (%s)",
                    partition,
                    patient_id,
                    exc,
                )
                continue
            patients[patient_id] = rhythm
            self.snapshot_at[patient_id] = rhythm.last_time
            self.arrived[(partition, patient_id)] = time.monotonic()
            self._gauge_open(rhythm, +1)
        self.metrics.rhythm_restored.inc(len(patients))
        return len(patients)

    def drop(self, partitions) -> None:
        """Forget revoked partitions (their next owner restores them from the changelog)."""
        for partition in partitions:
            for patient_id, rhythm in self.partitions.pop(partition, {}).items():
                self._gauge_open(rhythm, -1)
                self.arrived.pop((partition, patient_id), None)
                self.snapshot_at.pop(patient_id, None)
        self.touched = {(p, k) for p, k in self.touched if p not in set(partitions)}

    def _gauge_open(self, rhythm: PatientRhythm, sign: int) -> None:
        for name, n in Counter(ep.type for ep in rhythm.open.values()).items():
            self.open_gauges[name].inc(sign * n)
