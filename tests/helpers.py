"""Helpers for the end-to-end tests: run workers (threads or processes), read topics fully."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stream.config import Config, as_dict
from stream.kafka import assign_all, make_consumer
from stream.metrics import WorkerMetrics
from stream.processor import Engine
from stream.worker import Worker

ROOT = Path(__file__).resolve().parents[1]


def read_topic(
    cfg: Config, topic: str, expected: int = 0, timeout_s: float = 60.0, idle_s: float = 3.0
) -> list:
    """Every record of a topic (all partitions, from the beginning). Stops when `expected`
    records arrived, or nothing new came for idle_s, or at timeout_s."""
    consumer = make_consumer(cfg.kafka, None)
    try:
        assign_all(consumer, topic)
        records, deadline, last_new = [], time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300)
            for recs in batch.values():
                records.extend(recs)
            if batch:
                last_new = time.monotonic()
            if expected and len(records) >= expected:
                break
            if not expected and time.monotonic() - last_new > idle_s:
                break
            if expected and time.monotonic() - last_new > max(idle_s, 15.0):
                break
        return records
    finally:
        consumer.close()


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


def write_config(cfg: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(as_dict(cfg)))
    return path


def start_process(args: list[str], cfg_path: Path, log_path: Path, env: dict | None = None):
    """`ecg-stream ARGS --config cfg_path` as a subprocess, output to log_path."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    full_env = {**os.environ, **(env or {})}
    full_env.pop("ECG_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "stream.cli", *args, "--config", str(cfg_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=full_env,
    )


def scrape(port: int) -> dict[str, float]:
    """Prometheus text from 127.0.0.1:port/metrics as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric_sum(samples: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))
