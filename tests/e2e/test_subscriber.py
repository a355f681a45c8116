"""The subscriber's kit (stream/subscriber.py) and the README's subscriber example, run against
the embedded broker on a real pipeline's output with a replayed batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tracemalloc

import jsonschema
import orjson
import pytest

from stream.kafka import ensure_topics, make_producer
from stream.subscriber import Deduplicator, load_schema, message_key, schema_names
from tests.helpers import (
    ROOT,
    decode,
    read_topic,
    run_simulator,
    start_worker,
    stop_workers,
    wait_for_metrics,
)


def beat(patient: str, seq: int, timestamp: float) -> dict:
    return {"patient_id": patient, "seq": seq, "timestamp": timestamp, "imputed_mask": [0]}


def test_every_packaged_schema_loads_and_is_valid():
    names = schema_names()
    assert {"raw-beat", "repaired-beat", "event", "alert", "dead-letter"} <= set(names)
    for name in names:
        jsonschema.Draft202012Validator.check_schema(load_schema(name))
    with pytest.raises(ValueError, match="published: alert, dead-letter"):
        load_schema("repaired-beats")


def test_copies_are_dropped_and_a_rebooted_device_is_not_a_copy():
    recent = Deduplicator(capacity=10)
    assert not recent.seen(beat("p", 1, 100.0))
    assert recent.seen(beat("p", 1, 100.0))  # redelivered
    assert not recent.seen(beat("p", 1, 900.0))  # the device rebooted and counts from 1 again
    assert not recent.seen(beat("q", 1, 100.0))
    event = {"event_id": "p/vt/1000/open", "patient_id": "p", "seq": 3}
    assert not recent.seen(event) and recent.seen(dict(event))
    alert = {"patient_id": "p", "seq": 1, "timestamp": 100.0, "type": "lost_beats"}
    assert not recent.seen(alert), "an alert is not the beat it is about"
    assert message_key({"reason": "not_json"}) is None
    assert recent.duplicates == 2


def test_memory_stays_bounded_by_the_capacity():
    recent = Deduplicator(capacity=1_000)
    for seq in range(5_000):
        recent.seen(beat("p", seq, 1000.0 + seq))
    assert len(recent) == 1_000
    assert recent.seen(beat("p", 4_999, 5_999.0)), "the newest keys are remembered"
    assert not recent.seen(beat("p", 0, 1000.0)), "the oldest were forgotten"


def test_a_key_costs_about_230_bytes():
    """The README's sizing (75,000 keys, about 18 MB) and the class docstring."""
    patients = [f"patient-{i:05d}" for i in range(1_000)]  # ids exist in the caller anyway
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    recent = Deduplicator(capacity=50_000)
    for seq in range(50):
        for patient in patients:
            recent.seen(beat(patient, 1_000_000 + seq, 1.7e9 + seq))
    per_key = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    per_key /= len(recent)
    assert 150 < per_key < 300, f"{per_key:.0f} bytes per key"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- subscriber-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its subscriber example"
    return match.group(1)


def test_the_readme_example_drops_a_replayed_batch(pipeline_config, checkpoint, tmp_path):
    cfg = pipeline_config(
        "simulator.patients=2",
        "simulator.records=233,201",  # ventricular ectopy and AF: rhythm events
        "simulator.speed=0",
        "simulator.beats=600",
        "simulator.seed=3",
    )
    ensure_topics(cfg.kafka, cfg.topics)
    proc, port = start_worker(cfg, tmp_path, "subscribed")
    try:
        wait_for_metrics(port, proc)
        sent = run_simulator(cfg).sent
        repaired = read_topic(cfg, cfg.topics.repaired, expected=sent)
    finally:
        stop_workers([(proc, port)])  # closes open episodes: their events are published
    events = read_topic(cfg, cfg.topics.events)
    beats = {(m["patient_id"], m["seq"]) for m in decode(repaired)}
    event_ids = {m["event_id"] for m in decode(events)}
    assert len(beats) == sent and event_ids, "the pipeline's output to subscribe to"

    # A worker that crashed before its commit publishes its last batch again, re-processed.
    producer = make_producer(cfg.kafka)
    replayed = 0
    for topic, records in ((cfg.topics.repaired, repaired[-50:]), (cfg.topics.events, events)):
        for rec in records:
            copy = orjson.loads(rec.value) | {"worker_id": "replacement"}
            copy |= {k: copy[k] + 5.0 for k in ("processed_at", "created_at") if k in copy}
            producer.send(topic, key=rec.key, value=orjson.dumps(copy))
            replayed += 1
    producer.flush()
    producer.close()

    code = readme_example().replace('"ecg.beats.repaired"', repr(cfg.topics.repaired))
    code = code.replace('"ecg.events"', repr(cfg.topics.events))
    env = {**os.environ, "ECG_BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers}
    env["STOP_WHEN_IDLE_MS"] = "12000"  # the group join takes 5 s on Tansu
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    shown_beats = [tuple(line.split()[1:3]) for line in lines if line.startswith("beat ")]
    assert len(shown_beats) == len(beats) == len(set(shown_beats)), run.stdout[-800:]
    assert sum(line.startswith("event ") for line in lines) == len(event_ids)
    assert len(lines) == len(beats) + len(event_ids), f"{replayed} copies replayed"
