"""Prometheus metrics of the worker, the live evaluator and the simulator.

Naming: one prefix (`ecg_`), base units, `_total` on counters, no patient id as a label.
Each component owns a fresh CollectorRegistry so several can live in one process (tests).
"""

from __future__ import annotations

import os
import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Per-batch inference can sit well under 5 ms, where the client's default buckets start.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def process_info(registry: CollectorRegistry, component: str) -> Gauge:
    """`ecg_process_info{component, process}` = 1: who exports these series, whatever job or
    instance a scrape gives them. Rules and dashboard select components and de-duplicate
    series scraped twice on these labels (deploy/README.md, "Scrape-independent monitoring")."""
    info = Gauge(
        "ecg_process_info",
        "This process (value is always 1): component, and process = hostname-pid",
        ["component", "process"],
        registry=registry,
    )
    info.labels(component, f"{socket.gethostname()}-{os.getpid()}").set(1)
    return info


class KafkaHealth:
    """Broker connectivity, shared by every component that talks to Kafka."""

    def __init__(self, registry: CollectorRegistry):
        self.connected = Gauge(
            "ecg_kafka_connected",
            "1 while the last Kafka operation succeeded, else 0",
            registry=registry,
        )
        self.errors = Counter(
            "ecg_kafka_errors_total", "Failed Kafka operations", ["operation"], registry=registry
        )
        self.connected.set(0)

    def ok(self) -> None:
        self.connected.set(1)

    def failed(self, operation: str) -> None:
        self.connected.set(0)
        self.errors.labels(operation).inc()


class WorkerMetrics:
    """Everything a stream worker exports."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.info = process_info(r, "worker")
        self.kafka = KafkaHealth(r)
        self.consumed = Counter("ecg_messages_consumed_total", "Raw messages consumed", registry=r)
        self.produced = Counter(
            "ecg_beats_produced_total",
            "Beats published to the repaired topic, by status (complete, repaired, unrecoverable)",
            ["status"],
            registry=r,
        )
        self.dlq = Counter(
            "ecg_dlq_messages_total",
            "Messages sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.alerts = Counter("ecg_alerts_total", "Alerts published", ["type"], registry=r)
        self.samples_missing = Counter(
            "ecg_samples_missing_total", "Signal samples that arrived missing", registry=r
        )
        self.samples_imputed = Counter(
            "ecg_samples_imputed_total", "Missing samples filled by the model", registry=r
        )
        self.lost = Counter(
            "ecg_beats_lost_total",
            "Beats never received (gaps in a patient's sequence numbers)",
            registry=r,
        )
        self.classified = Counter(
            "ecg_beats_classified_total",
            "Beats by predicted AAMI class",
            ["beat_class"],
            registry=r,
        )
        self.anomalies = Counter(
            "ecg_anomalies_total",
            "Beats flagged anomalous, by predicted AAMI class",
            ["beat_class"],
            registry=r,
        )
        self.batch_size = Histogram(
            "ecg_batch_size", "Beats per model batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "ecg_inference_seconds",
            "Model time per batch: templates and the pass, measured where they run",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "ecg_batch_seconds",
            "Publishing a computed batch: send, flush to acknowledgement and commit",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "ecg_end_to_end_latency_seconds",
            "Simulator/device publish to repaired-beat publish",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "ecg_consumer_lag",
            "Records behind the high watermark, per partition",
            ["partition"],
            registry=r,
        )
        self.partitions = Gauge(
            "ecg_assigned_partitions", "Partitions assigned to this worker", registry=r
        )
        self.patients = Gauge(
            "ecg_patients_tracked", "Patients with template state in memory", registry=r
        )
        self.state_resets = Counter(
            "ecg_state_resets_total",
            "Partitions whose per-patient state was dropped or rebuilt after a rebalance",
            registry=r,
        )
        self.commits = Counter("ecg_commits_total", "Offset commits", registry=r)
        self.commit_failures = Counter(
            "ecg_commit_failures_total", "Failed offset commits", registry=r
        )
        self.model_info = Gauge(
            "ecg_model_info",
            "The loaded model (value is always 1)",
            ["version", "threshold"],
            registry=r,
        )
        self.events = Counter(
            "ecg_events_total",
            "Rhythm-episode events published, by kind (open, update, close) and episode type",
            ["kind", "type"],
            registry=r,
        )
        self.episodes_started = Counter(
            "ecg_episodes_started_total",
            "Rhythm episodes started, by type (whole short episodes included)",
            ["type"],
            registry=r,
        )
        self.episodes_open = Gauge(
            "ecg_episodes_open", "Rhythm episodes open now, by type", ["type"], registry=r
        )
        self.patient_seconds = Counter(
            "ecg_patient_seconds_total",
            "Patient time covered by the beats processed (sum of known RR intervals): the "
            "denominator of alerts and events per patient-hour",
            registry=r,
        )
        self.evicted = Counter(
            "ecg_patients_evicted_total",
            "Patients forgotten: idle (worker.patient_idle_s) or over worker.max_patients",
            ["reason"],
            registry=r,
        )
        self.device_resets = Counter(
            "ecg_device_resets_total",
            "Device resets recognised (new session id, or seq numbering restarted)",
            registry=r,
        )
        self.rhythm_restored = Counter(
            "ecg_rhythm_patients_restored_total",
            "Patients whose rhythm-stage state was restored from the changelog on assignment",
            registry=r,
        )
        self.warmup_beats = Counter(
            "ecg_warmup_beats_total",
            "Raw beats re-read on assignment to rebuild templates and RR history (not published)",
            registry=r,
        )
        self.warmup_seconds = Histogram(
            "ecg_warmup_seconds",
            "Re-reading a newly assigned partition's recent raw beats",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rhythm_restore_seconds = Histogram(
            "ecg_rhythm_restore_seconds",
            "Reading a partition's rhythm changelog on assignment",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )


class EvaluatorMetrics:
    """Live repair quality, from joining repaired beats with the truth topic."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.info = process_info(r, "evaluator")
        self.kafka = KafkaHealth(r)
        self.evaluated = Counter(
            "ecg_live_beats_evaluated_total",
            "Repaired beats matched with their ground truth",
            registry=r,
        )
        self.squared_error = Counter(
            "ecg_live_squared_error_total",
            "Sum of squared errors over imputed samples, by method (model, linear)",
            ["method"],
            registry=r,
        )
        self.masked_samples = Counter(
            "ecg_live_masked_samples_total", "Imputed samples evaluated", registry=r
        )
        self.rmse = Gauge(
            "ecg_live_rmse", "Masked-sample RMSE since start, by method", ["method"], registry=r
        )
        self.correct = Counter(
            "ecg_live_class_correct_total",
            "Classified beats whose class matches the truth",
            registry=r,
        )
        self.classified = Counter(
            "ecg_live_class_evaluated_total", "Classified beats compared with the truth", registry=r
        )
        self.accuracy = Gauge(
            "ecg_live_accuracy", "Classification accuracy since start", registry=r
        )
        self.pending = Gauge("ecg_live_pending", "Beats waiting for their other half", registry=r)


class SimulatorMetrics:
    """What the simulator sent, and what it holds while the broker is away."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.info = process_info(r, "simulator")
        self.kafka = KafkaHealth(r)
        self.sent = Counter("ecg_sim_beats_sent_total", "Beats handed to the producer", registry=r)
        self.acked = Counter(
            "ecg_sim_beats_acked_total", "Beats acknowledged by the broker", registry=r
        )
        self.retried = Counter(
            "ecg_sim_beats_retried_total", "Beats re-sent after a failure", registry=r
        )
        self.dropped = Counter(
            "ecg_sim_beats_dropped_total",
            "Beats discarded because the send buffer was full",
            registry=r,
        )
        self.skipped = Counter(
            "ecg_sim_beats_skipped_total",
            "Beats deliberately not sent (simulated lost beats)",
            registry=r,
        )
        self.buffered = Gauge(
            "ecg_sim_buffered_beats", "Beats sent but not yet acknowledged", registry=r
        )


def serve(registry: CollectorRegistry, host: str, port: int):
    """Expose a registry on http://host:port/metrics (port 0 disables). Returns the server."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
