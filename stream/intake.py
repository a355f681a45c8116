"""The records a worker has polled and not yet prepared into a batch.

Besides the main loop, a rebalance (dropping a revoked partition's records) and the takeover
of a new partition (holding records back until its position is checked) change them, so they
live in one place that all three share.
"""

from __future__ import annotations

from kafka import KafkaConsumer

Key = tuple[str, int]  # (topic, partition)


def earliest(*offsets: dict[Key, int]) -> dict[Key, int]:
    """The lowest offset of each partition over several {partition: offset} maps."""
    first: dict[Key, int] = {}
    for mapping in offsets:
        for key, offset in mapping.items():
            first[key] = min(first.get(key, offset), offset)
    return first


class Intake:
    """Polled records in poll order, at most `capacity` (worker.max_batch) of them."""

    def __init__(self, consumer: KafkaConsumer, capacity: int):
        self.consumer = consumer
        self.capacity = capacity
        self.records: list = []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def full(self) -> bool:
        return len(self.records) >= self.capacity

    def poll(self, timeout_ms: int) -> None:
        """One consumer poll for as many records as there is room for (at least one)."""
        room = max(1, self.capacity - len(self.records))
        for records in self.consumer.poll(timeout_ms=timeout_ms, max_records=room).values():
            self.records.extend(records)

    def take(self) -> list:
        """Every record, for the next batch; the intake is empty afterwards."""
        records, self.records = self.records, []
        return records

    def first_offset(self, key: Key) -> int | None:
        """The lowest offset polled for a partition (None: none polled)."""
        return min((r.offset for r in self.records if (r.topic, r.partition) == key), default=None)

    def drop(self, keys: set[Key]) -> dict[Key, int]:
        """Forget the records of these partitions; returns each one's lowest dropped offset,
        where the consumer must seek to read them again."""
        first: dict[Key, int] = {}
        kept = []
        for r in self.records:
            key = (r.topic, r.partition)
            if key in keys:
                first[key] = min(first.get(key, r.offset), r.offset)
            else:
                kept.append(r)
        self.records = kept
        return first
