"""Prometheus metrics of the worker, the live evaluator and the simulator.

Naming: one prefix (`ecg_`), base units, `_total` on counters, no patient id as a label.
Each component owns a fresh CollectorRegistry so several can live in one process (tests).
Families are declared as data, one `Family` row each, and built in the order of their rows
(the order of the exposition); the code reaches each as the attribute its row names.
"""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

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


class Family(NamedTuple):
    """One metric family: the attribute the code reaches it by, and what the wire shows.
    `labels` are in the order `.labels(...)` takes them positionally."""

    attr: str
    kind: type[MetricWrapperBase]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS  # histograms only: most of them are timings

    def build(self, registry: CollectorRegistry) -> MetricWrapperBase:
        extra = {"buckets": self.buckets} if self.kind is Histogram else {}
        return self.kind(self.name, self.help, self.labels, registry=registry, **extra)


def build_families(owner: object, families: tuple[Family, ...], registry: CollectorRegistry):
    for family in families:
        setattr(owner, family.attr, family.build(registry))


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

    # fmt: off
    FAMILIES = (
        Family("connected", Gauge, "ecg_kafka_connected",
            "1 while the last Kafka operation succeeded, else 0"),
        Family("errors", Counter, "ecg_kafka_errors_total", "Failed Kafka operations",
            ("operation",)),
    )
    # fmt: on

    def __init__(self, registry: CollectorRegistry):
        build_families(self, self.FAMILIES, registry)
        self.connected.set(0)

    def ok(self) -> None:
        self.connected.set(1)

    def failed(self, operation: str) -> None:
        self.connected.set(0)
        self.errors.labels(operation).inc()


class ComponentMetrics:
    """What every component exports (who it is, its broker health), then its own FAMILIES."""

    COMPONENT: str
    FAMILIES: tuple[Family, ...]

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.info = process_info(self.registry, self.COMPONENT)
        self.kafka = KafkaHealth(self.registry)
        build_families(self, self.FAMILIES, self.registry)


class WorkerMetrics(ComponentMetrics):
    """Everything a stream worker exports."""

    COMPONENT = "worker"
    # fmt: off
    FAMILIES = (
        Family("consumed", Counter, "ecg_messages_consumed_total", "Raw messages consumed"),
        Family("produced", Counter, "ecg_beats_produced_total",
            "Beats published to the repaired topic, by status (complete, repaired, unrecoverable)",
            ("status",)),
        Family("dlq", Counter, "ecg_dlq_messages_total", "Messages sent to the dead-letter topic",
            ("reason",)),
        Family("alerts", Counter, "ecg_alerts_total", "Alerts published", ("type",)),
        Family("samples_missing", Counter, "ecg_samples_missing_total",
            "Signal samples that arrived missing"),
        Family("samples_imputed", Counter, "ecg_samples_imputed_total",
            "Missing samples filled by the model"),
        Family("lost", Counter, "ecg_beats_lost_total",
            "Beats never received (gaps in a patient's sequence numbers)"),
        Family("classified", Counter, "ecg_beats_classified_total", "Beats by predicted AAMI class",
            ("beat_class",)),
        Family("anomalies", Counter, "ecg_anomalies_total",
            "Beats flagged anomalous, by predicted AAMI class", ("beat_class",)),
        Family("batch_size", Histogram, "ecg_batch_size", "Beats per model batch",
            buckets=BATCH_SIZE_BUCKETS),
        Family("inference", Histogram, "ecg_inference_seconds",
            "Model time per batch: templates and the pass, measured where they run"),
        Family("batch_seconds", Histogram, "ecg_batch_seconds",
            "Publishing a computed batch: send, flush to acknowledgement and commit"),
        Family("latency", Histogram, "ecg_end_to_end_latency_seconds",
            "Simulator/device publish to repaired-beat publish"),
        Family("lag", Gauge, "ecg_consumer_lag", "Records behind the high watermark, per partition",
            ("partition",)),
        Family("partitions", Gauge, "ecg_assigned_partitions",
            "Partitions assigned to this worker"),
        Family("patients", Gauge, "ecg_patients_tracked", "Patients with template state in memory"),
        Family("state_resets", Counter, "ecg_state_resets_total",
            "Partitions whose per-patient state was dropped or rebuilt after a rebalance"),
        Family("commits", Counter, "ecg_commits_total", "Offset commits"),
        Family("commit_failures", Counter, "ecg_commit_failures_total", "Failed offset commits"),
        Family("model_info", Gauge, "ecg_model_info", "The loaded model (value is always 1)",
            ("version", "threshold")),
        Family("model_throughput", Gauge, "ecg_model_throughput_beats_per_second",
            "Beats/s of one model pass at the largest batch, measured at start-up on this CPU"),
        Family("events", Counter, "ecg_events_total",
            "Rhythm-episode events published, by kind (open, update, close) and episode type",
            ("kind", "type")),
        Family("episodes_started", Counter, "ecg_episodes_started_total",
            "Rhythm episodes started, by type (whole short episodes included)", ("type",)),
        Family("episodes_open", Gauge, "ecg_episodes_open", "Rhythm episodes open now, by type",
            ("type",)),
        Family("patient_seconds", Counter, "ecg_patient_seconds_total",
            "Patient time covered by the beats processed (sum of known RR intervals): the "
            "denominator of alerts and events per patient-hour"),
        Family("evicted", Counter, "ecg_patients_evicted_total",
            "Patients forgotten: idle (worker.patient_idle_s) or over worker.max_patients",
            ("reason",)),
        Family("device_resets", Counter, "ecg_device_resets_total",
            "Device resets recognised (new session id, or seq numbering restarted)"),
        Family("rhythm_restored", Counter, "ecg_rhythm_patients_restored_total",
            "Patients whose rhythm-stage state was restored from the changelog on assignment"),
        Family("warmup_beats", Counter, "ecg_warmup_beats_total",
            "Raw beats re-read on assignment to rebuild templates and RR history (not published)"),
        Family("warmup_seconds", Histogram, "ecg_warmup_seconds",
            "Re-reading a newly assigned partition's recent raw beats"),
        Family("rhythm_restore_seconds", Histogram, "ecg_rhythm_restore_seconds",
            "Reading a partition's rhythm changelog on assignment"),
    )
    # fmt: on


class EvaluatorMetrics(ComponentMetrics):
    """Live repair quality, from joining repaired beats with the truth topic."""

    COMPONENT = "evaluator"
    # fmt: off
    FAMILIES = (
        Family("evaluated", Counter, "ecg_live_beats_evaluated_total",
            "Repaired beats matched with their ground truth"),
        Family("squared_error", Counter, "ecg_live_squared_error_total",
            "Sum of squared errors over imputed samples, by method (model, linear)", ("method",)),
        Family("masked_samples", Counter, "ecg_live_masked_samples_total",
            "Imputed samples evaluated"),
        Family("rmse", Gauge, "ecg_live_rmse", "Masked-sample RMSE since start, by method",
            ("method",)),
        Family("correct", Counter, "ecg_live_class_correct_total",
            "Classified beats whose class matches the truth"),
        Family("classified", Counter, "ecg_live_class_evaluated_total",
            "Classified beats compared with the truth"),
        Family("accuracy", Gauge, "ecg_live_accuracy", "Classification accuracy since start"),
        Family("pending", Gauge, "ecg_live_pending", "Beats waiting for their other half"),
    )
    # fmt: on


class SimulatorMetrics(ComponentMetrics):
    """What the simulator sent, and what it holds while the broker is away."""

    COMPONENT = "simulator"
    # fmt: off
    FAMILIES = (
        Family("sent", Counter, "ecg_sim_beats_sent_total", "Beats handed to the producer"),
        Family("acked", Counter, "ecg_sim_beats_acked_total", "Beats acknowledged by the broker"),
        Family("retried", Counter, "ecg_sim_beats_retried_total", "Beats re-sent after a failure"),
        Family("dropped", Counter, "ecg_sim_beats_dropped_total",
            "Beats discarded because the send buffer was full"),
        Family("skipped", Counter, "ecg_sim_beats_skipped_total",
            "Beats deliberately not sent (simulated lost beats)"),
        Family("buffered", Gauge, "ecg_sim_buffered_beats", "Beats sent but not yet acknowledged"),
    )
    # fmt: on


def serve(registry: CollectorRegistry, host: str, port: int):
    """Expose a registry on http://host:port/metrics (port 0 disables). Returns the server."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
