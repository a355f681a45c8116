"""Publishing a batch's output, retried until the broker acknowledged every message.

Nothing of a batch is committed until all of its messages (repaired beats, alerts, events,
dead letters and the rhythm changelog records) are acknowledged, so a broker outage holds the
worker here, retrying with backoff, instead of losing output. The batch's counters move only
once it is published.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from stream.metrics import WorkerMetrics
from stream.processor import Output
from stream.retry import ACK_WAIT_S, backoff_s, giving_up

log = logging.getLogger("stream.worker")  # the worker's parts log as the worker


class Publisher:
    """Sends a batch's output with one producer and waits for its acknowledgements."""

    def __init__(
        self,
        producer: KafkaProducer,
        state_topic: str,
        metrics: WorkerMetrics,
        stop: threading.Event,
    ):
        self.producer = producer
        self.state_topic = state_topic  # where `Output.state` (the rhythm changelog) goes
        self.metrics = metrics
        self.stop = stop

    def publish(self, output: Output) -> bool:
        """Send every message and flush; re-send what failed until it is all acknowledged,
        then add the output's counts. False: stopping with messages unpublished.

        The producer keeps retrying on its own while the broker is away, so records still in
        flight are waited for, never sent a second time. Every ACK_WAIT_S without all the
        acknowledgements counts as a failed produce, so an outage shows in the metrics while
        the worker waits here.
        """
        todo = output.messages + [
            (self.state_topic, key, value, partition) for partition, key, value in output.state
        ]
        in_flight = []
        attempt = resends = 0
        while todo or in_flight:
            in_flight += [(msg, self._send(*msg)) for msg in todo]
            with contextlib.suppress(KafkaTimeoutError):
                self.producer.flush(timeout=ACK_WAIT_S)
            todo = [msg for msg, fut in in_flight if _done(fut) and not _confirmed(fut)]
            in_flight = [(msg, fut) for msg, fut in in_flight if not _done(fut)]
            if not todo and not in_flight:
                self.metrics.kafka.ok()
                break
            self.metrics.kafka.failed("produce")
            if giving_up(self.stop, attempt):
                log.error(
                    "stopping with %d unpublished outputs; the batch will be replayed",
                    len(todo) + len(in_flight),
                )
                return False
            if todo:
                delay = backoff_s(resends)
                log.warning("publish failed for %d messages; retrying in %.2f s", len(todo), delay)
                time.sleep(delay)
                resends += 1
            else:
                log.warning("%d messages not acknowledged yet; waiting", len(in_flight))
            attempt += 1
        for counter, amount in output.counts.items():
            counter.inc(amount)
        return True

    def _send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None):
        """producer.send(), or the KafkaTimeoutError it raised (resent on the next round)."""
        try:
            return self.producer.send(topic, key=key, value=value, partition=partition)
        except KafkaTimeoutError as exc:
            return exc


def _done(future) -> bool:
    return isinstance(future, Exception) or future.is_done


def _confirmed(future) -> bool:
    """Acknowledged with an offset. A broker that lost an in-flight batch in a crash may
    answer its retry with DUPLICATE_SEQUENCE_NUMBER, which kafka-python reports as success
    with offset -1: the embedded broker does this after a restart although the batch is
    gone. Such records are sent again (a possible duplicate, never a loss)."""
    if isinstance(future, Exception) or not future.succeeded():
        return False
    return future.value.offset >= 0
