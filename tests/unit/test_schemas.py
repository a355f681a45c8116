"""The published schemas and their evolution policy (README, "Schema evolution")."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest

from stream import messages
from stream.config import load_config
from stream.engine import Engine
from stream.metrics import WorkerMetrics
from stream.processor import Processor
from tests.helpers import SCHEMAS

CLOCK = 1.7e9


def load(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.v1.json").read_text())


def validator(schema: dict) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


def strict(schema: dict) -> jsonschema.Draft202012Validator:
    """The schema refusing properties it does not list: what we write must be documented."""
    closed = copy.deepcopy(schema)
    closed["additionalProperties"] = False
    return validator(closed)


@pytest.mark.parametrize(
    "name", ["raw-beat", "repaired-beat", "alert", "dead-letter", "truth", "event"]
)
def test_every_v1_schema_is_open_to_added_fields(name):
    schema = load("truth-beat" if name == "truth" else name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is True
    assert schema["properties"]["schema_version"] == {"const": 1}


@pytest.fixture(scope="module")
def repaired_messages(checkpoint, record_100) -> list[dict]:
    """Repaired beats of record 100 built by the worker's processor and the real model."""
    cfg = load_config(env={})
    engine = Engine.load(checkpoint, threads=1, max_batch=8)
    processor = Processor(cfg, engine, WorkerMetrics(), "w-test")
    records = []
    for seq in (0, 1, 2, 5, 6, 7):  # beats 3 and 4 never arrive
        samples = record_100.samples[seq, : record_100.length[seq]]
        missing = np.zeros(len(samples), bool)
        missing[10:30] = seq == 6
        raw = messages.raw_beat("p1", seq, CLOCK + float(record_100.time[seq]), samples, missing)
        records.append(
            SimpleNamespace(
                topic="raw", partition=0, offset=seq, key=b"p1", value=messages.dumps(raw)
            )
        )
    batch = processor.prepare(records)
    out = processor.complete(batch, processor.submit(batch).result(timeout=60))
    engine.close()
    return [json.loads(v) for topic, _, v in out.messages if topic == cfg.topics.repaired]


def test_repaired_beats_carry_their_rhythm_and_validate(repaired_messages, record_100):
    schema = load("repaired-beat")
    for m in repaired_messages:
        strict(schema).validate(m)  # every field the worker writes is in the schema
    rr = [m["rr_interval_s"] for m in repaired_messages]
    expected = np.diff(record_100.time[:3])
    assert rr[0] is None and rr[1:3] == pytest.approx(expected.tolist(), abs=1e-4)
    assert rr[3] is None  # seq 5 follows lost beats: the interval would span them
    assert rr[4] == pytest.approx(record_100.time[6] - record_100.time[5], abs=1e-4)
    assert repaired_messages[0]["heart_rate_bpm"] is None
    assert repaired_messages[2]["heart_rate_bpm"] == pytest.approx(60 / expected.mean(), abs=0.1)
    assert repaired_messages[4]["status"] == "repaired"


def test_schema_revisions_stay_compatible_both_ways(repaired_messages):
    """An older message (before rr_interval_s / heart_rate_bpm existed) validates against
    today's schema, and a newer message with a field added later validates too."""
    check = validator(load("repaired-beat"))
    older = {
        k: v
        for k, v in repaired_messages[1].items()
        if k not in ("rr_interval_s", "heart_rate_bpm")
    }
    check.validate(older)
    check.validate({**repaired_messages[1], "a_field_from_revision_3": {"any": "value"}})
    with pytest.raises(jsonschema.ValidationError):
        check.validate({**repaired_messages[1], "rr_interval_s": "0.8"})  # types never change
