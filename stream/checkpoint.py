"""The worker's consumer offsets: committed only once the output behind them is published.

At-least-once: a batch's offsets reach the checkpoint only after the broker acknowledged every
message the batch produced, and are committed right after, so a crash in between replays the
batch (subscribers de-duplicate by (patient_id, seq)) and never skips it. An offset never
moves backwards.

On a rebalance the revoked partitions' records that were polled but not yet published are
dropped (neither published nor committed: their next owner reads them again from the last
commit), and so is their patient state; a batch being published finishes, and its commit is
refused if the partition moved (a replay by the new owner, never a loss).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError

from stream.intake import Intake, Key, earliest
from stream.metrics import WorkerMetrics
from stream.processor import Output, Prepared
from stream.publishing import Publisher
from stream.retry import ACK_WAIT_S, backoff_s, giving_up

if TYPE_CHECKING:
    from stream.worker import Worker

log = logging.getLogger("stream.worker")  # the worker's parts log as the worker


class OffsetWentBackwards(RuntimeError):
    """A commit would move an offset backwards: a bug, never committed."""


class Checkpoint:
    """The offsets of the batch being finished, and those this worker last committed."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        publisher: Publisher,
        intake: Intake,
        metrics: WorkerMetrics,
        stop: threading.Event,
    ):
        self.consumer = consumer
        self.publisher = publisher
        self.intake = intake  # takes the records a poll during a rebalance returns
        self.metrics = metrics
        self.stop = stop
        self.published: dict[Key, int] = {}  # next offsets to read, output acknowledged
        self.committed: dict[Key, int] = {}

    def publish(self, output: Output) -> bool:
        """Publish a batch's output (`Publisher.publish`); only once all of it is acknowledged
        are its offsets kept for `commit`. False: stopping with the batch unpublished."""
        if not self.publisher.publish(output):
            return False
        self.published.update(output.offsets)
        return True

    def commit(self) -> None:
        """Commit the published offsets, refusing to move any offset backwards."""
        offsets, self.published = self.published, {}
        to_commit = {}
        for (topic, partition), offset in offsets.items():
            previous = self.committed.get((topic, partition), -1)
            if offset < previous:
                raise OffsetWentBackwards(f"{topic}[{partition}]: {offset} < {previous}")
            to_commit[TopicPartition(topic, partition)] = OffsetAndMetadata(offset, "", -1)
        attempt = 0
        while to_commit:
            try:
                # Bounded, so that an outage is reported (and a stop honoured) while retrying.
                self.consumer.commit(offsets=to_commit, timeout_ms=int(ACK_WAIT_S * 1000))
            except RebalanceInProgressError:
                # The group is re-forming and waits for this member: take part (one short
                # poll, which rejoins; its records wait in the intake), then commit what this
                # worker still owns. Without the poll the rebalance, and this loop, would
                # never end.
                self.intake.poll(timeout_ms=100)
                owned = self.consumer.assignment()
                to_commit = {tp: m for tp, m in to_commit.items() if tp in owned}
                continue
            except CommitFailedError as exc:
                # The group rebalanced: these partitions now belong to someone else, who
                # will replay from the last commit (duplicates, never loss).
                self.metrics.commit_failures.inc()
                log.warning("commit refused after a rebalance (%s); batch will be replayed", exc)
                return
            except KafkaError as exc:
                self.metrics.commit_failures.inc()
                self.metrics.kafka.failed("commit")
                if giving_up(self.stop, attempt):
                    return
                delay = backoff_s(attempt)
                log.warning("commit failed (%s); retrying in %.2f s", exc, delay)
                time.sleep(delay)
                attempt += 1
                continue
            self.metrics.commits.inc()
            self.metrics.kafka.ok()
            for tp, meta in to_commit.items():
                self.committed[(tp.topic, tp.partition)] = meta.offset
            return

    def forget(self, keys: set[Key]) -> None:
        """Partitions this worker no longer owns: a later owner commits them."""
        for key in keys:
            self.committed.pop(key, None)


class Rebalance(ConsumerRebalanceListener):
    """The worker's part in a rebalance.

    Called inside poll(), which kafka-python 3 runs on its IO thread: a blocking call such as
    commit() raises there, and the error ends poll() and the worker. So nothing is finished
    here, and newly assigned partitions are prepared later by the main loop
    (`stream.takeover.Takeover`).
    """

    def __init__(self, worker: Worker):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        # Records not published yet are dropped: the prepared batches in flight that touch a
        # revoked partition and the polled records of every partition they touch (nothing of
        # them was published or committed). The consumer is rewound to the first of them,
        # because kafka-python keeps a partition's position if it comes back to this worker.
        # Publishing them after the rejoin would only make duplicates.
        w = self.worker
        keys = {(tp.topic, tp.partition) for tp in revoked}
        first = earliest(*(batch.first_offsets for batch in self._drop_batches(keys)))
        first = earliest(first, w.intake.drop(keys | set(first)))
        for (topic, partition), offset in first.items():
            with contextlib.suppress(ValueError):  # no longer assigned: nothing to rewind
                w.consumer.seek(TopicPartition(topic, partition), offset)
        numbers = [tp.partition for tp in revoked]
        w.metrics.state_resets.inc(w.processor.registry.drop_partitions(numbers))
        w.processor.rhythm.drop(numbers)
        w.checkpoint.forget(keys)
        w.health.forget(numbers)
        log.info("partitions revoked: %s", sorted(numbers))

    def on_partitions_assigned(self, assigned):
        self.worker.takeover.assigned(assigned)

    def _drop_batches(self, keys: set[Key]) -> list[Prepared]:
        """Take the batches that touch these partitions out of the pipeline."""
        in_flight = self.worker.in_flight
        dropped = [batch for batch, _ in in_flight if not keys.isdisjoint(batch.first_offsets)]
        kept = [entry for entry in in_flight if keys.isdisjoint(entry[0].first_offsets)]
        in_flight.clear()
        in_flight.extend(kept)
        return dropped
