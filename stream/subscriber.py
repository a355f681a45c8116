"""The subscriber's kit: the published JSON schemas and bounded de-duplication.

The pipeline delivers at least once: after a worker crash or a rebalance, the batch that was
published but not yet committed is published again. Its copies arrive soon after the
originals, so a subscriber needs to remember only recent messages, not every message ever
seen. This module imports only the standard library, so a monitoring system can use it
without the model stack (or copy it).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable
from importlib import resources

SCHEMA_VERSION = 1


def schema_names() -> list[str]:
    """The published schemas of this version: alert, dead-letter, event, raw-beat, ..."""
    suffix = f".v{SCHEMA_VERSION}.json"
    files = resources.files("stream").joinpath("schemas").iterdir()
    return sorted(f.name.removesuffix(suffix) for f in files if f.name.endswith(suffix))


def load_schema(name: str, version: int = SCHEMA_VERSION) -> dict:
    """A packaged JSON schema (draft 2020-12) by name, e.g. load_schema("repaired-beat")."""
    path = resources.files("stream").joinpath("schemas", f"{name}.v{version}.json")
    if not path.is_file():
        raise ValueError(f"no schema {name!r} v{version}; published: {', '.join(schema_names())}")
    return json.loads(path.read_text())


def message_key(msg: dict) -> Hashable | None:
    """What identifies a message across redeliveries, by its shape; None = not de-duplicated.

    A repaired beat is (patient_id, seq, timestamp): the timestamp tells a device's sessions
    apart, because a rebooted device numbers its beats from the start again. An alert adds its
    type to that; an event has its own event_id.
    """
    if "event_id" in msg:
        return ("event", msg["event_id"])
    if not ("patient_id" in msg and "seq" in msg):
        return None
    beat = (msg["patient_id"], msg["seq"], msg.get("timestamp"))
    if "imputed_mask" in msg:
        return ("beat", *beat)
    if "type" in msg:
        return ("alert", *beat, msg["type"])
    return None


class Deduplicator:
    """Remembers the last `capacity` message keys; older ones are forgotten.

    Size it to cover the longest redelivery: all the messages published in the time a crashed
    worker's batch can stay uncommitted (the consumer session timeout plus a restart), e.g.
    1,000 patients x 1.25 beats/s x 60 s = 75,000 keys. Each key costs about 230 bytes
    (CPython 3.11, tests/e2e/test_subscriber.py).
    """

    def __init__(self, capacity: int = 100_000):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self.duplicates = 0

    def seen(self, msg: dict) -> bool:
        """True if this message is a copy of one seen recently; records it otherwise."""
        key = message_key(msg)
        if key is None:
            return False
        if key in self._keys:
            self._keys.move_to_end(key)
            self.duplicates += 1
            return True
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._keys)
