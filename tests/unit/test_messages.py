"""The wire format's encoders, one by one: what a subscriber reads is what the schemas say,
observed samples pass through untouched, and imputed ones are marked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import numpy as np
import orjson

from stream import messages
from stream.config import WorkerConfig
from stream.messages import InvalidMessage, Verdict
from stream.processor import verdict_alerts
from tests.helpers import SCHEMAS

CLOCK = 1.7e9


def schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{name}.v1.json").read_text()))


def raw(samples, missing, seq: int = 3) -> messages.RawBeat:
    body = messages.dumps(messages.raw_beat("p1", seq, CLOCK, samples, missing))
    return messages.decode_raw(body, b"p1", 65536)


def encode(beat: messages.RawBeat, verdict: Verdict | None) -> dict:
    body = messages.repaired_beat(
        beat,
        verdict,
        rr_s=0.81234567,
        heart_rate_bpm=73.456,
        device_reset=False,
        model_version="test",
        worker_id="w1",
        partition=2,
        offset=41,
    )
    return orjson.loads(messages.dumps(body))


def test_a_repaired_beat_keeps_every_observed_sample_and_marks_the_imputed_ones():
    samples = np.linspace(0.1, 0.9, 20)
    missing = np.zeros(20, bool)
    missing[5:9] = True
    beat = raw(samples, missing)
    filled = np.full(20, 0.123456789)
    verdict = Verdict(filled, "V", 0.9, [0.05, 0.02, 0.9, 0.02, 0.01], 0.7, 0.5)
    msg = encode(beat, verdict)
    schema("repaired-beat").validate(msg)
    assert msg["status"] == "repaired" and msg["missing_count"] == 4
    assert msg["imputed_mask"] == missing.astype(int).tolist()
    observed = ~missing
    assert [v for v, o in zip(msg["samples"], observed) if o] == [
        v for v, o in zip(beat.raw_values, observed) if o
    ]
    assert msg["samples"][5:9] == [0.12346] * 4  # imputed values carry 5 decimals
    assert msg["beat_class"] == {
        "label": "V",
        "confidence": 0.9,
        "probabilities": {"N": 0.05, "S": 0.02, "V": 0.9, "F": 0.02, "Q": 0.01},
    }
    assert msg["anomaly"] == {"score": 0.7, "threshold": 0.5, "flag": True}
    assert msg["rr_interval_s"] == 0.8123 and msg["heart_rate_bpm"] == 73.5
    assert (msg["received_partition"], msg["received_offset"]) == (2, 41)


def test_a_complete_beat_is_passed_through_and_an_unrecoverable_one_is_not_invented():
    samples = np.linspace(0.1, 0.9, 20)
    complete = raw(samples, np.zeros(20, bool))
    msg = encode(complete, Verdict(samples, "N", 0.99, [0.99, 0, 0, 0, 0.01], 0.1, 0.5))
    assert msg["status"] == "complete" and msg["samples"] == complete.raw_values
    assert msg["anomaly"]["flag"] is False

    missing = np.ones(20, bool)
    missing[:3] = False
    lost = raw(samples, missing)
    msg = encode(lost, None)
    schema("repaired-beat").validate(msg)
    assert msg["status"] == "unrecoverable"
    assert msg["samples"][3:] == [None] * 17 and msg["imputed_mask"] == [0] * 20
    assert msg["beat_class"] is None and msg["anomaly"] is None


def test_a_dead_letter_keeps_the_bytes_and_says_where_they_came_from():
    payload = b'{"not": "a beat"}' * 10
    rec = SimpleNamespace(value=payload, key=b"p9", topic="ecg.beats.raw", partition=4, offset=7)
    letter = messages.dead_letter(rec, InvalidMessage("missing_field", "no seq"), "w1", 32)
    schema("dead-letter").validate(letter)
    assert letter["reason"] == "missing_field" and letter["reason"] in messages.DLQ_REASONS
    assert (letter["topic"], letter["partition"], letter["offset"]) == ("ecg.beats.raw", 4, 7)
    assert letter["payload_bytes"] == len(payload) and letter["payload_truncated"] is True
    assert len(letter["payload_b64"]) == 44  # 32 bytes, base64


def test_per_beat_alerts_follow_the_configured_policy():
    w = WorkerConfig()
    quiet = Verdict(np.zeros(1), "N", 0.99, [0.99, 0, 0, 0, 0.01], 0.1, 0.5)
    assert verdict_alerts(quiet, w) == []
    ectopic = Verdict(np.zeros(1), "V", 0.8, [0.1, 0.05, 0.8, 0.03, 0.02], 0.9, 0.5)
    kinds = [kind for kind, _ in verdict_alerts(ectopic, w)]
    assert kinds == ["anomaly", "arrhythmia"] and set(kinds) <= set(messages.ALERT_TYPES)
    unsure = Verdict(np.zeros(1), "V", 0.4, [0.3, 0.2, 0.4, 0.05, 0.05], 0.1, 0.5)
    assert verdict_alerts(unsure, w) == []  # below worker.min_alert_probability
