"""Turn a micro-batch of raw records into repaired beats, alerts and dead letters.

Pure computation (no Kafka I/O): decode and validate every record, check it against its
patient's history, run the model once over all recoverable beats, and build the output
messages. The worker publishes them and commits.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from models.batches import ModelBatch, Repair
from models.data import AAMI_CLASSES, BEAT_LEN
from models.episodes import Beat
from stream import messages
from stream.config import Config, WorkerConfig
from stream.messages import ALERT_TYPES, STATUSES, InvalidMessage, RawBeat, Verdict
from stream.metrics import WorkerMetrics
from stream.model_api import ServedModel
from stream.rhythm_stage import RhythmStage
from stream.state import Admitted, PatientRegistry, pad


@dataclass
class Output:
    """Everything one batch produces, in publish order, and the offsets it completes."""

    messages: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    # changelog records (partition, key, value; None = a tombstone)
    state: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to read
    sent_at: list[float] = field(default_factory=list)  # source publish time of each beat
    counts: Counter = field(default_factory=Counter)  # counter -> increment, once published


@dataclass
class _Accepted:
    record: object
    beat: RawBeat
    admitted: Admitted
    n_missing: int
    unrecoverable: bool


@dataclass
class Prepared:
    """A decoded and admitted batch, waiting for its model pass."""

    out: Output  # dead letters and lost-beat alerts so far, and the batch's offsets
    accepted: list[_Accepted]
    model_batch: ModelBatch | None  # every accepted beat (None: nothing accepted)
    first_offsets: dict[tuple[str, int], int]  # (topic, partition) -> first offset in the batch
    evicted: list[tuple[int, str, str]] = field(default_factory=list)  # (partition, id, why)


def batch_offsets(records) -> tuple[dict, dict]:
    """Per (topic, partition) of a batch: the next offset to read (what a commit stores) and
    the first offset in the batch (where to rewind if the batch is dropped)."""
    after: dict[tuple[str, int], int] = {}
    first: dict[tuple[str, int], int] = {}
    for rec in records:
        key = (rec.topic, rec.partition)
        after[key] = max(after.get(key, 0), rec.offset + 1)
        first[key] = min(first.get(key, rec.offset), rec.offset)
    return after, first


def to_model_batch(beats, admitted, recoverable: np.ndarray) -> ModelBatch:
    """The model's batch of admitted beats (`recoverable`: the rows it repairs)."""
    samples, missing, lengths = pad(list(beats), BEAT_LEN)
    return ModelBatch(
        slots=np.array([a.slot for a in admitted]),
        fresh=[a.slot for a in admitted if a.new],
        beats=samples,
        missing=missing,
        lengths=lengths,
        recoverable=recoverable,
        rhythm=np.array([a.rhythm for a in admitted]),
    )


def resolved(value) -> Future:
    """A future that already holds `value`."""
    future: Future = Future()
    future.set_result(value)
    return future


def verdict_alerts(v: Verdict, w: WorkerConfig) -> list[tuple[str, dict]]:
    """The per-beat alerts a recoverable beat raises (published only where
    worker.beat_alerts asks for them: rhythm episodes replace them by default)."""
    alerts = []
    if v.flag:
        alerts.append(
            ("anomaly", {"score": v.score, "threshold": v.threshold, "beat_class": v.label})
        )
    if v.label in w.alert_classes and v.confidence >= w.min_alert_probability:
        alerts.append(("arrhythmia", {"beat_class": v.label, "probability": v.confidence}))
    return alerts


class BatchProcessor(Protocol):
    """What the worker needs of its batch stage: the model's `Processor`, or a stand-in
    without a model (the bench's pass-through). Calls come from the worker's loop only."""

    registry: PatientRegistry  # per-patient sequence and clock state, dropped on revocation
    rhythm: RhythmStage  # per-patient rhythm episodes, restored from their changelog

    def prepare(self, records) -> Prepared:
        """Decode, validate and admit a polled batch; dead letters go into its output."""
        ...

    def submit(self, batch: Prepared) -> Future:
        """Hand the batch to the model without waiting for the pass."""
        ...

    def complete(self, batch: Prepared, result: Repair | None) -> Output:
        """The batch's messages, once its pass is done."""
        ...

    def evict_idle(self) -> Output:
        """Forget idle patients (their tombstones and closing events)."""
        ...

    def warm_up(self, records) -> int:
        """Rebuild patients' history from raw records before a new partition's position;
        the number of beats read (none is published)."""
        ...


class Processor:
    """Stateful batch processor of one worker (state = its partitions' patients)."""

    def __init__(self, cfg: Config, engine: ServedModel, metrics: WorkerMetrics, worker_id: str):
        self.cfg = cfg
        self.engine = engine
        self.metrics = metrics
        self.worker_id = worker_id
        self.registry = PatientRegistry(cfg.worker.max_patients, cfg.worker.patient_idle_s)
        self.rhythm = RhythmStage(cfg, metrics, engine.version, worker_id)
        self.beat_alerts = frozenset(cfg.worker.beat_alerts)
        metrics.model_info.labels(engine.version, f"{engine.threshold:.6g}").set(1)
        metrics.model_throughput.set(engine.throughput)
        # Labelled children resolved once: labels() costs more than inc() on the hot path.
        self.produced = {s: metrics.produced.labels(s) for s in STATUSES}
        self.classified = {c: metrics.classified.labels(c) for c in AAMI_CLASSES}
        self.anomalies = {c: metrics.anomalies.labels(c) for c in AAMI_CLASSES}
        self.alerts = {k: metrics.alerts.labels(k) for k in ALERT_TYPES}

    def prepare(self, records) -> Prepared:
        """Decode, validate and admit records in order; dead letters and lost-beat alerts go
        straight into the output. Updates patient state, so call it from one thread only."""
        offsets, first = batch_offsets(records)
        out = Output(offsets=offsets)
        accepted: list[_Accepted] = []
        self.metrics.consumed.inc(len(records))
        for rec in records:
            try:
                accepted.append(self._admit(rec, out))
            except InvalidMessage as bad:
                self._dead_letter(rec, bad, out)
        model_batch = None
        if accepted:
            recoverable = np.flatnonzero([not a.unrecoverable for a in accepted])
            model_batch = to_model_batch(
                [a.beat for a in accepted], [a.admitted for a in accepted], recoverable
            )
            if len(recoverable):
                self.metrics.batch_size.observe(len(recoverable))
        evicted = self.registry.evict()
        self.metrics.patients.set(self.registry.patient_count())
        return Prepared(out, accepted, model_batch, first, evicted)

    def evict_idle(self) -> Output:
        """Forget patients idle for worker.patient_idle_s (between batches); the output
        carries their changelog tombstones."""
        out = Output()
        self._forget(self.registry.evict(), out)
        self.metrics.patients.set(self.registry.patient_count())
        return out

    def _forget(self, evicted, out: Output) -> None:
        for partition, patient_id, reason in evicted:
            out.counts[self.metrics.evicted.labels(reason)] += 1
            self.rhythm.forget(partition, patient_id, out)

    def warm_up(self, records) -> int:
        """Rebuild patients' history from raw records that come before a newly assigned
        partition's start (already published by its previous owner): their sequence, RR and
        templates, as if this worker had seen them. Nothing is published or counted; the
        model advances the templates only (no pass), ahead of the batches that follow."""
        accepted = []
        for rec in records:
            try:
                beat = self._decode(rec)
                accepted.append((beat, self.registry.admit(rec.partition, beat)))
            except InvalidMessage:
                continue  # it went to the DLQ the first time
        if accepted:
            beats, admitted = zip(*accepted)
            self.engine.submit(to_model_batch(beats, admitted, np.zeros(0, int)))
        self.metrics.patients.set(self.registry.patient_count())
        return len(accepted)

    def submit(self, batch: Prepared) -> Future:
        """Hand a prepared batch to the model: templates (every accepted beat joins its
        patient's history) and one pass over the recoverable beats. The future gives the
        Repair (None if nothing to repair); meanwhile the next batch is prepared."""
        if batch.model_batch is None:
            return resolved(None)
        future = self.engine.submit(batch.model_batch)
        future.add_done_callback(self._observe_inference)
        return future

    def _observe_inference(self, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        if (result := future.result()) is not None:
            self.metrics.inference.observe(result.seconds)

    def complete(self, batch: Prepared, result: Repair | None) -> Output:
        """Build the repaired-beat, alert and event messages of a prepared batch, and the
        rhythm changelog records. Batches complete strictly in order, so each patient's beats
        reach the rhythm stage in order. Its counts go into `Output.counts`, for the worker
        to add once the batch is published."""
        out = batch.out
        self._forget(batch.evicted, out)
        row, threshold = 0, self.engine.threshold
        if result is not None:  # Python floats once per batch, not numpy scalars per beat
            probabilities, scores = result.probabilities.tolist(), result.anomaly_score.tolist()
        for a in batch.accepted:
            alerts: list[tuple[str, dict]] = []
            beat = Beat(a.beat.seq, a.beat.timestamp, None)
            verdict = None
            if not a.unrecoverable:
                probs = probabilities[row]
                beat.confidence = max(probs)
                beat.label = AAMI_CLASSES[probs.index(beat.confidence)]
                verdict = Verdict(
                    result.samples[row], beat.label, beat.confidence, probs, scores[row], threshold
                )
                row += 1
            out.messages.append(self._message(a, verdict, alerts, out.counts))
            for kind, detail in alerts:
                self._alert(out, kind, a.beat, detail)
            if a.admitted.reset:
                self.rhythm.reset(a.record.partition, a.beat.patient_id, out)
            self.rhythm.observe(a.record.partition, a.beat.patient_id, beat, out)
            out.sent_at.append(a.beat.sent_at or a.beat.timestamp)
        self.rhythm.snapshots(out)
        return out

    def _decode(self, rec) -> messages.RawBeat:
        """A raw record as a beat the patient's state may see; InvalidMessage otherwise."""
        w = self.cfg.worker
        beat = messages.decode_raw(rec.value, rec.key, w.max_message_bytes)
        lead = beat.timestamp - time.time()
        if lead > w.max_clock_lead_s:
            raise InvalidMessage(
                "bad_timestamp",
                f"timestamp {beat.timestamp} is {lead:.0f} s ahead of the worker's clock "
                f"(worker.max_clock_lead_s = {w.max_clock_lead_s:g})",
            )
        return beat

    def _admit(self, rec, out: Output) -> _Accepted:
        w = self.cfg.worker
        beat = self._decode(rec)
        admitted = self.registry.admit(rec.partition, beat)
        if admitted.reset:
            out.counts[self.metrics.device_resets] += 1
        self.rhythm.arrival(rec.partition, beat.patient_id)
        lost = admitted.lost
        if lost > 0:
            out.counts[self.metrics.lost] += lost
            self._alert(out, "lost_beats", beat, {"lost": lost, "after_seq": beat.seq - lost - 1})
        n_missing = int(beat.missing.sum())
        unrecoverable = n_missing / len(beat.missing) > w.unrecoverable_fraction
        return _Accepted(rec, beat, admitted, n_missing, unrecoverable)

    def _dead_letter(self, rec, bad: InvalidMessage, out: Output) -> None:
        out.counts[self.metrics.dlq.labels(bad.reason)] += 1
        w = self.cfg.worker
        letter = messages.dead_letter(rec, bad, self.worker_id, w.max_message_bytes)
        out.messages.append((self.cfg.topics.dlq, rec.key, messages.dumps(letter)))

    def _message(self, a: _Accepted, verdict: Verdict | None, alerts: list, counts: Counter):
        """The repaired-beat message of one accepted beat (no verdict: unrecoverable); its
        alerts go into `alerts`."""
        beat = a.beat
        counts[self.metrics.samples_missing] += a.n_missing
        if verdict is None:
            fraction = a.n_missing / len(beat.samples)
            limit = self.cfg.worker.unrecoverable_fraction
            alerts.append(
                ("unrecoverable", {"missing_fraction": round(fraction, 6), "limit": limit})
            )
        else:
            counts[self.metrics.samples_imputed] += a.n_missing
            counts[self.classified[verdict.label]] += 1
            if verdict.flag:
                counts[self.anomalies[verdict.label]] += 1
            alerts += verdict_alerts(verdict, self.cfg.worker)
        body = messages.repaired_beat(
            beat,
            verdict,
            rr_s=a.admitted.rr_s,
            heart_rate_bpm=a.admitted.heart_rate_bpm,
            device_reset=a.admitted.reset,
            model_version=self.engine.version,
            worker_id=self.worker_id,
            partition=a.record.partition,
            offset=a.record.offset,
        )
        counts[self.produced[body["status"]]] += 1
        return (self.cfg.topics.repaired, beat.patient_id.encode(), messages.dumps(body))

    def _alert(self, out: Output, kind: str, beat: RawBeat, detail: dict) -> None:
        if kind not in self.beat_alerts:
            return
        out.counts[self.alerts[kind]] += 1
        msg = messages.alert(
            kind, "warning", beat.patient_id, beat.seq, beat.timestamp, detail, self.engine.version
        )
        out.messages.append((self.cfg.topics.alerts, beat.patient_id.encode(), messages.dumps(msg)))
