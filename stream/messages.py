"""Wire format of every topic (JSON, schema version 1) and the strict raw-beat decoder.

The JSON Schemas in `stream/schemas/` are the published contract; this module produces and
checks exactly that. Stateless checks live here; per-patient checks (duplicate sequence
numbers, timestamps going backwards) live in `stream.state`.
"""

from __future__ import annotations

import base64
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import orjson

from models.data import AAMI_CLASSES

SCHEMA_VERSION = 1
BEAT_FS = 125
MAX_SAMPLES = 187
MAX_ABS_SAMPLE = 100.0  # beats are scaled to [0, 1]; anything beyond this is corrupt
SAMPLE_DECIMALS = 5  # 11-bit ADC data scaled to [0, 1]: 5 decimals lose nothing measurable
PATIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
REQUIRED = ("schema_version", "patient_id", "seq", "timestamp", "fs", "samples")
IMPUTED_DECIMALS = 5  # an estimate: more digits would only suggest precision it lacks
STATUSES = ("complete", "repaired", "unrecoverable")  # of a repaired beat
ALERT_TYPES = ("anomaly", "arrhythmia", "unrecoverable", "lost_beats")


class InvalidMessage(ValueError):
    """A raw message the worker cannot accept; `reason` is a stable machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


DLQ_REASONS = (
    "payload_too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "unknown_schema_version",
    "bad_patient_id",
    "key_mismatch",
    "bad_sample_count",
    "non_finite_sample",
    "sample_out_of_range",
    "all_samples_missing",
    "bad_sampling_rate",
    "bad_timestamp",
    "bad_seq",
    "duplicate_seq",
    "non_monotonic_timestamp",
)


@dataclass
class RawBeat:
    """A validated raw beat. `missing` marks the samples that arrived as null."""

    patient_id: str
    seq: int
    timestamp: float
    sent_at: float | None
    samples: np.ndarray  # float64, 0.0 where missing
    missing: np.ndarray  # bool
    raw_values: list  # the samples exactly as received (for bit-identical pass-through)
    session: str | None = None  # the device's boot/session id, when it sends one


def _require(cond: bool, reason: str, detail: str, *args) -> None:
    """Raise InvalidMessage(reason, detail.format(*args)) unless cond. The detail is only
    formatted on failure: this runs ~15 times per beat on the worker's hot path."""
    if not cond:
        raise InvalidMessage(reason, detail.format(*args))


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def decode_raw(value: bytes | None, key: bytes | None, max_bytes: int) -> RawBeat:
    """Decode and validate one raw-beat message, or raise InvalidMessage with the reason.

    The size limit is enforced before any parsing.
    """
    _require(value is not None, "not_json", "empty message (tombstone)")
    _require(
        len(value) <= max_bytes, "payload_too_large", "{} bytes > limit {}", len(value), max_bytes
    )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage("not_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage("not_json", str(exc)[:200]) from None
    _require(isinstance(msg, dict), "not_object", "top level is {}", type(msg).__name__)
    for name in REQUIRED:
        _require(name in msg, "missing_field", "'{}' is required", name)
    version = msg["schema_version"]
    _require(
        version == SCHEMA_VERSION and _is_number(version),
        "unknown_schema_version",
        "schema_version {!r} (supported: {})",
        version,
        SCHEMA_VERSION,
    )
    patient = msg["patient_id"]
    _require(isinstance(patient, str), "wrong_type", "patient_id must be a string")
    _require(
        bool(PATIENT_ID.match(patient)),
        "bad_patient_id",
        "patient_id must be 1-64 characters of A-Z a-z 0-9 . _ : -",
    )
    if key is not None:
        _require(
            key == patient.encode(),
            "key_mismatch",
            "message key {!r} differs from patient_id {!r}",
            key[:64],
            patient,
        )
    seq = msg["seq"]
    _require(
        isinstance(seq, int) and not isinstance(seq, bool), "wrong_type", "seq must be an integer"
    )
    _require(0 <= seq < 2**63, "bad_seq", "seq {} must be in [0, 2^63)", seq)
    timestamp = msg["timestamp"]
    _require(_is_number(timestamp), "wrong_type", "timestamp must be a number")
    _require(
        math.isfinite(timestamp) and timestamp >= 0,
        "bad_timestamp",
        "timestamp {} must be a finite, non-negative UNIX time",
        timestamp,
    )
    sent_at = msg.get("sent_at")
    _require(
        sent_at is None or (_is_number(sent_at) and math.isfinite(sent_at) and sent_at >= 0),
        "bad_timestamp",
        "sent_at must be a finite, non-negative UNIX time",
    )
    fs = msg["fs"]
    _require(_is_number(fs), "wrong_type", "fs must be a number")
    _require(fs == BEAT_FS, "bad_sampling_rate", "fs {} Hz; schema 1 carries {} Hz", fs, BEAT_FS)
    values = msg["samples"]
    _require(isinstance(values, list), "wrong_type", "samples must be an array")
    _require(
        1 <= len(values) <= MAX_SAMPLES,
        "bad_sample_count",
        "{} samples; expected 1-{}",
        len(values),
        MAX_SAMPLES,
    )
    session = msg.get("session")
    _require(
        session is None or (isinstance(session, str) and bool(PATIENT_ID.match(session))),
        "wrong_type",
        "session must be 1-64 characters of A-Z a-z 0-9 . _ : -",
    )
    samples, missing = _samples(values)
    return RawBeat(patient, seq, float(timestamp), sent_at, samples, missing, values, session)


SAMPLE_TYPES = frozenset({float, int, type(None)})  # exact types: bool is not a sample


def _samples(values: list) -> tuple[np.ndarray, np.ndarray]:
    _require(
        SAMPLE_TYPES.issuperset(map(type, values)), "wrong_type", "samples must be numbers or null"
    )
    try:
        # JSON has no NaN (orjson refuses the literal), so NaN here means null = missing.
        arr = np.array(values, dtype=np.float64)
    except OverflowError:
        raise InvalidMessage("sample_out_of_range", "an integer sample overflows a float") from None
    missing = np.isnan(arr)
    in_range = np.abs(arr) <= MAX_ABS_SAMPLE  # False for NaN: missing, or out of range
    if not in_range.all():
        _require(not missing.all(), "all_samples_missing", "every sample is null")
        bad = arr[~in_range & ~missing]
        _require(np.isfinite(bad).all(), "non_finite_sample", "a sample is NaN or infinite")
        _require(not bad.size, "sample_out_of_range", "a sample exceeds +/-{}", MAX_ABS_SAMPLE)
        arr[missing] = 0.0
    return arr, missing


# --------------------------------------------------------------------------- encoders


def dumps(message: dict) -> bytes:
    """Serialise a message (orjson: compact, fast, rejects NaN)."""
    return orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass
class Verdict:
    """What the model said about one recoverable beat."""

    filled: np.ndarray  # the model's samples; only the missing ones are used
    label: str
    confidence: float
    probabilities: list[float]  # in AAMI_CLASSES order
    score: float  # anomaly score
    threshold: float

    @property
    def flag(self) -> bool:
        return self.score > self.threshold


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def repaired_beat(
    beat: RawBeat,
    verdict: Verdict | None,
    *,
    rr_s: float | None,
    heart_rate_bpm: float | None,
    device_reset: bool,
    model_version: str,
    worker_id: str,
    partition: int,
    offset: int,
) -> dict:
    """A repaired-beat message. Observed samples pass through exactly as received; only the
    missing ones take the model's values, and `imputed_mask` says which. No verdict: the beat
    is unrecoverable and goes out with its gaps, no class and no anomaly score."""
    n_missing = int(beat.missing.sum())
    body = {
        "schema_version": SCHEMA_VERSION,
        "patient_id": beat.patient_id,
        "seq": beat.seq,
        "timestamp": beat.timestamp,
        "fs": BEAT_FS,
        "missing_count": n_missing,
        "missing_fraction": round(n_missing / len(beat.samples), 6),
        "rr_interval_s": _rounded(rr_s, 4),
        "heart_rate_bpm": _rounded(heart_rate_bpm, 1),
        "device_reset": device_reset,
        "model_version": model_version,
        "worker_id": worker_id,
        "received_partition": partition,
        "received_offset": offset,
    }
    if verdict is None:
        body.update(
            samples=beat.raw_values,
            imputed_mask=[0] * len(beat.samples),
            beat_class=None,
            anomaly=None,
            status="unrecoverable",
        )
    else:
        samples = list(beat.raw_values)
        gaps = np.flatnonzero(beat.missing)
        imputed = np.round(verdict.filled[gaps], IMPUTED_DECIMALS).tolist()
        for i, value in zip(gaps.tolist(), imputed):
            samples[i] = value
        body.update(
            samples=samples,
            imputed_mask=beat.missing.view(np.int8),  # written by orjson as 0/1 integers
            beat_class={
                "label": verdict.label,
                "confidence": verdict.confidence,
                "probabilities": dict(zip(AAMI_CLASSES, verdict.probabilities)),
            },
            anomaly={"score": verdict.score, "threshold": verdict.threshold, "flag": verdict.flag},
            status="repaired" if n_missing else "complete",
        )
    body["processed_at"] = time.time()
    return body


def raw_beat(
    patient_id: str,
    seq: int,
    timestamp: float,
    samples,
    missing,
    sent_at=None,
    source: dict | None = None,
    session: str | None = None,
) -> dict:
    """A raw-beat message: samples with the missing ones as null."""
    rounded = np.round(np.asarray(samples, np.float64), SAMPLE_DECIMALS).tolist()
    values = [None if m else v for v, m in zip(rounded, missing)]
    msg = {
        "schema_version": SCHEMA_VERSION,
        "patient_id": patient_id,
        "seq": int(seq),
        "timestamp": float(timestamp),
        "fs": BEAT_FS,
        "samples": values,
    }
    if sent_at is not None:
        msg["sent_at"] = float(sent_at)
    if session is not None:
        msg["session"] = session
    if source:
        msg["source"] = source
    return msg


def truth_beat(
    patient_id: str,
    seq: int,
    timestamp: float,
    samples,
    missing,
    label: str,
    lost: bool,
    source: dict,
) -> dict:
    """The ground truth of a simulated beat (evaluation mode only)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "patient_id": patient_id,
        "seq": int(seq),
        "timestamp": float(timestamp),
        "fs": BEAT_FS,
        "samples": np.round(np.asarray(samples, np.float64), SAMPLE_DECIMALS).tolist(),
        "missing_mask": [int(m) for m in missing],
        "label": label,
        "lost": bool(lost),
        "source": source,
    }


def dead_letter(rec, bad: InvalidMessage, worker_id: str, keep_bytes: int) -> dict:
    """The dead letter of a consumed record: the reason and the original bytes (base64,
    capped at keep_bytes) with where they came from."""
    value = rec.value or b""
    return {
        "schema_version": SCHEMA_VERSION,
        "reason": bad.reason,
        "detail": bad.detail[:500],
        "topic": rec.topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "key_b64": None if rec.key is None else base64.b64encode(rec.key[:1024]).decode(),
        "payload_b64": base64.b64encode(value[:keep_bytes]).decode(),
        "payload_bytes": len(value),
        "payload_truncated": len(value) > keep_bytes,
        "worker_id": worker_id,
        "created_at": time.time(),
    }


def alert(
    kind: str,
    severity: str,
    patient_id: str,
    seq: int,
    timestamp: float,
    detail: dict,
    model_version: str,
) -> dict:
    """An alert for monitoring systems."""
    return {
        "schema_version": SCHEMA_VERSION,
        "type": kind,
        "severity": severity,
        "patient_id": patient_id,
        "seq": int(seq),
        "timestamp": float(timestamp),
        "detail": detail,
        "model_version": model_version,
        "created_at": time.time(),
    }


def event(
    kind: str, patient_id: str, ep, severity: str, model_version: str, worker_id: str
) -> dict:
    """A rhythm-episode event (`models.episodes.Event`): open, update or close."""
    rate = ep.heart_rate_bpm()
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": f"{ep.episode_id}/{kind}/{ep.last_seq}",
        "episode_id": ep.episode_id,
        "kind": kind,
        "type": ep.type,
        "severity": severity,
        "patient_id": patient_id,
        "start_time": round(ep.start_time, 3),
        "end_time": round(ep.end_time, 3),
        "first_seq": ep.first_seq,
        "last_seq": ep.last_seq,
        "beat_count": ep.beats,
        "heart_rate_bpm": None if rate is None else round(rate, 1),
        "confidence": round(ep.confidence, 3),
        "detail": ep.detail,
        "model_version": model_version,
        "worker_id": worker_id,
        "created_at": time.time(),
    }
