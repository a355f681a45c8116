"""Publishing with a bounded buffer, so a broker outage delays beats instead of losing them.

kafka-python's producer keeps retrying sends in order (idempotent, acks=all) for up to
`delivery_timeout_ms`. Around it, a bounded queue holds beats the producer could not even
accept (buffer full, broker unreachable); they are re-sent in order when it recovers. Only when
that queue is full is the oldest beat dropped, counted and logged.

While the broker is down the producer still accepts records into its own buffer and fails
nothing until the delivery timeout, so an outage is detected as "records in flight and no
acknowledgement for ACK_STALL_S": it is then reported (metrics, log) and new beats wait in the
bounded queue instead of the producer's buffer.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from kafka.errors import KafkaError, KafkaTimeoutError

from stream.metrics import SimulatorMetrics

log = logging.getLogger(__name__)
ACK_STALL_S = 5.0  # records in flight and no acknowledgement for this long: broker unreachable


class BufferedPublisher:
    """Send (topic, key, value) records; never block the caller for long; count everything."""

    def __init__(self, producer, metrics: SimulatorMetrics, max_buffered: int):
        self.producer = producer
        self.metrics = metrics
        self.max_buffered = max_buffered
        self.waiting: collections.deque = collections.deque()
        self.in_flight = 0
        self.acked = 0
        self.dropped = 0
        self.failed: collections.deque = collections.deque()  # failed sends, re-queued in order
        self.lock = threading.Lock()
        self.outage_since: float | None = None
        self.retry_at = 0.0
        self.last_progress = time.monotonic()  # last acknowledgement, or first send in flight

    def send(self, topic: str, key: bytes, value: bytes, counted: bool = True) -> None:
        """Queue a record and try to hand queued records to the producer."""
        self.waiting.append((topic, key, value, counted))
        if counted:
            self.metrics.sent.inc()
        if len(self.waiting) > self.max_buffered:
            dropped = self.waiting.popleft()
            if dropped[3]:
                self.dropped += 1
                self.metrics.dropped.inc()
            log.error("send buffer full (%d beats): dropping the oldest beat", self.max_buffered)
        self.pump()

    def pump(self) -> None:
        """Move queued records into the producer while it accepts them."""
        with self.lock:
            while self.failed:
                self.waiting.appendleft(self.failed.pop())
                self.metrics.retried.inc()
        now = time.monotonic()
        if now < self.retry_at:
            self._update_gauge()
            return
        if self.in_flight and now - self.last_progress > ACK_STALL_S:
            self._outage(f"no acknowledgement for {now - self.last_progress:.0f} s")
            self._update_gauge()
            return
        while self.waiting:
            topic, key, value, counted = self.waiting[0]
            try:
                future = self.producer.send(topic, key=key, value=value)
            except KafkaTimeoutError:
                self._outage("producer buffer full or broker unreachable")
                break
            self.waiting.popleft()
            with self.lock:
                if not self.in_flight:
                    self.last_progress = time.monotonic()
                self.in_flight += 1
            future.add_callback(self._on_ack, (topic, key, value, counted))
            future.add_errback(self._on_error, (topic, key, value, counted))
        self._update_gauge()

    def _outage(self, why: str) -> None:
        self.metrics.kafka.failed("produce")
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log.warning("Kafka unavailable (%s); buffering beats, retrying with backoff", why)
        self.retry_at = time.monotonic() + 1.0

    def _on_ack(self, record, metadata) -> None:
        if metadata.offset < 0:
            # DUPLICATE_SEQUENCE_NUMBER, which kafka-python reports as success without an
            # offset: the embedded broker answers a retry this way after a crash although the
            # batch is lost. Not trusted: sent again (a possible duplicate, never a loss).
            log.warning("a beat was acknowledged without an offset; sending it again")
            with self.lock:
                self.in_flight -= 1
                self.failed.append(record)
            return
        counted = record[3]
        with self.lock:
            self.in_flight -= 1
            self.acked += counted
            self.last_progress = time.monotonic()
        if counted:
            self.metrics.acked.inc()
        self.metrics.kafka.ok()
        if self.outage_since is not None:
            log.warning("Kafka reachable again after %.1f s", time.monotonic() - self.outage_since)
            self.outage_since = None

    def _on_error(self, record, exc: KafkaError) -> None:
        with self.lock:
            self.in_flight -= 1
            self.failed.append(record)
        self._outage(f"send failed: {type(exc).__name__}")

    def _update_gauge(self) -> None:
        self.metrics.buffered.set(len(self.waiting) + self.in_flight + len(self.failed))

    def pending(self) -> int:
        """Records not yet acknowledged."""
        return len(self.waiting) + self.in_flight + len(self.failed)

    def drain(self, timeout_s: float) -> bool:
        """Keep sending until everything is acknowledged or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while self.pending() and time.monotonic() < deadline:
            self.pump()
            try:
                self.producer.flush(timeout=1.0)
            except KafkaTimeoutError:
                continue
        return self.pending() == 0
