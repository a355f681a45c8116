"""Prometheus metrics of the worker, the live evaluator and the simulator.

Each component owns a fresh CollectorRegistry so several can live in one process (tests).
Its families are declared as data in `metrics.yaml` (names, types, help, labels, in
exposition order) and built here; the code reaches each as the attribute its key names.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import NamedTuple

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

CATALOGUE = yaml.safe_load(Path(__file__).with_name("metrics.yaml").read_text())
KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class Family(NamedTuple):
    """One metric family: the attribute the code reaches it by, and what the wire shows.
    `labels` are in the order `.labels(...)` takes them positionally."""

    attr: str
    kind: type[MetricWrapperBase]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only

    def build(self, registry: CollectorRegistry) -> MetricWrapperBase:
        extra = {"buckets": self.buckets} if self.kind is Histogram else {}
        return self.kind(self.name, self.help, self.labels, registry=registry, **extra)


def build_families(owner: object, families: tuple[Family, ...], registry: CollectorRegistry):
    for family in families:
        setattr(owner, family.attr, family.build(registry))


def catalogue(component: str) -> tuple[Family, ...]:
    """One component's rows of metrics.yaml: `attr: {<kind>: name, help, labels, buckets}`."""
    families = []
    for attr, row in CATALOGUE[component].items():
        (kind,) = KINDS.keys() & row.keys()
        labels = tuple(row.get("labels", ()))
        buckets = tuple(CATALOGUE["buckets"][row.get("buckets", "latency")])
        families.append(Family(attr, KINDS[kind], row[kind], row["help"], labels, buckets))
    return tuple(families)


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

    FAMILIES = catalogue("kafka")

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
    FAMILIES = catalogue("worker")


class EvaluatorMetrics(ComponentMetrics):
    """Live repair quality, from joining repaired beats with the truth topic."""

    COMPONENT = "evaluator"
    FAMILIES = catalogue("evaluator")


class SimulatorMetrics(ComponentMetrics):
    """What the simulator sent, and what it holds while the broker is away."""

    COMPONENT = "simulator"
    FAMILIES = catalogue("simulator")


def serve(registry: CollectorRegistry, host: str, port: int):
    """Expose a registry on http://host:port/metrics (port 0 disables). Returns the server."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
