"""The stream worker: consume raw beats in micro-batches, repair them, publish, commit.

Each micro-batch goes through:

1. poll until `max_batch` records or `max_wait_ms` have passed;
2. prepare: decode, validate, admit against patient state (dead letters out here);
3. submit: hand the batch to the model, which runs the templates and one pass (by default
   in the model's own process, `stream.model_process`; else on an inference thread);
4. complete: build the repaired beats and alerts;
5. publish every message and flush the producer, retrying with backoff while the broker is
   away (nothing is committed until this succeeds);
6. commit the batch's offsets (at-least-once: a crash before this replays the batch, so
   subscribers de-duplicate by (patient_id, seq)).

Batches are pipelined two deep: while batch k is in the model, the main thread completes,
publishes and commits batch k-1 and polls, prepares and hands over batch k+1, which waits
beside the model, so on two cores Kafka I/O and the model overlap and the model goes from
one batch straight to the next. Batches finish strictly in order, and a batch that cannot
be published stops everything after it from being committed; counters move only once a
batch is published.

On a rebalance the revoked partitions' records that were polled but not yet prepared are
dropped (neither published nor committed: their next owner reads them again from the last
commit), and so is their patient state; batches already in the pipeline finish, and their
commit is refused if the partition moved (a replay by the new owner, never a loss). A
newly assigned partition starts at max(fetch position, committed offset), so a member that
missed generations does not replay what others published meanwhile.
SIGTERM/SIGINT end the loop after the batches in flight.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent import futures
from concurrent.futures import Future
from typing import TYPE_CHECKING

from kafka import ConsumerRebalanceListener, OffsetAndMetadata, TopicPartition
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
)

from stream.config import Config
from stream.kafka import make_consumer, make_producer, partition_lag, read_partition
from stream.metrics import WorkerMetrics
from stream.processor import Output, Prepared, Processor

if TYPE_CHECKING:
    from stream.engine import Engine
    from stream.model_process import ModelProcess

log = logging.getLogger(__name__)
BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
ACK_WAIT_S = 5.0  # no acknowledgement for this long: a failed produce or commit (then retried)
HEALTH_CHECK_S = 1.0  # how often an idle or polling worker checks its broker connections
PIPELINE_DEPTH = 2  # batches prepared ahead of the one being published
IDLE_POLL_MS = 10  # poll timeout with nothing pending (see poll_batch)
BUSY_WAIT_S = 0.05  # longest wait for the model between checks of the stop flag


class OffsetWentBackwards(RuntimeError):
    """A commit would move an offset backwards: a bug, never committed."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One consumer-group member: poll -> process -> publish -> commit."""

    def __init__(
        self,
        cfg: Config,
        engine: Engine | ModelProcess,
        metrics: WorkerMetrics | None = None,
        stop: threading.Event | None = None,
    ):
        self.cfg = cfg
        self.metrics = metrics or WorkerMetrics()
        self.stop = stop or threading.Event()
        self.worker_id = cfg.worker.worker_id or default_worker_id()
        self.processor = Processor(cfg, engine, self.metrics, self.worker_id)
        self.consumer = make_consumer(
            cfg.kafka, cfg.worker.group_id, max_poll_records=cfg.worker.max_batch
        )
        self.producer = make_producer(cfg.kafka, max_block_ms=5000)
        self.state_reader = make_consumer(cfg.kafka, None)  # the rhythm changelog, on assignment
        self.sweep_at = 0.0
        self.pending: list = []
        self.in_flight: deque[tuple[Prepared, Future]] = deque()
        self.committed: dict[tuple[str, int], int] = {}
        self.unaligned: set[TopicPartition] = set()  # assigned, position not yet checked
        self.batches = 0
        self.health_at = 0.0
        self.disconnected_since: float | None = None
        self.consumer.subscribe([cfg.topics.raw], listener=_Rebalance(self))

    # ------------------------------------------------------------------ main loop

    def run(self, max_batches: int = 0) -> None:
        """Run until stopped (or for max_batches batches); always leaves cleanly."""
        log.info(
            "worker %s consuming %s as group %s",
            self.worker_id,
            self.cfg.topics.raw,
            self.cfg.worker.group_id,
        )
        # Everything alive now (torch, the model, the clients) is long-lived: frozen, the
        # cyclic GC skips it, so a full collection takes ~6-10 ms instead of ~120 ms, which
        # showed up as the latency p99 (measured at 1,000 beats/s).
        gc.freeze()
        try:
            while not self.stop.is_set():
                self.poll_batch()
                if self.pending:
                    self.start_batch()
                oldest = self.in_flight[0][1] if self.in_flight else None
                if oldest and (oldest.done() or len(self.in_flight) >= PIPELINE_DEPTH):
                    self.finish_batch()
                if max_batches and self.batches >= max_batches:
                    break
                self.housekeeping()
        finally:
            self.close()

    def poll_batch(self) -> None:
        """Accumulate records until the batch is full or max_wait_ms has passed, or until the
        model is done with the batch in flight (publishing it first keeps latency low).

        While the model works, one poll takes what the last fetch brought and sends the next
        fetch; then the loop waits for the model instead of polling again. Each kafka-python
        poll costs the I/O process CPU and each fetch the broker; at 1,000 beats/s, polling
        every millisecond instead took ~10% of a core more and raised the p99 latency.
        """
        w = self.cfg.worker
        deadline = time.monotonic() + w.max_wait_ms / 1000
        busy = self.in_flight[-1][1] if self.in_flight else None
        polled_while_busy = False
        while len(self.pending) < w.max_batch and not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if (remaining <= 0 and self.pending) or (busy and busy.done()):
                break
            if busy and polled_while_busy:
                futures.wait([busy], timeout=max(0.0, remaining) if self.pending else BUSY_WAIT_S)
                continue
            if busy:
                timeout_ms = 0
                polled_while_busy = True
            elif self.pending:
                timeout_ms = max(1, int(remaining * 1000))
            else:
                # Idle. Kept short on purpose: kafka-python 3 can find no fetch in flight
                # right after a response lands, and then sleeps min(timeout, 100 ms) before
                # fetching again; with 200 ms that stall was the latency p99.
                timeout_ms = IDLE_POLL_MS
            polled = self.consumer.poll(
                timeout_ms=timeout_ms, max_records=w.max_batch - len(self.pending)
            )
            for records in polled.values():
                self.pending.extend(records)
            if self.unaligned:
                self.align_positions()
            if not self.pending and not busy:
                break
        self.update_lag()
        self.check_connection()

    def start_batch(self) -> None:
        """Prepare the pending records and queue their model pass."""
        records, self.pending = self.pending, []
        records.sort(key=lambda r: (r.partition, r.offset))
        batch = self.processor.prepare(records)
        self.in_flight.append((batch, self.processor.submit(batch)))

    def finish_batch(self) -> None:
        """Publish and commit the oldest batch in flight, and count what it published."""
        batch, inferred = self.in_flight.popleft()
        output = self.processor.complete(batch, inferred.result())
        started = time.perf_counter()
        if not self.publish(output):
            # Stopping while the broker is away: nothing of this batch or of the ones behind
            # it is committed; all of it is replayed by the next owner.
            self.in_flight.clear()
            return
        for counter, amount in output.counts.items():
            counter.inc(amount)
        done = time.time()
        for sent in output.sent_at:
            self.metrics.latency.observe(max(0.0, done - sent))
        self.commit(output.offsets)
        self.batches += 1
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ publish / commit

    def publish(self, output: Output) -> bool:
        """Send every message and flush; re-send what failed until it is all acknowledged.

        The producer keeps retrying on its own while the broker is away, so records still in
        flight are waited for, never sent a second time. Every ACK_WAIT_S without all the
        acknowledgements counts as a failed produce, so an outage shows in the metrics while
        the worker waits here.
        """
        todo = output.messages + [
            (self.cfg.topics.rhythm_state, key, value, partition)
            for partition, key, value in output.state
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
                return True
            self.metrics.kafka.failed("produce")
            if self._stopping_hard(attempt):
                log.error(
                    "stopping with %d unpublished outputs; the batch will be replayed",
                    len(todo) + len(in_flight),
                )
                return False
            if todo:
                delay = BACKOFF_S[min(resends, len(BACKOFF_S) - 1)]
                log.warning("publish failed for %d messages; retrying in %.2f s", len(todo), delay)
                time.sleep(delay)
                resends += 1
            else:
                log.warning("%d messages not acknowledged yet; waiting", len(in_flight))
            attempt += 1
        return True

    def _send(self, topic: str, key: bytes | None, value: bytes, partition: int | None = None):
        """producer.send(), or the KafkaTimeoutError it raised (resent on the next round)."""
        try:
            return self.producer.send(topic, key=key, value=value, partition=partition)
        except KafkaTimeoutError as exc:
            return exc

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Commit the next offsets to read, refusing to move any offset backwards."""
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
                # The group is re-forming and waits for this member: take part (poll), then
                # commit what this worker still owns. Without the poll the rebalance, and
                # this loop, would never end.
                self.take_part_in_rebalance()
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
                if self._stopping_hard(attempt):
                    return
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                log.warning("commit failed (%s); retrying in %.2f s", exc, delay)
                time.sleep(delay)
                attempt += 1
                continue
            self.metrics.commits.inc()
            self.metrics.kafka.ok()
            for tp, meta in to_commit.items():
                self.committed[(tp.topic, tp.partition)] = meta.offset
            return

    def take_part_in_rebalance(self) -> None:
        """One short poll, which rejoins the group; records it returns wait in `pending`."""
        room = max(1, self.cfg.worker.max_batch - len(self.pending))
        for records in self.consumer.poll(timeout_ms=100, max_records=room).values():
            self.pending.extend(records)

    def _stopping_hard(self, attempt: int) -> bool:
        """While stopping, give up after a few retries instead of blocking shutdown."""
        return self.stop.is_set() and attempt >= 3

    # ------------------------------------------------------------------ rebalance / lag

    def on_revoked(self, partitions) -> None:
        # Called inside poll(), which kafka-python 3 runs on its IO thread: a blocking call
        # such as commit() raises there, and the error ends poll() and the worker. So records
        # not published yet are not finished here: the prepared batches in flight that touch
        # a revoked partition and the pending records of every partition they touch are
        # dropped (nothing of them was published or committed), and the consumer is rewound
        # to the first of them, because kafka-python keeps a partition's position if it comes
        # back to this worker. Publishing them after the rejoin would only make duplicates.
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        first: dict[tuple[str, int], int] = {}
        kept: deque[tuple[Prepared, Future]] = deque()
        for batch, inferred in self.in_flight:
            if revoked.isdisjoint(batch.first_offsets):
                kept.append((batch, inferred))
                continue
            for key, offset in batch.first_offsets.items():
                first[key] = min(first.get(key, offset), offset)
        self.in_flight = kept
        rewound = revoked | set(first)
        for r in self.pending:
            key = (r.topic, r.partition)
            if key in rewound:
                first[key] = min(first.get(key, r.offset), r.offset)
        self.pending = [r for r in self.pending if (r.topic, r.partition) not in rewound]
        for (topic, partition), offset in first.items():
            with contextlib.suppress(ValueError):  # no longer assigned: nothing to rewind
                self.consumer.seek(TopicPartition(topic, partition), offset)
        numbers = [tp.partition for tp in partitions]
        resets = self.processor.registry.drop_partitions(numbers)
        self.processor.rhythm.drop(numbers)
        self.metrics.state_resets.inc(resets)
        for tp in partitions:
            self.committed.pop((tp.topic, tp.partition), None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(tp.partition))
        log.info("partitions revoked: %s", sorted(numbers))

    def on_assigned(self, partitions) -> None:
        self.unaligned = set(partitions)  # checked by the main loop (no blocking calls here)
        self.metrics.partitions.set(len(self.consumer.assignment()))
        log.info(
            "partitions assigned: %s (rhythm state comes from the changelog, templates and RR "
            "from the recent raw beats)",
            sorted(tp.partition for tp in partitions),
        )

    def align_positions(self) -> None:
        """Prepare each newly assigned partition before any of its records is processed:
        start it at max(fetch position, committed offset), then restore its patients'
        rhythm state from the changelog.

        kafka-python keeps a partition's fetch position when the partition is in both its
        old and new assignment, even if this member missed generations in between (the
        embedded broker can leave a member out of the group for seconds) while another
        member processed the partition and committed further. Resuming from the stale
        position would publish all of that again. A partition whose check or restore fails
        has its polled records put back (rewound) and is tried again after the next poll.
        """
        wait_ms = int(ACK_WAIT_S * 1000)
        for tp in list(self.unaligned):
            if tp not in self.consumer.assignment():
                self.unaligned.discard(tp)
                continue
            try:
                committed = self.consumer.committed(tp, timeout_ms=wait_ms)
                position = self.consumer.position(tp, timeout_ms=wait_ms)
                if committed is not None and position is not None and position < committed:
                    log.warning(
                        "%s[%d]: position %d is behind the committed offset %d (another "
                        "member got further); skipping ahead",
                        tp.topic,
                        tp.partition,
                        position,
                        committed,
                    )
                    self._hold_back(tp, committed)
                self.restore_rhythm(tp.partition)
                self.warm_up(tp, self._next_offset(tp, committed, position))
            except KafkaError as exc:
                log.warning("cannot prepare %s (%s); retrying after the next poll", tp, exc)
                self._hold_back(tp)
                continue
            self.unaligned.discard(tp)

    def _next_offset(self, tp: TopicPartition, committed, position) -> int:
        """The offset of the partition's next record to be processed: the first one already
        polled (pending), else the consumer's position, never below the committed offset."""
        polled = [
            r.offset for r in self.pending if (r.topic, r.partition) == (tp.topic, tp.partition)
        ]
        start = min(polled) if polled else position or 0
        return max(start, committed or 0)

    def _hold_back(self, tp: TopicPartition, offset: int | None = None) -> None:
        """Drop the polled records of a partition and seek to `offset` (default: the first
        of them), so that they are read again."""
        key = (tp.topic, tp.partition)
        held = [r.offset for r in self.pending if (r.topic, r.partition) == key]
        self.pending = [r for r in self.pending if (r.topic, r.partition) != key]
        if offset is None and held:
            offset = min(held)
        if offset is not None:
            self.consumer.seek(tp, offset)

    def restore_rhythm(self, partition: int) -> None:
        started = time.perf_counter()
        tp = TopicPartition(self.cfg.topics.rhythm_state, partition)
        records = read_partition(self.state_reader, tp, ACK_WAIT_S * 6)
        patients = self.processor.rhythm.restore(partition, records)
        self.metrics.rhythm_restore_seconds.observe(time.perf_counter() - started)
        if patients:
            log.info("partition %d: rhythm state of %d patients restored", partition, patients)

    def warm_up(self, tp: TopicPartition, start: int) -> None:
        """Rebuild the partition's patients' templates and RR history from the raw records
        just before `start` (`Processor.warm_up`), so that moved patients are not served
        cold. Bounded by worker.warmup_records, well inside max_poll_interval_ms."""
        count = self.cfg.worker.warmup_records
        if not count or start <= 0:
            return
        started = time.perf_counter()
        records = read_partition(self.state_reader, tp, ACK_WAIT_S * 6, start - count, start)
        beats = self.processor.warm_up(records)
        self.metrics.warmup_beats.inc(beats)
        self.metrics.warmup_seconds.observe(time.perf_counter() - started)
        log.info("partition %d: %d earlier beats re-read to warm its patients", tp.partition, beats)

    def housekeeping(self) -> None:
        """At most once a second: forget idle patients, and publish the signal-loss events
        of patients gone silent."""
        now = time.monotonic()
        if now < self.sweep_at:
            return
        self.sweep_at = now + HEALTH_CHECK_S
        output = self.processor.evict_idle()
        self.processor.rhythm.sweep(output)
        if (output.messages or output.state) and self.publish(output):
            for counter, amount in output.counts.items():
                counter.inc(amount)

    def update_lag(self) -> None:
        try:
            for partition, lag in partition_lag(self.consumer, self.consumer.assignment()).items():
                self.metrics.lag.labels(str(partition)).set(lag)
        except KafkaError:
            pass  # positions are unknown while (re)joining; the next batch updates them

    def check_connection(self) -> None:
        """Report broker connectivity while consuming (at most once per HEALTH_CHECK_S).

        An empty poll looks the same whether the topic is idle or the broker is gone: the
        consumer's own connection count tells them apart. Without this, a worker with nothing
        to publish would show ecg_kafka_connected 1 through a whole outage (and 0 while idle
        before its first publish).
        """
        now = time.monotonic()
        if now < self.health_at:
            return
        self.health_at = now + HEALTH_CHECK_S
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

    def close(self) -> None:
        """Finish what is in flight and pending, then leave the group and close the clients."""
        try:
            if self.pending:
                self.start_batch()
            while self.in_flight:
                self.finish_batch()
        finally:
            # Also after a failure (the model process died): what was not committed is
            # replayed by the partitions' next owner.
            try:
                self.consumer.close(autocommit=False)
                self.state_reader.close()
            finally:
                self.producer.close(timeout=5)
        log.info("worker %s stopped after %d batches", self.worker_id, self.batches)


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


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        self.worker.on_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.worker.on_assigned(assigned)
