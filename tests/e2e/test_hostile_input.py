"""Bad input never crashes a worker: every bad message lands in the DLQ with its reason."""

from __future__ import annotations

import base64
import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream import messages
from stream.engine import Engine
from stream.kafka import ensure_topics, make_producer
from stream.messages import InvalidMessage, decode_raw
from tests.helpers import ThreadWorker, decode, read_topic

LIMIT = 65536


def good(patient="p1", seq=0, ts=1000.0, n=120, **extra) -> dict:
    samples = [0.5] * n
    samples[10:20] = [None] * 10
    return {
        "schema_version": 1,
        "patient_id": patient,
        "seq": seq,
        "timestamp": ts,
        "fs": 125,
        "samples": samples,
        **extra,
    }


def enc(msg) -> bytes:
    return json.dumps(msg).encode()


def without(field: str) -> bytes:
    msg = good()
    del msg[field]
    return enc(msg)


# (case name, key, value, expected reason). Stateless cases use patient "p1".
BAD = [
    ("not utf-8", b"p1", b"\xff\xfe{\x00", "not_utf8"),
    ("not json", b"p1", b"{'patient_id': p1", "not_json"),
    ("empty", b"p1", b"", "not_json"),
    ("json array", b"p1", b"[1, 2, 3]", "not_object"),
    ("json string", b"p1", b'"beat"', "not_object"),
    ("missing samples", b"p1", without("samples"), "missing_field"),
    ("missing patient", b"p1", without("patient_id"), "missing_field"),
    ("seq is a string", b"p1", enc(good(seq="7")), "wrong_type"),
    ("samples is a dict", b"p1", enc({**good(), "samples": {"a": 1}}), "wrong_type"),
    ("sample is a string", b"p1", enc({**good(), "samples": ["0.1"] * 10}), "wrong_type"),
    ("too many samples", b"p1", enc(good(n=188)), "bad_sample_count"),
    ("no samples", b"p1", enc({**good(), "samples": []}), "bad_sample_count"),
    ("NaN literal", b"p1", enc(good()).replace(b"0.5", b"NaN", 1), "not_json"),
    ("infinite number", b"p1", enc(good()).replace(b"0.5", b"1e999", 1), "not_json"),
    ("huge value", b"p1", enc({**good(), "samples": [0.5, 1e12, 0.4]}), "sample_out_of_range"),
    ("all samples missing", b"p1", enc({**good(), "samples": [None] * 50}), "all_samples_missing"),
    ("unknown schema version", b"p1", enc(good(schema_version=2)), "unknown_schema_version"),
    ("wrong sampling rate", b"p1", enc(good(fs=360)), "bad_sampling_rate"),
    ("oversize payload", b"p1", b'{"pad": "' + b"x" * (LIMIT + 10) + b'"}', "payload_too_large"),
    ("negative timestamp", b"p1", enc(good(ts=-5.0)), "bad_timestamp"),
    ("negative seq", b"p1", enc(good(seq=-1)), "bad_seq"),
    ("bad patient id", b"p 1", enc(good(patient="p 1")), "bad_patient_id"),
    ("key does not match", b"p2", enc(good()), "key_mismatch"),
    ("session is a number", b"p1", enc(good(session=5)), "wrong_type"),
    ("session with spaces", b"p1", enc(good(session="boot 2")), "wrong_type"),
]
# Stateful cases for patient "p9": a good beat, then a duplicate seq, then time going back.
STATEFUL = [
    ("first good beat", b"p9", enc(good("p9", seq=5, ts=2000.0)), None),
    ("duplicate seq", b"p9", enc(good("p9", seq=5, ts=2001.0)), "duplicate_seq"),
    ("timestamp goes back", b"p9", enc(good("p9", seq=6, ts=1999.0)), "non_monotonic_timestamp"),
    ("next good beat", b"p9", enc(good("p9", seq=7, ts=2002.0)), None),
    ("far-future timestamp", b"p9", enc(good("p9", seq=8, ts=time.time() + 9e6)), "bad_timestamp"),
    ("the next real beat", b"p9", enc(good("p9", seq=8, ts=2003.0)), None),
    ("device reboot: seq restarts, time moves on", b"p9", enc(good("p9", seq=0, ts=2004.0)), None),
    ("after the reboot", b"p9", enc(good("p9", seq=1, ts=2005.0)), None),
    (
        "a new session: seq and clock start over",
        b"p9",
        enc(good("p9", 0, 10.0, session="b2")),
        None,
    ),
    ("same session, seq repeats", b"p9", enc(good("p9", 0, 11.0, session="b2")), "duplicate_seq"),
]


@pytest.mark.parametrize("name,key,value,reason", BAD, ids=[c[0] for c in BAD])
def test_decoder_reason(name, key, value, reason):
    with pytest.raises(InvalidMessage) as info:
        decode_raw(value, key, LIMIT)
    assert info.value.reason == reason


def test_good_message_decodes():
    beat = decode_raw(enc(good()), b"p1", LIMIT)
    assert beat.missing.sum() == 10 and len(beat.samples) == 120
    assert beat.raw_values[:2] == [0.5, 0.5]


def test_worker_sends_every_bad_message_to_the_dlq(pipeline_config, checkpoint):
    cfg = pipeline_config(f"worker.max_message_bytes={LIMIT}", "kafka.partitions=1")
    ensure_topics(cfg.kafka, cfg.topics)
    engine = Engine.load(checkpoint)
    cases = BAD + STATEFUL
    producer = make_producer(cfg.kafka)
    with ThreadWorker(cfg, engine) as worker:
        for i, (_name, key, value, _reason) in enumerate(cases):
            producer.send(cfg.topics.raw, key=key, value=value)
            # A good beat after every bad one: the worker must carry on normally.
            producer.send(cfg.topics.raw, key=b"ok", value=enc(good("ok", seq=i, ts=10.0 + i)))
        producer.flush()
        expected_dlq = sum(c[3] is not None for c in cases)
        dlq = decode(read_topic(cfg, cfg.topics.dlq, expected=expected_dlq))
        expected = len(cases) + sum(c[3] is None for c in cases)
        repaired = decode(read_topic(cfg, cfg.topics.repaired, expected=expected))
        metrics = worker.metrics
    producer.close()

    assert [d["reason"] for d in dlq] == [c[3] for c in cases if c[3] is not None]
    for letter, case in zip(dlq, [c for c in cases if c[3] is not None]):
        original = base64.b64decode(letter["payload_b64"])
        assert original == case[2][:LIMIT]
        assert letter["payload_truncated"] == (len(case[2]) > LIMIT)
        assert letter["detail"]
    ok_seqs = sorted(m["seq"] for m in repaired if m["patient_id"] == "ok")
    assert ok_seqs == list(range(len(cases)))
    p9 = [(m["seq"], m["device_reset"]) for m in repaired if m["patient_id"] == "p9"]
    assert p9 == [(5, False), (7, False), (8, False), (0, True), (1, False), (0, True)]
    assert metrics.device_resets._value.get() == 2
    for case in cases:
        if case[3]:
            assert metrics.dlq.labels(case[3])._value.get() >= 1
    assert sum(metrics.dlq.labels(r)._value.get() for r in messages.DLQ_REASONS) == len(dlq)


# Payloads built to be *almost* valid, so the fuzzer explores deep into the validator.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=8,
)
sample_lists = st.lists(
    st.none()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers()
    | st.text(max_size=2)
    | st.booleans(),
    max_size=200,
)
near_valid = st.fixed_dictionaries(
    {
        "schema_version": st.sampled_from([1, 1, 2, "1", None, 1.0, True]),
        "patient_id": st.sampled_from(["p1", "", "p 1", "x" * 70]) | st.text(max_size=8),
        "seq": st.integers(min_value=-3, max_value=2**64) | st.floats() | st.text(max_size=2),
        "timestamp": st.floats() | st.integers(-5, 10**12) | st.none(),
        "fs": st.sampled_from([125, 125.0, 360, "125", None]),
        "samples": sample_lists,
    },
    optional={
        "sent_at": st.floats() | st.none(),
        "session": st.sampled_from(["b1", "", 3, None]) | st.text(max_size=4),
        "extra": json_values,
    },
)


def _check(payload: bytes, key: bytes | None) -> None:
    try:
        beat = decode_raw(payload, key, LIMIT)
    except InvalidMessage as exc:
        assert exc.reason in messages.DLQ_REASONS
        return
    # Whatever passes is safe to hand to the model.
    assert 1 <= len(beat.samples) <= messages.MAX_SAMPLES
    assert not beat.missing.all()
    assert all(math.isfinite(v) and abs(v) <= messages.MAX_ABS_SAMPLE for v in beat.samples)
    assert beat.seq >= 0 and math.isfinite(beat.timestamp) and beat.timestamp >= 0


@settings(max_examples=6000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid, st.sampled_from([None, b"p1", b"other"]))
def test_fuzz_near_valid_payloads(msg, key):
    _check(json.dumps(msg).encode(), key)


@settings(max_examples=4000, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_arbitrary_bytes(payload):
    _check(payload, None)
