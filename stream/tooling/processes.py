"""What the demo, the bench and the tests do around the product, written once: start
`ecg-stream` subprocesses, read their /metrics, stop them, run the simulator to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from simulator.run import SimulationResult, simulate
from stream.config import Config, as_dict
from stream.kafka import make_producer
from stream.metrics import SimulatorMetrics
from stream.tooling.broker import free_port


def metric_families(port: int, timeout_s: float = 5.0) -> list:
    """Metric families of a local /metrics endpoint; OSError while it does not answer."""
    url = f"http://127.0.0.1:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=timeout_s).read().decode()
    return list(text_string_to_metric_families(text))


def scrape(port: int) -> list:
    """metric_families(), or [] while the endpoint is not up."""
    try:
        return metric_families(port, timeout_s=2.0)
    except OSError:
        return []


def total(families: list, name: str, **labels) -> float:
    """Sum of a sample name over families, filtered by labels."""
    return sum(
        s.value
        for f in families
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def histogram_quantile(families: list, name: str, q: float) -> float:
    """A quantile from cumulative histogram buckets (linear within a bucket), like PromQL."""
    buckets: dict[float, float] = {}
    for f in families:
        for s in f.samples:
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] == 0:
        return float("nan")
    rank, lower, below = q * buckets[edges[-1]], 0.0, 0.0
    for le in edges:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower


def write_config(cfg: Config, path: Path) -> Path:
    """cfg as the YAML file a subprocess reads with --config."""
    path.write_text(yaml.safe_dump(as_dict(cfg)))
    return path


def spawn_cli(
    args: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """`ecg-stream ARGS` as a subprocess, stdout and stderr appended to log_path. ECG_CONFIG
    is dropped from the environment: the caller's --config must be the only config."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("ECG_CONFIG", None)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stream.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=full_env,
        )


def spawn_worker(
    cfg: Config,
    workdir: Path,
    name: str,
    *sets: str,
    env: dict | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen, int]:
    """An `ecg-stream worker` named `name` (its worker_id, workdir/name.yaml, workdir/name.log)
    with its metrics on a free loopback port; `sets` are further --set overrides. Returns
    (process, metrics port)."""
    port = free_port()
    path = write_config(cfg, workdir / f"{name}.yaml")
    args = ["worker", "--config", str(path), "--metrics-port", str(port)]
    for item in ("metrics.host=127.0.0.1", f"worker.worker_id={name}", *sets):
        args += ["--set", item]
    return spawn_cli(args, workdir / f"{name}.log", env=env, cwd=cwd), port


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGTERM all (each worker leaves its group), then wait; kill what does not stop."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_simulator(
    cfg: Config, stop=None, metrics: SimulatorMetrics | None = None, **producer_options
) -> SimulationResult:
    """The simulator in this thread, on its own producer, until its budget is spent or `stop`
    (a threading.Event) is set."""
    producer = make_producer(cfg.kafka, **producer_options)
    try:
        return simulate(cfg, producer, metrics or SimulatorMetrics(), stop)
    finally:
        producer.close()
