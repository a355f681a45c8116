"""The stream worker: consume raw beats in micro-batches, repair them, publish, commit.

Each micro-batch goes through:

1. poll until `max_batch` records or `max_wait_ms` have passed;
2. prepare: decode, validate, admit against patient state (dead letters out here);
3. submit: hand the batch to the model, which runs the templates and one pass (by default
   in the model's own process, `stream.model_process`; else on an inference thread);
4. complete: build the repaired beats and alerts;
5. publish every message and flush the producer, retrying with backoff while the broker is
   away (nothing is committed until this succeeds; `stream.publishing`);
6. commit the batch's offsets (at-least-once: a crash before this replays the batch, so
   subscribers de-duplicate by (patient_id, seq); `stream.checkpoint`).

Batches are pipelined two deep: while batch k is in the model, the main thread completes,
publishes and commits batch k-1 and polls, prepares and hands over batch k+1, which waits
beside the model, so on two cores Kafka I/O and the model overlap and the model goes from
one batch straight to the next. Batches finish strictly in order, and a batch that cannot
be published stops everything after it from being committed; counters move only once a
batch is published.

A rebalance drops what the revoked partitions have not published yet (`stream.checkpoint`);
a newly assigned partition is taken over before its first record is processed
(`stream.takeover`). SIGTERM/SIGINT end the loop after the batches in flight.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent import futures
from concurrent.futures import Future

from stream.checkpoint import Checkpoint, Rebalance
from stream.config import Config
from stream.health import Health
from stream.intake import Intake
from stream.kafka import make_consumer, make_producer
from stream.metrics import WorkerMetrics
from stream.model_api import ServedModel
from stream.processor import BatchProcessor, Prepared, Processor
from stream.publishing import Publisher
from stream.takeover import Takeover

log = logging.getLogger(__name__)
PIPELINE_DEPTH = 2  # batches prepared ahead of the one being published
IDLE_POLL_MS = 10  # poll timeout with nothing pending (see poll_batch)
BUSY_WAIT_S = 0.05  # longest wait for the model between checks of the stop flag
SWEEP_S = 1.0  # how often idle patients are forgotten and silent ones reported


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One consumer-group member: poll -> process -> publish -> commit."""

    def __init__(
        self,
        cfg: Config,
        engine: ServedModel,
        metrics: WorkerMetrics | None = None,
        stop: threading.Event | None = None,
        processor: BatchProcessor | None = None,
    ):
        """`processor`: what turns batches into output (default: the model's Processor; the
        bench passes one without a model to measure the Kafka side alone)."""
        self.cfg = cfg
        self.worker_id = cfg.worker.worker_id or default_worker_id()
        self.metrics = metrics or WorkerMetrics()
        self.stop = stop or threading.Event()
        self.processor = processor or Processor(cfg, engine, self.metrics, self.worker_id)
        self.consumer = make_consumer(
            cfg.kafka, cfg.worker.group_id, max_poll_records=cfg.worker.max_batch
        )
        self.producer = make_producer(cfg.kafka, max_block_ms=5000)
        self.state_reader = make_consumer(cfg.kafka, None)  # the rhythm changelog, on assignment
        self.intake = Intake(self.consumer, cfg.worker.max_batch)
        self.in_flight: deque[tuple[Prepared, Future]] = deque()
        self.publisher = Publisher(self.producer, cfg.topics.rhythm_state, self.metrics, self.stop)
        self.checkpoint = Checkpoint(
            self.consumer, self.publisher, self.intake, self.metrics, self.stop
        )
        self.takeover = Takeover(cfg, self.consumer, self.state_reader, self.intake, self.metrics)
        self.health = Health(self.consumer, self.metrics)
        self.sweep_at = 0.0
        self.batches = 0
        self.consumer.subscribe([cfg.topics.raw], listener=Rebalance(self))

    def run(self, max_batches: int = 0) -> None:
        """Run until stopped (or for max_batches batches); always leaves cleanly."""
        log.info(
            "worker %s consuming %s as group %s",
            self.worker_id,
            self.cfg.topics.raw,
            self.cfg.worker.group_id,
        )
        # Everything alive now (torch, the model, the clients) is long-lived: frozen, the
        # cyclic GC skips it, so a full collection no longer walks the model and the clients
        # and its pauses stop showing as the latency p99.
        gc.freeze()
        try:
            while not self.stop.is_set():
                self.poll_batch()
                if self.intake:
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
        poll costs the I/O process CPU and each fetch the broker: polling every millisecond
        instead costs CPU in both and raises the p99 latency.
        """
        deadline = time.monotonic() + self.cfg.worker.max_wait_ms / 1000
        busy = self.in_flight[-1][1] if self.in_flight else None
        polled_while_busy = False
        while not self.intake.full and not self.stop.is_set():
            remaining = deadline - time.monotonic()
            if (remaining <= 0 and self.intake) or (busy and busy.done()):
                break
            if busy and polled_while_busy:
                futures.wait([busy], timeout=max(0.0, remaining) if self.intake else BUSY_WAIT_S)
                continue
            if busy:
                timeout_ms = 0
                polled_while_busy = True
            elif self.intake:
                timeout_ms = max(1, int(remaining * 1000))
            else:
                # Idle. Kept short on purpose: kafka-python 3 can find no fetch in flight
                # right after a response lands, and then sleeps min(timeout, 100 ms) before
                # fetching again; a longer idle timeout makes that stall the latency p99.
                timeout_ms = IDLE_POLL_MS
            self.intake.poll(timeout_ms)
            if self.takeover.waiting:
                self.takeover.prepare(self.processor)
            if not self.intake and not busy:
                break
        self.health.check()

    def start_batch(self) -> None:
        """Prepare the polled records and queue their model pass."""
        records = sorted(self.intake.take(), key=lambda r: (r.partition, r.offset))
        batch = self.processor.prepare(records)
        self.in_flight.append((batch, self.processor.submit(batch)))

    def finish_batch(self) -> None:
        """Publish and commit the oldest batch in flight, and time its end-to-end latency."""
        batch, inferred = self.in_flight.popleft()
        output = self.processor.complete(batch, inferred.result())
        started = time.perf_counter()
        if not self.checkpoint.publish(output):
            # Stopping while the broker is away: nothing of this batch or of the ones behind
            # it is committed; all of it is replayed by the next owner.
            self.in_flight.clear()
            return
        done = time.time()
        for sent in output.sent_at:
            self.metrics.latency.observe(max(0.0, done - sent))
        self.checkpoint.commit()
        self.batches += 1
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def housekeeping(self) -> None:
        """At most once per SWEEP_S: forget idle patients, and publish the signal-loss events
        of patients gone silent."""
        now = time.monotonic()
        if now < self.sweep_at:
            return
        self.sweep_at = now + SWEEP_S
        output = self.processor.evict_idle()
        self.processor.rhythm.sweep(output)
        if output.messages or output.state:
            self.publisher.publish(output)

    def close(self) -> None:
        """Finish what is in flight and polled, then leave the group and close the clients."""
        try:
            if self.intake:
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
