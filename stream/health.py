"""The consumer's health as metrics: records behind per partition, and broker connectivity.

An empty poll looks the same whether the topic is idle or the broker is gone: the consumer's
own connection count tells them apart. Without it, a worker with nothing to publish would show
ecg_kafka_connected 1 through a whole outage (and 0 while idle before its first publish).
"""

from __future__ import annotations

import contextlib
import logging
import time

from kafka import KafkaConsumer
from kafka.errors import KafkaError

from stream.kafka import partition_lag
from stream.metrics import WorkerMetrics

log = logging.getLogger("stream.worker")  # the worker's parts log as the worker
HEALTH_CHECK_S = 1.0  # how often an idle or polling worker checks its broker connections


class Health:
    """Updates the lag and connection metrics after each poll."""

    def __init__(self, consumer: KafkaConsumer, metrics: WorkerMetrics):
        self.consumer = consumer
        self.metrics = metrics
        self.connection_check_at = 0.0
        self.disconnected_since: float | None = None

    def check(self) -> None:
        """The lag of every assigned partition, and (at most once per HEALTH_CHECK_S) the
        connection."""
        self._update_lag()
        now = time.monotonic()
        if now >= self.connection_check_at:
            self.connection_check_at = now + HEALTH_CHECK_S
            self._check_connection(now)

    def forget(self, partitions: list[int]) -> None:
        """Drop the lag of partitions this worker no longer owns."""
        for partition in partitions:
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(partition))

    def _update_lag(self) -> None:
        try:
            for partition, lag in partition_lag(self.consumer, self.consumer.assignment()).items():
                self.metrics.lag.labels(str(partition)).set(lag)
        except KafkaError:
            pass  # positions are unknown while (re)joining; the next batch updates them

    def _check_connection(self, now: float) -> None:
        connections = self.consumer.metrics().get("consumer-metrics", {}).get("connection-count")
        if connections is None:
            return  # this client version does not report it
        if connections > 0:
            self.metrics.kafka.ok()
            if self.disconnected_since is not None:
                log.warning("Kafka reachable again after %.1f s", now - self.disconnected_since)
                self.disconnected_since = None
            return
        self.metrics.kafka.failed("consume")
        if self.disconnected_since is None:
            self.disconnected_since = now
            log.warning("no connection to Kafka; consuming paused, retrying with backoff")
