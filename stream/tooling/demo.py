"""`ecg-stream demo`: the whole pipeline for about a minute, with a live summary and a report.

Starts the embedded broker (unless --bootstrap-servers points at a real Kafka), creates the
topics, runs N worker processes, the live evaluator and the simulator (16 MIT-BIH patients at
10x with mixed dropout by default), prints a summary every few seconds while the metrics
endpoints are up, then writes a Markdown report with PNGs of repaired beats.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from models.data import DataNotFoundError
from simulator.run import data_source
from stream.config import Config, embedded_profile
from stream.evaluate_live import LiveEvaluator
from stream.kafka import ensure_topics, scan_topic
from stream.metrics import EvaluatorMetrics, SimulatorMetrics, serve
from stream.tooling.broker import EmbeddedBroker, free_port
from stream.tooling.processes import (
    histogram_quantile,
    run_simulator,
    scrape,
    spawn_worker,
    stop_processes,
    total,
)

log = logging.getLogger(__name__)
SUMMARY_EVERY_S = 5.0


class Demo:
    """Owns the processes and threads of one demo run."""

    def __init__(self, cfg: Config, workers: int, out: Path):
        self.cfg, self.n_workers, self.out = cfg, workers, out
        self.procs: list[tuple[subprocess.Popen, int]] = []
        self.stop = threading.Event()
        self.sim_metrics = SimulatorMetrics()
        self.evaluator = LiveEvaluator(cfg, EvaluatorMetrics(), self.stop)
        self.evaluator_thread = threading.Thread(target=self.evaluator.run, daemon=True)
        self.sim_result = None
        self.synthetic = cfg.simulator.synthetic

    def start_workers(self, workdir: Path) -> None:
        """N worker processes sharing this machine's cores (torch threads split between them:
        oversubscribed torch threads slow every worker down many times)."""
        threads = max(1, (os.cpu_count() or 2) // self.n_workers)
        for i in range(self.n_workers):
            proc, port = spawn_worker(
                self.cfg,
                workdir,
                f"worker{i}",
                f"worker.worker_id=demo-worker-{i}",
                f"model.torch_threads={threads}",
            )
            self.procs.append((proc, port))
            print(f"  worker {i}: pid {proc.pid}, metrics http://127.0.0.1:{port}/metrics")

    def wait_until_ready(self, timeout_s: float = 90.0) -> None:
        """Wait until the workers between them own every partition of the raw topic."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            families = [f for _, port in self.procs for f in scrape(port)]
            if total(families, "ecg_assigned_partitions") >= self.cfg.kafka.partitions:
                return
            time.sleep(0.3)
        print("warning: workers did not take all partitions in time; starting anyway")

    def run_simulator(self) -> None:
        self.sim_result = run_simulator(self.cfg, self.stop, self.sim_metrics)

    def summary(self, elapsed: float, previous: float) -> float:
        families = [f for _, port in self.procs for f in scrape(port)]
        produced = total(families, "ecg_beats_produced_total")
        rate = (produced - previous) / SUMMARY_EVERY_S
        p50 = histogram_quantile(families, "ecg_end_to_end_latency_seconds", 0.5) * 1000
        p99 = histogram_quantile(families, "ecg_end_to_end_latency_seconds", 0.99) * 1000
        anomalies = {c: int(total(families, "ecg_anomalies_total", beat_class=c)) for c in "NSVFQ"}
        unrecoverable = int(total(families, "ecg_beats_produced_total", status="unrecoverable"))
        imputed = int(total(families, "ecg_samples_imputed_total"))
        sent = int(self.sim_metrics.sent._value.get())
        ev = self.evaluator
        print(
            f"[{elapsed:5.0f}s] sent {sent:>6}  repaired {int(produced):>6} ({rate:6.0f} beats/s)"
            f"  latency p50 {p50:5.1f} ms p99 {p99:6.1f} ms  imputed samples {imputed:>7}"
            f"  unrecoverable {unrecoverable}  anomalies {anomalies}"
            f"  episodes open {int(total(families, 'ecg_episodes_open'))}"
            f" events {int(total(families, 'ecg_events_total'))}"
            f"  live RMSE model {ev.rmse('model'):.4f} vs linear {ev.rmse('linear'):.4f}",
            flush=True,
        )
        return produced

    def wait_for_drain(self, timeout_s: float = 60.0) -> dict:
        """Wait until the workers have published everything the simulator sent (repaired or
        dead-lettered: their counters move once a batch is published, after consuming it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            families = [f for _, port in self.procs for f in scrape(port)]
            done = total(families, "ecg_beats_produced_total")
            done += total(families, "ecg_dlq_messages_total")
            if self.sim_result and done >= self.sim_result.sent:
                break
            time.sleep(0.5)
        return {"families": [f for _, port in self.procs for f in scrape(port)]}

    def shutdown(self) -> None:
        """Stop the evaluator and the workers (each leaves its group) before the broker goes."""
        self.stop.set()
        if self.evaluator_thread.is_alive():
            self.evaluator_thread.join(timeout=20)
        stop_processes([proc for proc, _ in self.procs])


def demo_partitions(cfg: Config, workers: int, requested: int | None, embedded: bool) -> int:
    """Partitions of the demo's topics: as requested; else one per worker on the embedded
    broker (its fetches cost more with every partition they read, so a worker's latency
    grows with its partitions); else kafka.partitions."""
    if requested:
        return requested
    return workers if embedded else cfg.kafka.partitions


def run_demo(
    cfg: Config, duration_s: float, workers: int, out: Path, partitions: int | None = None
) -> None:
    """Run the demo; print a live summary; write out/report.md and PNGs."""
    try:
        data_source(cfg)
    except DataNotFoundError as exc:
        print(
            f"NOTE: MIT-BIH data unavailable ({exc}).\n"
            "      Replaying SYNTHETIC beats instead: the numbers below are not clinical."
        )
        cfg = dataclasses.replace(cfg, simulator=dataclasses.replace(cfg.simulator, synthetic=True))
    cfg = dataclasses.replace(
        cfg, simulator=dataclasses.replace(cfg.simulator, truth=True, duration_s=duration_s)
    )
    broker = None
    if not cfg.kafka.bootstrap_servers:
        broker = EmbeddedBroker().start()
        cfg = embedded_profile(cfg, broker.bootstrap)
        print(f"embedded Kafka-protocol broker (Tansu) on {broker.bootstrap}")
    else:
        print(f"using Kafka at {cfg.kafka.bootstrap_servers}")
    kafka = dataclasses.replace(
        cfg.kafka, partitions=demo_partitions(cfg, workers, partitions, broker is not None)
    )
    cfg = dataclasses.replace(cfg, kafka=kafka)
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(cfg, workers, out)
    try:
        with tempfile.TemporaryDirectory(prefix="ecg-demo-") as tmp:
            ensure_topics(cfg.kafka, cfg.topics)
            demo.start_workers(Path(tmp))
            eval_port = free_port()
            serve(demo.evaluator.metrics.registry, "127.0.0.1", eval_port)
            print(f"  live evaluator: metrics http://127.0.0.1:{eval_port}/metrics")
            demo.evaluator_thread.start()
            demo.wait_until_ready()
            sim = threading.Thread(target=demo.run_simulator, daemon=True)
            started = time.monotonic()
            sim.start()
            print(
                f"simulating {cfg.simulator.patients} patients at {cfg.simulator.speed}x "
                f"for {duration_s:.0f} s with {workers} workers on "
                f"{cfg.kafka.partitions} partitions"
            )
            produced = 0.0
            while sim.is_alive():
                sim.join(timeout=SUMMARY_EVERY_S)
                produced = demo.summary(time.monotonic() - started, produced)
            final = demo.wait_for_drain()
            time.sleep(1.0)
            demo.summary(time.monotonic() - started, produced)
            report = write_report(cfg, demo, final["families"], out)
            for i in range(workers):
                (out / f"worker{i}.log").write_bytes((Path(tmp) / f"worker{i}.log").read_bytes())
    finally:
        demo.shutdown()
        if broker:
            broker.stop()
    print(f"report: {report}")


def sample_repaired(cfg: Config, limit: int = 12) -> list[dict]:
    """Some repaired beats with gaps, read back from the repaired topic."""
    beats = scan_topic(
        cfg.kafka,
        cfg.topics.repaired,
        lambda m: m["status"] == "repaired" and sum(m["imputed_mask"]) >= 8,
        lambda kept: len(kept) >= limit,
    )
    return beats[:limit]


def plot_grid(beats: list[dict], truth: dict, path: Path, title: str) -> None:
    """Original (green), masked input (red, dashed) and recovered (blue), as the reference
    notebook shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = max(1, -(-len(beats) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, msg in zip(axes.flat, beats):
        imputed = np.asarray(msg["imputed_mask"], bool)
        recovered = np.asarray(msg["samples"], float)
        t = np.arange(len(recovered)) / msg["fs"]
        original = truth.get((msg["patient_id"], msg["seq"]))
        if original is not None:
            ax.plot(t, original, color="green", lw=1, label="Original")
        ax.plot(t, recovered, color="blue", lw=1, label="Recovered")
        ax.plot(t, np.where(imputed, np.nan, recovered), "r--", lw=1, label="Masked input")
        ax.set_title(
            f"{msg['patient_id']} #{msg['seq']} ({int(imputed.sum())} imputed)", fontsize=8
        )
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(beats) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _by_type(families: list, name: str) -> dict:
    counts = {}
    for family in families:
        for sample in family.samples:
            if sample.name == name and sample.value:
                kind = sample.labels["type"]
                counts[kind] = counts.get(kind, 0) + int(sample.value)
    return dict(sorted(counts.items()))


def _per_patient_hour(families: list) -> str:
    hours = total(families, "ecg_patient_seconds_total") / 3600
    if not hours:
        return "-"
    events, alerts = total(families, "ecg_events_total"), total(families, "ecg_alerts_total")
    return f"{events / hours:.0f} / {alerts / hours:.0f} ({hours:.2f} patient-hours)"


def write_report(cfg: Config, demo: Demo, families: list, out: Path) -> Path:
    """report.md with the run's numbers and a PNG grid of repaired beats."""
    ev, res = demo.evaluator, demo.sim_result
    beats = sample_repaired(cfg)
    wanted = {(b["patient_id"], b["seq"]) for b in beats}
    truth = {
        (m["patient_id"], m["seq"]): m["samples"]
        for m in scan_topic(
            cfg.kafka,
            cfg.topics.truth,
            lambda m: (m["patient_id"], m["seq"]) in wanted,
            lambda kept: len(kept) >= len(wanted),
        )
    }
    label = "SYNTHETIC beats (no MIT-BIH data)" if demo.synthetic else "MIT-BIH DS2 records"
    plot_grid(beats, truth, out / "repaired_beats.png", f"Repaired beats - {label}")
    p50 = histogram_quantile(families, "ecg_end_to_end_latency_seconds", 0.5) * 1000
    p99 = histogram_quantile(families, "ecg_end_to_end_latency_seconds", 0.99) * 1000
    classes = {c: int(total(families, "ecg_beats_classified_total", beat_class=c)) for c in "NSVFQ"}
    anomalies = {c: int(total(families, "ecg_anomalies_total", beat_class=c)) for c in "NSVFQ"}
    lines = [
        "# ecg-stream demo report",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"- Source: {label}; {cfg.simulator.patients} patients at {cfg.simulator.speed}x; "
        f"{demo.n_workers} workers on {cfg.kafka.partitions} partitions; "
        f"broker {cfg.kafka.bootstrap_servers}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| beats sent / acknowledged | {res.sent} / {res.acked} |",
        f"| beats deliberately lost (seq skipped) | {res.skipped} |",
        f"| beats repaired (consumed) | {int(total(families, 'ecg_beats_produced_total'))} |",
        f"| unrecoverable beats | "
        f"{int(total(families, 'ecg_beats_produced_total', status='unrecoverable'))} |",
        f"| samples imputed | {int(total(families, 'ecg_samples_imputed_total'))} |",
        f"| dead letters | {int(total(families, 'ecg_dlq_messages_total'))} |",
        f"| end-to-end latency p50 / p99 | {p50:.1f} ms / {p99:.1f} ms |",
        f"| live masked-sample RMSE: model | {ev.rmse('model'):.4f} |",
        f"| live masked-sample RMSE: linear interpolation | {ev.rmse('linear'):.4f} |",
        f"| live classification accuracy | "
        f"{ev.correct / max(ev.classified, 1):.3f} ({ev.classified} beats) |",
        f"| predicted classes | {classes} |",
        f"| anomalies by class | {anomalies} |",
        f"| rhythm episodes started | {_by_type(families, 'ecg_episodes_started_total')} |",
        f"| events / per-beat alerts per patient-hour | {_per_patient_hour(families)} |",
        "",
        "![repaired beats](repaired_beats.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
