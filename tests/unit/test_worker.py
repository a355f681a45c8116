"""The worker's parts one at a time, with stand-ins for Kafka and the model: publishing until
every message is acknowledged, committing only what was published, dropping and rewinding on
a revocation, and taking over a partition from the committed offset."""

from __future__ import annotations

import threading
from collections import deque
from types import SimpleNamespace

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from stream.checkpoint import Checkpoint, OffsetWentBackwards, Rebalance
from stream.config import load_config
from stream.health import Health
from stream.intake import Intake
from stream.messages import RawBeat
from stream.metrics import WorkerMetrics
from stream.processor import Output, Prepared
from stream.publishing import Publisher
from stream.rhythm_stage import RhythmStage
from stream.state import PatientRegistry
from stream.takeover import Takeover


def record(partition, offset, topic="t"):
    return SimpleNamespace(topic=topic, partition=partition, offset=offset)


class DuplicateOnFirstSend:
    """A producer whose first send of each value is acknowledged without an offset, the way
    kafka-python reports DUPLICATE_SEQUENCE_NUMBER (the embedded broker's answer to a retry
    after a crash, although the batch was lost); later sends get real offsets."""

    def __init__(self):
        self.sent: list[bytes] = []

    def send(self, topic, key=None, value=None, partition=None):
        offset = len(self.sent) if value in self.sent else -1
        self.sent.append(value)
        future = Future()
        future.success(SimpleNamespace(topic=topic, offset=offset))
        return future

    def flush(self, timeout=None):
        pass


def test_acknowledgement_without_offset_is_sent_again():
    from simulator.publisher import BufferedPublisher
    from stream.metrics import SimulatorMetrics

    producer = DuplicateOnFirstSend()
    publisher = Publisher(producer, "state", WorkerMetrics(), threading.Event())
    assert publisher.publish(Output(messages=[("t", b"p1", b"a"), ("t", b"p1", b"b")]))
    assert producer.sent == [b"a", b"b", b"a", b"b"]

    producer = DuplicateOnFirstSend()
    publisher = BufferedPublisher(producer, SimulatorMetrics(), max_buffered=10)
    publisher.send("t", b"p1", b"a")
    assert publisher.drain(timeout_s=5)
    assert producer.sent == [b"a", b"a"] and publisher.acked == 1


class CommitLog:
    """A consumer stand-in that records what is committed."""

    def __init__(self):
        self.commits: list[dict] = []

    def commit(self, offsets, timeout_ms=None):
        self.commits.append({(tp.topic, tp.partition): m.offset for tp, m in offsets.items()})


def test_only_published_offsets_are_committed_and_never_backwards():
    """At-least-once: the offsets of a batch whose output is not acknowledged are never
    committed (its records are read again), and no commit moves an offset backwards."""
    consumer = CommitLog()
    publisher = SimpleNamespace(publish=lambda output: acknowledged)
    checkpoint = Checkpoint(
        consumer, publisher, Intake(consumer, 10), WorkerMetrics(), threading.Event()
    )
    acknowledged = False
    assert not checkpoint.publish(Output(offsets={("t", 0): 5}))
    checkpoint.commit()
    assert consumer.commits == [] and checkpoint.committed == {}
    acknowledged = True
    assert checkpoint.publish(Output(offsets={("t", 0): 8, ("t", 1): 2}))
    checkpoint.commit()
    assert consumer.commits == [{("t", 0): 8, ("t", 1): 2}]
    assert checkpoint.committed == {("t", 0): 8, ("t", 1): 2}
    assert checkpoint.publish(Output(offsets={("t", 0): 7}))
    with pytest.raises(OffsetWentBackwards):
        checkpoint.commit()
    assert len(consumer.commits) == 1


def test_a_revoked_partitions_template_slots_go_to_new_patients_fresh():
    """The registry numbers the template slots (the history lives beside the model): a
    revoked partition's slots are reused, and the model is told to forget their history."""

    def beat(patient, seq):
        return RawBeat(patient, seq, float(seq + 1), None, None, None, None)

    registry = PatientRegistry()
    first = [registry.admit(p, beat(f"p{p}", 0)) for p in (0, 1)]
    assert [(a.slot, a.new) for a in first] == [(0, True), (1, True)]
    assert registry.admit(0, beat("p0", 1)).new is False
    assert registry.drop_partitions([0, 5]) == 1
    reused = registry.admit(2, beat("q", 0))
    assert (reused.slot, reused.new) == (0, True)
    assert registry.admit(1, beat("p1", 1)).slot == 1


def test_a_member_that_missed_generations_skips_to_the_committed_offset():
    """kafka-python keeps a partition's position across a rejoin even when other members
    processed and committed it meanwhile: the worker moves ahead to the committed offset
    (dropping what it already polled from the stale position), never back."""
    behind, ahead, failing = (TopicPartition("t", p) for p in (0, 1, 2))
    committed = {behind: 100, ahead: 50}
    positions = {behind: 60, ahead: 70, failing: 5}
    seeks = []

    def committed_offset(tp, timeout_ms=None):
        if tp == failing:
            raise KafkaTimeoutError("no coordinator")
        return committed[tp]

    consumer = SimpleNamespace(
        assignment=lambda: {behind, ahead, failing},
        committed=committed_offset,
        position=lambda tp, timeout_ms=None: positions[tp],
        seek=lambda tp, offset: seeks.append((tp, offset)),
    )
    intake = Intake(consumer, 10)
    kept = record(1, 69)
    intake.records = [record(0, 59), kept]
    takeover = Takeover(load_config(env={}), consumer, None, intake, WorkerMetrics())
    takeover.waiting = {behind, ahead, failing}
    restored, warmed = [], []
    # The changelog read and the warm-up, after the position check.
    takeover.restore_rhythm = lambda processor, partition: restored.append(partition)
    takeover.warm_up = lambda processor, tp, start: warmed.append((tp.partition, start))
    takeover.prepare(processor=None)
    assert seeks == [(behind, 100)]
    assert intake.records == [kept]
    assert takeover.waiting == {failing}  # checked again after the next poll
    assert sorted(restored) == [0, 1]
    # The warm-up re-reads what comes before the next record to process: the committed
    # offset where the worker skipped ahead, the first polled record (not the position).
    assert sorted(warmed) == [(0, 100), (1, 69)]


def test_revoked_partitions_drop_unpublished_records_and_rewind():
    """A rebalance while batches are collected and in the model: what is not published yet
    for the revoked partitions (polled records, prepared batches in flight, and the polled
    records of every partition such a batch touches) is dropped, because the hook cannot
    commit on kafka-python 3's IO thread, and each position goes back to the first dropped
    record, so nothing is skipped if the partition comes back."""
    seeks = []
    consumer = SimpleNamespace(seek=lambda tp, offset: seeks.append((tp, offset)))
    metrics = WorkerMetrics()
    rhythm = RhythmStage(load_config(env={}), metrics, "test", "w0")
    intake = Intake(consumer, 10)
    checkpoint = Checkpoint(consumer, None, intake, metrics, threading.Event())
    checkpoint.committed = {("t", 0): 3, ("t", 1): 9, ("t", 2): 1}

    def batch(first):
        return Prepared(Output(), [], None, first), None

    untouched = batch({("t", 1): 7})
    worker = SimpleNamespace(
        consumer=consumer,
        metrics=metrics,
        processor=SimpleNamespace(registry=PatientRegistry(), rhythm=rhythm),
        intake=intake,
        in_flight=deque([batch({("t", 0): 3, ("t", 2): 1}), untouched]),
        checkpoint=checkpoint,
        health=Health(consumer, metrics),
    )
    intake.records = [record(0, 5), record(1, 9), record(2, 4), record(0, 6)]
    Rebalance(worker).on_partitions_revoked({TopicPartition("t", 0)})
    assert list(worker.in_flight) == [untouched]
    assert intake.records == [record(1, 9)]
    assert sorted(seeks) == [(TopicPartition("t", 0), 3), (TopicPartition("t", 2), 1)]
    assert checkpoint.committed == {("t", 1): 9, ("t", 2): 1}


def test_the_model_processor_and_the_bench_pass_through_offer_what_the_worker_calls():
    """The worker and its takeover see a batch stage only through `BatchProcessor`: both the
    model's processor and the bench's model-less one offer every method and attribute."""
    import inspect
    import typing

    from stream.processor import BatchProcessor, Processor
    from stream.tooling.bench import PassThrough

    methods = [n for n, v in vars(BatchProcessor).items() if inspect.isfunction(v) and n[0] != "_"]
    assert {"prepare", "submit", "complete", "evict_idle", "warm_up"} <= set(methods)
    cfg = load_config(None, [])
    stand_in = PassThrough(cfg, WorkerMetrics())
    for stage in (Processor, PassThrough):
        for name in methods:
            ours = inspect.signature(getattr(BatchProcessor, name)).parameters
            theirs = inspect.signature(getattr(stage, name)).parameters
            assert list(theirs) == list(ours), (stage, name)
    for name, kind in typing.get_type_hints(BatchProcessor).items():
        assert isinstance(getattr(stand_in, name), kind), name
