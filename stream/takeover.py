"""Taking over a newly assigned partition before any of its records is processed.

Its position is checked against the committed offset, its patients' rhythm state is restored
from the changelog, and their templates and RR history are rebuilt from the raw beats just
before where this worker starts, so moved patients are neither replayed nor served cold.

kafka-python keeps a partition's fetch position when the partition is in both its old and new
assignment, even if this member missed generations in between (the embedded broker can leave
a member out of the group for seconds) while another member processed the partition and
committed further. Resuming from the stale position would publish all of that again, so a
partition starts at max(fetch position, committed offset).
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from stream.config import Config
from stream.intake import Intake
from stream.kafka import read_partition
from stream.metrics import WorkerMetrics
from stream.processor import BatchProcessor
from stream.retry import ACK_WAIT_S

log = logging.getLogger("stream.worker")  # the worker's parts log as the worker
READ_WAIT_S = ACK_WAIT_S * 6  # to read a partition's changelog or recent raw beats


class Takeover:
    """The partitions assigned and not yet prepared, and how to prepare them.

    The rebalance listener only notes them (`assigned`): it runs inside poll(), where no
    blocking call may be made; the main loop prepares them after its next poll (`prepare`).
    """

    def __init__(
        self,
        cfg: Config,
        consumer: KafkaConsumer,
        state_reader: KafkaConsumer,
        intake: Intake,
        metrics: WorkerMetrics,
    ):
        self.cfg = cfg
        self.consumer = consumer
        self.state_reader = state_reader  # reads the changelog and the raw beats before a start
        self.intake = intake
        self.metrics = metrics
        self.waiting: set[TopicPartition] = set()

    def assigned(self, partitions) -> None:
        self.waiting = set(partitions)
        self.metrics.partitions.set(len(self.consumer.assignment()))
        log.info(
            "partitions assigned: %s (rhythm state comes from the changelog, templates and RR "
            "from the recent raw beats)",
            sorted(tp.partition for tp in partitions),
        )

    def prepare(self, processor: BatchProcessor) -> None:
        """Start each waiting partition at max(fetch position, committed offset), then restore
        its patients into `processor`. A partition whose check or restore fails has its polled
        records put back (rewound) and is tried again after the next poll."""
        wait_ms = int(ACK_WAIT_S * 1000)
        for tp in list(self.waiting):
            if tp not in self.consumer.assignment():
                self.waiting.discard(tp)
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
                self.restore_rhythm(processor, tp.partition)
                self.warm_up(processor, tp, self._next_offset(tp, committed, position))
            except KafkaError as exc:
                log.warning("cannot prepare %s (%s); retrying after the next poll", tp, exc)
                self._hold_back(tp)
                continue
            self.waiting.discard(tp)

    def restore_rhythm(self, processor: BatchProcessor, partition: int) -> None:
        started = time.perf_counter()
        tp = TopicPartition(self.cfg.topics.rhythm_state, partition)
        records = read_partition(self.state_reader, tp, READ_WAIT_S)
        patients = processor.rhythm.restore(partition, records)
        self.metrics.rhythm_restore_seconds.observe(time.perf_counter() - started)
        if patients:
            log.info("partition %d: rhythm state of %d patients restored", partition, patients)

    def warm_up(self, processor: BatchProcessor, tp: TopicPartition, start: int) -> None:
        """Rebuild the partition's patients' templates and RR history from the raw records
        just before `start` (`Processor.warm_up`). Bounded by worker.warmup_records, well
        inside max_poll_interval_ms."""
        count = self.cfg.worker.warmup_records
        if not count or start <= 0:
            return
        started = time.perf_counter()
        records = read_partition(self.state_reader, tp, READ_WAIT_S, start - count, start)
        beats = processor.warm_up(records)
        self.metrics.warmup_beats.inc(beats)
        self.metrics.warmup_seconds.observe(time.perf_counter() - started)
        log.info("partition %d: %d earlier beats re-read to warm its patients", tp.partition, beats)

    def _next_offset(self, tp: TopicPartition, committed, position) -> int:
        """The offset of the partition's next record to be processed: the first one already
        polled, else the consumer's position, never below the committed offset."""
        polled = self.intake.first_offset((tp.topic, tp.partition))
        start = polled if polled is not None else position or 0
        return max(start, committed or 0)

    def _hold_back(self, tp: TopicPartition, offset: int | None = None) -> None:
        """Drop the polled records of a partition and seek to `offset` (default: the first
        of them), so that they are read again."""
        key = (tp.topic, tp.partition)
        first = self.intake.drop({key}).get(key)
        if offset is None:
            offset = first
        if offset is not None:
            self.consumer.seek(tp, offset)
