"""Thin wrappers around kafka-python: clients built from config, topic creation, lag.

Secrets (the SASL password) come only from the environment or a file, and are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.partitioner.default import DefaultPartitioner

from stream.config import ConfigError, KafkaConfig, TopicsConfig

log = logging.getLogger(__name__)
PASSWORD_ENV = "ECG_KAFKA_SASL_PASSWORD"


def sasl_password(cfg: KafkaConfig) -> str | None:
    """The SASL password from ECG_KAFKA_SASL_PASSWORD or kafka.sasl_password_file."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if cfg.sasl_password_file:
        try:
            return Path(cfg.sasl_password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"kafka.sasl_password_file: cannot read ({exc.strerror})") from None
    return None


def client_options(cfg: KafkaConfig) -> dict:
    """Connection, security and retry options shared by every client."""
    if not cfg.bootstrap_servers:
        raise ConfigError("kafka.bootstrap_servers is empty")
    opts = {
        "bootstrap_servers": cfg.bootstrap_servers.split(","),
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
        "reconnect_backoff_max_ms": cfg.reconnect_backoff_max_ms,
    }
    if cfg.security_protocol.startswith("SASL"):
        if not cfg.sasl_mechanism:
            raise ConfigError("kafka.sasl_mechanism is required with SASL")
        opts.update(
            sasl_mechanism=cfg.sasl_mechanism,
            sasl_plain_username=cfg.sasl_username,
            sasl_plain_password=sasl_password(cfg),
        )
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(cfg, name):
            opts[name] = getattr(cfg, name)
    return opts


class CachedKeyPartitioner(DefaultPartitioner):
    """The default partitioner (murmur2 of the key, as the Java client), remembering each
    key's partition per topic and partition count. kafka-python hashes in pure Python and sorts
    the partition list on every send; a worker sends the same few thousand patient keys."""

    MAX_ENTRIES = 1_000_000  # then start over (a new partition count also starts over)

    def __init__(self):
        self.chosen: dict[tuple[str, bytes, int], int] = {}

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        partitions = cluster.partitions_for_topic(topic)
        if serialized_key is None or not partitions:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        entry = (topic, serialized_key, len(partitions))
        chosen = self.chosen.get(entry)
        if chosen is None:
            if len(self.chosen) >= self.MAX_ENTRIES:
                self.chosen.clear()
            chosen = super().partition(topic, key, serialized_key, value, serialized_value, cluster)
            self.chosen[entry] = chosen
        return chosen


def make_producer(cfg: KafkaConfig, **overrides) -> KafkaProducer:
    """An idempotent, acks=all producer with batching tuned for throughput."""
    opts = {
        **client_options(cfg),
        "partitioner": CachedKeyPartitioner(),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": cfg.linger_ms,
        "batch_size": cfg.producer_batch_bytes,
        "compression_type": None if cfg.compression == "none" else cfg.compression,
        "max_request_size": 4 * 1024 * 1024,
        **overrides,
    }
    return KafkaProducer(**opts)


def make_consumer(cfg: KafkaConfig, group_id: str | None, **overrides) -> KafkaConsumer:
    """A consumer with manual commits, reading from the earliest uncommitted offset."""
    opts = {
        **client_options(cfg),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        "max_poll_interval_ms": cfg.max_poll_interval_ms,
        "max_poll_records": cfg.max_poll_records,
        "max_partition_fetch_bytes": cfg.max_partition_fetch_bytes,
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
        "fetch_max_bytes": max(cfg.max_partition_fetch_bytes, 52428800),
        **overrides,
    }
    return KafkaConsumer(**opts)


BOOTSTRAP_ATTEMPT_S = 5.0  # one bootstrap attempt of ensure_topics (kafka-python: 30 s)


class KafkaUnreachable(KafkaTimeoutError):
    """No broker of the bootstrap list answered in time: one line saying what to check."""

    def __init__(self, servers: str, waited_s: float):
        super().__init__(
            f"no Kafka broker answered at {servers} within {waited_s:g} s: check that it runs "
            "and is reachable from here, --bootstrap-servers (ECG_BOOTSTRAP_SERVERS) and "
            "kafka.security_protocol"
        )

    def __str__(self) -> str:  # the message alone, without KafkaError's class-name prefix
        return self.args[0]


def admin_client(cfg: KafkaConfig, bootstrap_timeout_s: float) -> KafkaAdminClient:
    """An admin client that gives up bootstrapping after bootstrap_timeout_s."""
    return KafkaAdminClient(
        **client_options(cfg), bootstrap_timeout_ms=int(bootstrap_timeout_s * 1000)
    )


def check_reachable(cfg: KafkaConfig, timeout_s: float = 4.0) -> None:
    """Fail fast (KafkaUnreachable) unless a broker answers a metadata request: one-shot
    commands call this first instead of waiting kafka-python's 30 s bootstrap timeout."""
    try:
        admin_client(cfg, timeout_s).close()
    except KafkaTimeoutError as exc:
        raise KafkaUnreachable(cfg.bootstrap_servers, timeout_s) from exc


def ensure_topics(cfg: KafkaConfig, topics: TopicsConfig, timeout_s: float = 30.0) -> list[str]:
    """Create the pipeline's topics with the configured partitions and replication factor.

    Topics are created explicitly: brokers that auto-create use their own partition count.
    Returns the names that were created (existing ones are left alone).
    """
    names = [topics.raw, topics.truth, topics.repaired, topics.alerts, topics.dlq, topics.events]
    compacted = [topics.rhythm_state]  # a changelog: the latest record per key is what counts
    deadline = time.monotonic() + timeout_s
    while True:
        # Bounded attempts, so a worker waiting for its broker says so every few seconds.
        attempt_s = min(BOOTSTRAP_ATTEMPT_S, max(0.1, deadline - time.monotonic()))
        try:
            admin = admin_client(cfg, attempt_s)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise KafkaUnreachable(cfg.bootstrap_servers, timeout_s) from exc
            log.warning("waiting for Kafka at %s (%s)", cfg.bootstrap_servers, exc)
            time.sleep(1.0)
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names + compacted if n not in existing]
        new = [
            NewTopic(
                n,
                cfg.partitions,
                cfg.replication_factor,
                topic_configs={"cleanup.policy": "compact"} if n in compacted else {},
            )
            for n in missing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # created concurrently elsewhere
                admin.create_topics(new)
        return missing
    finally:
        admin.close()


def partition_lag(consumer: KafkaConsumer, partitions) -> dict[int, int]:
    """Records behind, per partition, from the consumer's own fetch state.

    Uses `highwater()` (from fetch responses): the embedded broker reports a wrong
    `end_offsets()` (base offset of the last batch + 1), while the high watermark in fetch
    responses is right on both it and real Kafka. Clamped at 0.
    """
    lag = {}
    for tp in partitions:
        high = consumer.highwater(tp)
        if high is None:
            continue
        lag[tp.partition] = max(0, high - consumer.position(tp))
    return lag


class ReadTimeout(KafkaError):
    """A partition could not be read to its end in time."""


# A poll without records waits out its whole timeout, and an empty or fully read partition
# gives none: a short poll lets the loop see the high watermark as soon as a fetch brings it.
# A worker reads one changelog partition per assigned partition before serving it.
READ_POLL_MS = 10


def read_partition(
    consumer: KafkaConsumer,
    tp: TopicPartition,
    timeout_s: float,
    start: int = 0,
    end: int | None = None,
) -> list:
    """The records of one partition with start <= offset < end (fewer if some are gone), or,
    with end=None, up to the partition's end at the time of reading.

    The end is the high watermark of the fetch responses (the embedded broker's
    `end_offsets()` is wrong, see `partition_lag`). Raises ReadTimeout after timeout_s.
    """
    consumer.assign([tp])
    if start > 0:
        consumer.seek(tp, start)
    else:
        consumer.seek_to_beginning(tp)
    records: list = []
    deadline = time.monotonic() + timeout_s
    while end is None or consumer.position(tp) < end:
        for batch in consumer.poll(timeout_ms=READ_POLL_MS, max_records=10000).values():
            records.extend(r for r in batch if end is None or r.offset < end)
        high = consumer.highwater(tp)
        if high is not None and consumer.position(tp) >= high:
            break  # the partition's end (also where end lies beyond it)
        if time.monotonic() > deadline:
            goal = "to its end" if end is None else f"up to {end}"
            raise ReadTimeout(f"{tp.topic}[{tp.partition}] not read {goal} in {timeout_s} s")
    return records


class TopicNotFound(LookupError):
    """A topic the command reads does not exist (yet)."""

    def __init__(self, topic: str):
        super().__init__(f"topic {topic} does not exist: run `ecg-stream create-topics` first")

    def __str__(self) -> str:
        return self.args[0]


def require_topic(consumer: KafkaConsumer, topic: str) -> None:
    """Fail in one line instead of following a topic that is not there, silently, forever."""
    if not consumer.partitions_for_topic(topic):
        raise TopicNotFound(topic)


def assign_all(consumer: KafkaConsumer, topic: str, from_beginning: bool = True) -> None:
    """Read every partition of a topic without joining a group (subscribers, tests)."""
    parts = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
    if from_beginning:
        consumer.seek_to_beginning()
    else:
        consumer.seek_to_end()


def scan_topic(cfg: KafkaConfig, topic: str, keep, enough, timeout_s: float = 10.0) -> list:
    """Decoded JSON messages of a topic, from the beginning, for which keep(msg) is true;
    stops once enough(kept) is true or after timeout_s."""
    import orjson

    consumer = make_consumer(cfg, None)
    kept: list = []
    try:
        assign_all(consumer, topic)
        deadline = time.monotonic() + timeout_s
        while not enough(kept) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=5000).values():
                kept.extend(m for m in map(orjson.loads, (r.value for r in records)) if keep(m))
        return kept
    finally:
        consumer.close()
