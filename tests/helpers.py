"""Helpers for the end-to-end tests: run workers (threads or processes), read topics fully."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import orjson

from stream.config import Config
from stream.engine import Engine
from stream.kafka import assign_all, make_consumer
from stream.metrics import WorkerMetrics
from stream.tooling.processes import (
    metric_families,
    run_simulator,  # noqa: F401 - the tests import it from here
    spawn_cli,
    spawn_worker,
    stop_processes,
    write_config,  # noqa: F401 - the tests import it from here
)
from stream.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "stream" / "schemas"
DEPLOY = ROOT / "deploy"


def read_topic(
    cfg: Config, topic: str, expected: int = 0, timeout_s: float = 60.0, idle_s: float = 3.0
) -> list:
    """Every record of a topic (all partitions, from the beginning). Stops when `expected`
    records arrived, or nothing new came for idle_s, or at timeout_s. Repaired beats count
    once per (patient_id, seq): a redelivered copy must not end the wait for a beat that is
    still being processed."""
    consumer = make_consumer(cfg.kafka, None)
    try:
        assign_all(consumer, topic)
        records, deadline, last_new = [], time.monotonic() + timeout_s, time.monotonic()
        repaired_beats, others = set(), 0
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            for recs in batch.values():
                records.extend(recs)
                for rec in recs:
                    key = repaired_key(rec.value)
                    if key is None:
                        others += 1
                    else:
                        repaired_beats.add(key)
            if batch:
                last_new = time.monotonic()
            if expected and len(repaired_beats) + others >= expected:
                break
            if not expected and time.monotonic() - last_new > idle_s:
                break
            if expected and time.monotonic() - last_new > max(idle_s, 15.0):
                break
        return records
    finally:
        consumer.close()


def repaired_key(value: bytes) -> tuple[str, int] | None:
    """(patient_id, seq) of a repaired beat; None for anything else."""
    try:
        msg = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(msg, dict) or "imputed_mask" not in msg:
        return None
    return beat_key(msg)


def decode(records) -> list[dict]:
    return [orjson.loads(r.value) for r in records]


class ThreadWorker:
    """A worker running in a thread of the test process (for in-process metrics)."""

    def __init__(self, cfg: Config, engine: Engine):
        self.metrics = WorkerMetrics()
        self.stop = threading.Event()
        self.worker = Worker(cfg, engine, self.metrics, self.stop)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)


def start_process(args: list[str], cfg_path: Path, log_path: Path, env: dict | None = None):
    """`ecg-stream ARGS --config cfg_path` as a subprocess, output to log_path."""
    return spawn_cli([*args, "--config", str(cfg_path)], log_path, env=env, cwd=ROOT)


def scrape(port: int) -> dict[str, float]:
    """127.0.0.1:port/metrics as {'name{labels}': value}; OSError while it does not answer."""
    out = {}
    for family in metric_families(port):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric_sum(samples: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


# --------------------------------------------------------------------------- fault tests


def start_worker(
    cfg: Config, tmp_path: Path, name: str, *sets: str, env: dict | None = None
) -> tuple[subprocess.Popen, int]:
    """One `ecg-stream worker` process named `name` (worker_id, log file), with its own
    metrics port. Returns (process, metrics port)."""
    return spawn_worker(cfg, tmp_path, name, *sets, env=env, cwd=ROOT)


def wait_for_metrics(port: int, proc=None, timeout_s: float = 90.0) -> dict[str, float]:
    """Block until 127.0.0.1:port/metrics answers (failing early if `proc` exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process {proc.pid} exited with {proc.returncode}")
        try:
            return scrape(port)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"metrics on port {port} never came up")


def try_scrape(port: int) -> dict[str, float] | None:
    """scrape(), or None when the endpoint does not answer."""
    try:
        return scrape(port)
    except OSError:
        return None


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def beat_key(msg: dict) -> tuple[str, int] | None:
    """(patient_id, seq) of a raw or repaired beat; for a dead letter, of the beat inside its
    payload (None when the payload is not a beat)."""
    if "payload_b64" in msg:
        import base64

        try:
            msg = orjson.loads(base64.b64decode(msg["payload_b64"]))
        except (ValueError, TypeError):
            return None
        if not isinstance(msg, dict):
            return None
    if "patient_id" not in msg or "seq" not in msg:
        return None
    return (msg["patient_id"], msg["seq"])


class TopicFollower:
    """Reads topics from the beginning and keeps following them, counting the beats seen
    per (patient_id, seq). Never trusts end offsets: it counts what it consumed."""

    def __init__(self, cfg: Config, *topics: str):
        from collections import Counter

        from kafka import TopicPartition

        self.counts: Counter = Counter()
        self.messages = 0
        self.bytes = 0
        self.last_new = time.monotonic()
        self.consumer = make_consumer(cfg.kafka, None)
        parts = []
        for topic in topics:
            for p in sorted(self.consumer.partitions_for_topic(topic) or ()):
                parts.append(TopicPartition(topic, p))
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning()

    def poll(self, timeout_ms: int = 300) -> int:
        new = 0
        for recs in self.consumer.poll(timeout_ms=timeout_ms, max_records=5000).values():
            for r in recs:
                self.bytes += len(r.value)
                key = beat_key(orjson.loads(r.value))
                if key is not None:
                    self.counts[key] += 1
                new += 1
        self.messages += new
        if new:
            self.last_new = time.monotonic()
        return new

    def follow(self, until, timeout_s: float, idle_s: float = 0.0) -> bool:
        """Poll until until(self) is true (then until nothing new came for idle_s), or
        timeout_s passed. Returns whether until() became true."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if until(self):
                while time.monotonic() < deadline and time.monotonic() - self.last_new < idle_s:
                    self.poll()
                return True
        return until(self)

    def keys(self) -> set:
        return set(self.counts)

    def duplicates(self) -> int:
        """Beats seen more than once (each extra copy counts)."""
        return sum(n - 1 for n in self.counts.values())

    def close(self) -> None:
        self.consumer.close()


def start_workers(cfg: Config, tmp_path: Path, n: int, first: int = 0):
    """n worker processes named w{first}..; returns [(process, metrics port)]."""
    return [start_worker(cfg, tmp_path, f"w{i}") for i in range(first, first + n)]


def stop_workers(procs) -> None:
    """SIGTERM every worker, then wait (kill what does not stop)."""
    stop_processes([proc for proc, _ in procs])


def wait_for_stable_group(partitions: int, ports, timeout_s: float = 90.0) -> None:
    """Until every worker owns partitions and together they own each partition once.

    Needed before a SIGTERM: the embedded broker (Tansu) never finishes a rebalance whose
    leader left mid-way."""
    deadline = time.monotonic() + timeout_s
    owned: list = []
    while time.monotonic() < deadline:
        owned = [metric_sum(try_scrape(port) or {}, "ecg_assigned_partitions") for port in ports]
        if all(owned) and sum(owned) == partitions:
            return
        time.sleep(0.3)
    raise AssertionError(f"the group did not settle in {timeout_s} s: {owned}")


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.2) -> None:
    """Until `condition()` holds; an AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def consumed(port: int) -> float:
    """Raw messages a worker has consumed so far (0 while its endpoint is not up)."""
    return metric_sum(try_scrape(port) or {}, "ecg_messages_consumed_total")


class EventFollower(TopicFollower):
    """Follows the events topic, keeping each event once (by event_id) in arrival order."""

    def __init__(self, cfg: Config):
        super().__init__(cfg, cfg.topics.events)
        self.events: dict[str, dict] = {}
        self.copies = 0

    def poll(self, timeout_ms: int = 300) -> int:
        new = 0
        for recs in self.consumer.poll(timeout_ms=timeout_ms, max_records=5000).values():
            for r in recs:
                msg = orjson.loads(r.value)
                self.copies += 1
                if msg["event_id"] not in self.events:
                    self.events[msg["event_id"]] = msg
                    new += 1
        if new:
            self.last_new = time.monotonic()
        return new

    def of(self, patient_id: str, type_: str | None = None, kind: str | None = None) -> list:
        return [
            e
            for e in self.events.values()
            if e["patient_id"] == patient_id
            and type_ in (None, e["type"])
            and kind in (None, e["kind"])
        ]


def in_thread(fn, *args):
    """Run fn(*args) in a thread; returns (thread, result dict with 'value' or 'error')."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def joined(thread, result, timeout_s: float):
    thread.join(timeout=timeout_s)
    assert not thread.is_alive(), f"still running after {timeout_s} s"
    if "error" in result:
        raise result["error"]
    return result["value"]
