"""`ecg-stream bench`: one run, one process tree, one table (and a JSON file).

1. model-only throughput vs batch size: the shipped EcgNet (whole `repair` call, numpy in and
   out) and the reference notebook's pair (LSTM 64-32-64 autoencoder + 2-layer LSTM-64
   classifier, forward passes only);
2. the Kafka pass-through ceiling: a worker that decodes and re-publishes, no model;
3. the full worker (a real `ecg-stream worker` process) end to end through the broker, with
   BENCH_PATIENTS patients, so that its per-patient state is in the memory figure;
4. a naive worker: poll one, infer one, produce one, commit (max_batch = 1);
5. end-to-end latency p50/p95/p99 at fixed offered loads to one worker (from as many patients
   as beat at ~75/min: 800 at 1,000 beats/s), on a raw topic of SIZED_PARTITIONS partitions
   and of the configured count, next to the same load through the broker alone (no worker),
   which the embedded broker makes grow as it fills;
6. peak RSS of the worker process.

Throughputs are measured on a backlog produced beforehand, from the first to the last
consumed record (group join excluded). Latency is raw-record publish time to repaired-record
publish time, both Kafka CreateTime stamps from this host's clock.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from models.model import ReferenceAutoencoder, ReferenceClassifier
from stream.config import Config, embedded_profile, load_config, set_value
from stream.engine import Engine
from stream.kafka import assign_all, ensure_topics, make_consumer
from stream.messages import decode_raw
from stream.metrics import WorkerMetrics
from stream.processor import Output, Prepared, batch_offsets, resolved
from stream.rhythm_stage import RhythmStage
from stream.state import PatientRegistry
from stream.tooling.broker import EmbeddedBroker
from stream.tooling.processes import run_simulator, scrape, spawn_worker, stop_processes, total
from stream.worker import Worker

BATCH_SIZES = (1, 8, 32, 128, 256, 512, 1024)
BENCH_PATIENTS = 1000  # patients in the full-worker backlog (40 beats each: full templates)
REAL_TIME_BPM = 75  # heart rate of a simulated patient in the latency phase
# The latency phase's raw topic also gets this many partitions, beside the configured count:
# the README's sizing rule asks for one at these loads, and two leave room for a second
# worker. On the embedded broker latency grows with the partitions one worker fetches: a
# fetch costs it in proportion to the batches stored in each partition it reads.
SIZED_PARTITIONS = 2
WORKER_SCRAPE_S = 0.1  # how often a worker process's metrics are read while it is measured


def _rate(fn, beats: int, min_seconds: float) -> float:
    """Beats/s of fn() (one warm-up call, then repeated for at least min_seconds)."""
    fn()
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds and calls >= 3:
            return calls * beats / elapsed


def model_throughput(
    engine: Engine,
    min_seconds: float,
    batch_sizes=BATCH_SIZES,
    threads: int = 0,
    compare: Engine | None = None,
) -> list[dict]:
    """Beats/s of the shipped model and of the reference pair, per batch size (with `threads`
    torch threads; 0: the current setting), and of a `compare` model measured in turn with
    them (same inputs, same run: a ratio that holds on any machine)."""
    reference_ae, reference_cls = ReferenceAutoencoder().eval(), ReferenceClassifier().eval()
    rng = np.random.default_rng(0)
    rows = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    for b in batch_sizes:
        beats = rng.random((b, 187), dtype=np.float32)
        missing = rng.random((b, 187)) < 0.15
        lengths = np.full(b, 150)
        tensor = torch.from_numpy(beats)

        def served(model, beats=beats, missing=missing, lengths=lengths):
            return lambda: model.repair(beats, missing, beats, lengths)

        def reference(tensor=tensor):
            with torch.inference_mode():
                reference_ae(tensor)
                reference_cls(tensor)

        row = {
            "batch": b,
            "shipped": _rate(served(engine), b, min_seconds),
            "runtime": engine.runtime_for(b),
            "reference": _rate(reference, b, min_seconds),
            "threads": torch.get_num_threads(),
        }
        if compare is not None:
            row["compare"] = _rate(served(compare), b, min_seconds)
            row["compare_runtime"] = compare.runtime_for(b)
        rows.append(row)
    torch.set_num_threads(before)
    return rows


RECEIVE_POLL_MS = 10  # the broker-alone receiver polls as an idle worker does (IDLE_POLL_MS)


class PassThrough:
    """A processor without a model (the worker's `processor` argument): validate and
    re-publish each raw beat, so the worker's Kafka side is measured alone."""

    def __init__(self, cfg: Config, metrics: WorkerMetrics):
        self.cfg, self.metrics = cfg, metrics
        # Sequence checks only (the worker resets the registry on rebalances), and an idle
        # rhythm stage (the worker restores its changelog on assignment).
        self.registry = PatientRegistry()
        self.rhythm = RhythmStage(cfg, metrics, "pass-through", "bench")

    def prepare(self, records) -> Prepared:
        offsets, first = batch_offsets(records)
        out = Output(offsets=offsets)
        self.metrics.consumed.inc(len(records))
        for rec in records:
            decode_raw(rec.value, rec.key, self.cfg.worker.max_message_bytes)
            out.messages.append((self.cfg.topics.repaired, rec.key, rec.value))
            out.sent_at.append(time.time())
        return Prepared(out, [], None, first)

    def submit(self, batch: Prepared) -> Future:
        return resolved(None)

    def evict_idle(self) -> Output:
        return Output()

    def warm_up(self, records) -> int:
        return 0

    def complete(self, batch: Prepared, result: None) -> Output:
        return batch.out


def fresh(cfg: Config, tag: str, *overrides: str) -> Config:
    """A copy of cfg with its own topics and consumer group (cfg itself is left alone)."""
    out = copy.deepcopy(cfg)
    for key in ("raw", "truth", "repaired", "alerts", "dlq", "events", "rhythm_state"):
        setattr(out.topics, key, f"bench.{tag}.{key}")
    out.worker.group_id = f"bench-{tag}"
    for item in overrides:
        key, _, value = item.partition("=")
        set_value(out, key, value)
    return out


def produce_backlog(cfg: Config, beats: int, rate: float = 0.0, linger_ms: int = 20) -> int:
    """Publish `beats` simulated beats (as fast as possible, or at `rate`)."""
    sim = dataclasses.replace(
        cfg.simulator, beats=beats, speed=0.0, rate=rate, truth=False, duration_s=0.0
    )
    return run_simulator(dataclasses.replace(cfg, simulator=sim), linger_ms=linger_ms).sent


def count_rate(read_count, expected: int, timeout_s: float, every_s: float = 0.01) -> float:
    """Beats/s from the first consumed record to the last, reading a counter every every_s.
    (A worker process's counter is scraped over HTTP: each scrape costs the worker CPU, so
    those are read every WORKER_SCRAPE_S, not every 10 ms.)"""
    deadline = time.monotonic() + timeout_s
    first = None
    while time.monotonic() < deadline:
        done = read_count()
        now = time.monotonic()
        if first is None and done > 0:
            first = (now, done)
        if done >= expected:
            return (done - first[1]) / max(now - first[0], 1e-6) if first else float("nan")
        time.sleep(every_s)
    raise TimeoutError(f"only {read_count()} of {expected} records consumed")


def passthrough_throughput(cfg: Config, beats: int, engine: Engine) -> float:
    cfg = fresh(cfg, "pass")
    ensure_topics(cfg.kafka, cfg.topics)
    sent = produce_backlog(cfg, beats)
    metrics = WorkerMetrics()
    worker = Worker(cfg, engine, metrics, processor=PassThrough(cfg, metrics))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        return count_rate(lambda: metrics.consumed._value.get(), sent, 600)
    finally:
        worker.stop.set()
        thread.join(timeout=30)


class WorkerProcess:
    """A real `ecg-stream worker` subprocess with its metrics endpoint."""

    def __init__(self, cfg: Config, workdir: Path, name: str):
        self.proc, self.port = spawn_worker(cfg, workdir, name)

    def consumed(self) -> float:
        return total(scrape(self.port), "ecg_messages_consumed_total")

    def ready(self, partitions: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if total(scrape(self.port), "ecg_assigned_partitions") >= partitions:
                return
            time.sleep(0.2)
        raise TimeoutError("worker did not get its partitions")

    def peak_rss_mb(self) -> dict[str, float]:
        """Peak RSS (VmHWM) of the worker's processes: I/O, model and multiprocessing's
        resource tracker. Their sum (an upper bound: the peaks need not coincide) is the
        worker's figure."""
        pid = self.proc.pid
        peaks = {"io": _peak_rss_mb(pid)}
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            tracker = "resource_tracker" in Path(f"/proc/{child}/cmdline").read_text()
            peaks["resource tracker" if tracker else "model"] = _peak_rss_mb(int(child))
        return peaks

    def stop(self) -> None:
        stop_processes([self.proc], timeout_s=30)


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(ln for ln in status.splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def worker_throughput(
    cfg: Config, beats: int, workdir: Path, tag: str, *overrides: str
) -> tuple[float, dict[str, float]]:
    """(beats/s, peak RSS MB per process) of one worker draining a backlog."""
    cfg = fresh(cfg, tag, *overrides)
    ensure_topics(cfg.kafka, cfg.topics)
    sent = produce_backlog(cfg, beats)
    worker = WorkerProcess(cfg, workdir, tag)
    try:
        rate = count_rate(worker.consumed, sent, 900, WORKER_SCRAPE_S)
        return rate, worker.peak_rss_mb()
    finally:
        worker.stop()


def ward(offered: float) -> str:
    """The simulator override for `offered` beats/s from patients at ~75 beats/min each."""
    return f"simulator.patients={max(16, round(offered * 60 / REAL_TIME_BPM))}"


def sized(cfg: Config, partitions: int) -> str:
    """The override for topics with `partitions` partitions (0: as configured)."""
    return f"kafka.partitions={partitions or cfg.kafka.partitions}"


def latency_at(
    cfg: Config, offered: float, seconds: float, workdir: Path, partitions: int = 0
) -> dict:
    """Latency percentiles (ms) with `offered` beats/s to one worker for `seconds`, on topics
    with `partitions` partitions (0: as configured)."""
    tag = f"lat{int(offered)}p{partitions}"
    cfg = fresh(cfg, tag, ward(offered), sized(cfg, partitions))
    ensure_topics(cfg.kafka, cfg.topics)
    worker = WorkerProcess(cfg, workdir, tag)
    try:
        worker.ready(cfg.kafka.partitions)
        # Paced like devices: the configured linger, not the backlog's throughput setting.
        sent = produce_backlog(cfg, int(offered * seconds), offered, cfg.kafka.linger_ms)
        count_rate(worker.consumed, sent, 300, WORKER_SCRAPE_S)
    finally:
        worker.stop()
    raw = _stamps(cfg, cfg.topics.raw)
    out = _stamps(cfg, cfg.topics.repaired)
    return {
        "partitions": cfg.kafka.partitions,
        **_percentiles(offered, [(raw[k], out[k] - raw[k]) for k in raw if k in out]),
    }


def broker_latency_at(cfg: Config, offered: float, seconds: float, partitions: int = 0) -> dict:
    """The same paced load with no worker: raw publish -> a plain consumer receiving it.
    What the broker and the simulator's client add before any worker sees a beat."""
    cfg = fresh(cfg, f"base{int(offered)}p{partitions}", ward(offered), sized(cfg, partitions))
    ensure_topics(cfg.kafka, cfg.topics)
    consumer = make_consumer(cfg.kafka, None)
    assign_all(consumer, cfg.topics.raw, from_beginning=False)
    delays: list[tuple[float, float]] = []
    done = threading.Event()

    def receive():
        while not done.is_set():
            for records in consumer.poll(timeout_ms=RECEIVE_POLL_MS).values():
                now_ms = time.time() * 1000
                delays.extend((r.timestamp, now_ms - r.timestamp) for r in records)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        sent = produce_backlog(cfg, int(offered * seconds), offered, cfg.kafka.linger_ms)
        count_rate(lambda: len(delays), sent, 60)
    finally:
        done.set()
        thread.join(timeout=10)
        consumer.close()
    return {"partitions": cfg.kafka.partitions, **_percentiles(offered, delays)}


def _percentiles(offered: float, stamped: list[tuple[float, float]]) -> dict:
    """Percentiles of (created ms, latency ms) pairs: of the whole run, and the p99 of its
    first and second halves (by creation time), which shows a drift over the run."""
    created, latency = np.asarray(stamped, float).reshape(-1, 2).T
    second = created >= (created.min() + created.max()) / 2
    return {
        "offered": offered,
        "beats": int(len(latency)),
        **{f"p{q}_ms": float(np.percentile(latency, q)) for q in (50, 95, 99)},
        "p99_first_half_ms": float(np.percentile(latency[~second], 99)),
        "p99_second_half_ms": float(np.percentile(latency[second], 99)),
    }


def _stamps(cfg: Config, topic: str) -> dict:
    """(patient, seq) -> Kafka CreateTime (ms) of the first record of each beat."""
    import orjson

    consumer = make_consumer(cfg.kafka, None)
    stamps: dict = {}
    try:
        assign_all(consumer, topic)
        idle = time.monotonic()
        while time.monotonic() - idle < 3:
            for records in consumer.poll(timeout_ms=300, max_records=5000).values():
                idle = time.monotonic()
                for r in records:
                    m = orjson.loads(r.value)
                    stamps.setdefault((m["patient_id"], m["seq"]), r.timestamp)
        return stamps
    finally:
        consumer.close()


def run_benchmarks(cfg: Config, out: Path, quick: bool = False, compare: str = "") -> dict:
    """Run every benchmark; print a Markdown table; write out/bench.json. `compare`: another
    checkpoint whose model-only throughput is measured beside the shipped one's."""
    out.mkdir(parents=True, exist_ok=True)
    scale = 0.1 if quick else 1.0
    torch.set_num_threads(cfg.model.torch_threads)
    m = cfg.model
    engine = Engine.load(m.checkpoint, m.torch_threads, cfg.worker.max_batch, m.runtime)
    other = (
        Engine.load(compare, m.torch_threads, cfg.worker.max_batch, m.runtime) if compare else None
    )
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "model_version": engine.version,
        "compare_version": other.version if other else None,
        "max_batch": cfg.worker.max_batch,
        "max_wait_ms": cfg.worker.max_wait_ms,
    }
    print("1. model-only throughput", flush=True)
    results["model"] = model_throughput(engine, 0.3 if quick else 2.0, compare=other)
    cores = os.cpu_count() or 1
    if cores != cfg.model.torch_threads:
        # loaded with every core: ONNX Runtime's threads are fixed when its session is made,
        # and the warm-up chooses each size's runtime at that thread count
        wide = Engine.load(m.checkpoint, cores, cfg.worker.max_batch, m.runtime)
        torch.set_num_threads(m.torch_threads)
        results["model_all_cores"] = model_throughput(
            wide, 0.3 if quick else 2.0, (cfg.worker.max_batch,), cores
        )
    with tempfile.TemporaryDirectory(prefix="ecg-bench-") as tmp:
        n = int(20000 * scale)
        with kafka_for(cfg) as kcfg:
            print("2. Kafka pass-through ceiling", flush=True)
            results["passthrough"] = passthrough_throughput(kcfg, max(n, 2000), engine)
            print("3. full worker", flush=True)
            patients = max(int(BENCH_PATIENTS * scale), 16)
            rate, rss = worker_throughput(
                kcfg, 40 * patients, Path(tmp), "full", f"simulator.patients={patients}"
            )
            results["worker"], results["worker_peak_rss_mb"] = rate, sum(rss.values())
            results["worker_peak_rss_by_process_mb"] = rss
            results["worker_patients"], results["worker_beats"] = patients, 40 * patients
            print("4. naive worker", flush=True)
            results["naive"], _ = worker_throughput(
                kcfg,
                max(int(3000 * scale), 300),
                Path(tmp),
                "naive",
                "worker.max_batch=1",
                "worker.max_wait_ms=0",
            )
        print("5. latency at fixed offered loads", flush=True)
        results["latency"] = []
        results["broker_latency"] = []
        seconds = 5 if quick else 20
        for load in (250, 1000) if quick else (250, 1000, 2000):
            for partitions in sorted({SIZED_PARTITIONS, cfg.kafka.partitions}):
                with kafka_for(cfg) as kcfg:
                    results["latency"].append(
                        latency_at(kcfg, load, seconds, Path(tmp), partitions)
                    )
                with kafka_for(cfg) as kcfg:
                    results["broker_latency"].append(
                        broker_latency_at(kcfg, load, seconds, partitions)
                    )
    table = render(results)
    print(table)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "bench.md").write_text(table)
    return results


@contextlib.contextmanager
def kafka_for(cfg: Config):
    """cfg itself with a configured Kafka; otherwise cfg on a fresh embedded broker, stopped
    afterwards. The embedded broker keeps every record in memory and slows as it fills, so
    each latency load gets its own (a real cluster's old data does not slow new topics)."""
    if cfg.kafka.bootstrap_servers:
        yield cfg
        return
    broker = EmbeddedBroker().start()
    try:
        yield embedded_profile(cfg, broker.bootstrap)
    finally:
        broker.stop()


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{cpu}; {torch.get_num_threads()} torch threads; Python {platform.python_version()}"
        f"; torch {torch.__version__}"
    )


def render(r: dict) -> str:
    """The results as Markdown."""
    prod = (
        next(row for row in r["model"] if row["batch"] == r["max_batch"])
        if any(row["batch"] == r["max_batch"] for row in r["model"])
        else r["model"][-1]
    )
    lines = [
        f"Date {r['date']}; {r['machine']}; model {r['model_version']}; worker batching "
        f"max_batch={r['max_batch']}, max_wait_ms={r['max_wait_ms']}",
        "",
        "| batch | torch threads | shipped EcgNet (beats/s) | runtime | reference AE + "
        "classifier (beats/s) | ratio |"
        + (
            f" compared: {r['compare_version']} (beats/s, runtime) | shipped / compared |"
            if r.get("compare_version")
            else ""
        ),
        "|---:|---:|---:|---|---:|---:|" + ("---:|---:|" if r.get("compare_version") else ""),
    ]
    for row in r["model"] + r.get("model_all_cores", []):
        compared = (
            f" {row['compare']:,.0f} ({row['compare_runtime']}) | "
            f"{row['shipped'] / row['compare']:.2f}x |"
            if "compare" in row
            else (" | |" if r.get("compare_version") else "")
        )
        lines.append(
            f"| {row['batch']} | {row['threads']} | {row['shipped']:,.0f} | {row['runtime']} | "
            f"{row['reference']:,.0f} | {row['shipped'] / row['reference']:.1f}x |" + compared
        )
    lines += [
        "",
        "| pipeline | beats/s | note |",
        "|---|---:|---|",
        f"| Kafka pass-through (decode + re-publish, no model) | {r['passthrough']:,.0f} "
        "| ceiling |",
        f"| full worker, end to end | {r['worker']:,.0f} | "
        f"{r['worker'] / prod['shipped']:.0%} of model-only at batch {prod['batch']}"
        + "".join(
            f"; {r['worker'] / row['shipped']:.0%} of it on {row['threads']} threads"
            for row in r.get("model_all_cores", [])
        )
        + " |",
        f"| naive worker (one message at a time) | {r['naive']:,.0f} | full worker is "
        f"{r['worker'] / r['naive']:.1f}x faster |",
        "",
        f"Worker peak RSS: {r['worker_peak_rss_mb']:.0f} MB ("
        + " + ".join(
            f"{name} process {mb:.0f} MB"
            for name, mb in r.get("worker_peak_rss_by_process_mb", {}).items()
        )
        + f"; full worker: {r.get('worker_patients', '?')} patients, "
        f"{r.get('worker_beats', '?')} beats)",
        "",
        "| offered load (beats/s) | partitions | beats | p50 (ms) | p95 (ms) | p99 (ms) | p99 "
        "first / second half (ms) | broker alone, no worker: p50 / p95 / p99 (ms) | broker "
        "alone: p99 first / second half (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baselines = r.get("broker_latency") or [None] * len(r["latency"])
    for row, base in zip(r["latency"], baselines):
        alone = " / ".join(f"{base[f'p{q}_ms']:.1f}" for q in (50, 95, 99)) if base else ""
        lines.append(
            f"| {row['offered']:,.0f} | {row['partitions']} | {row['beats']} | "
            f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | "
            f"{_halves(row)} | {alone} | "
            f"{_halves(base) if base else ''} |"
        )
    return "\n".join(lines) + "\n"


def _halves(row: dict) -> str:
    return f"{row['p99_first_half_ms']:.1f} / {row['p99_second_half_ms']:.1f}"


if __name__ == "__main__":
    run_benchmarks(load_config(), Path("reports/bench"))
