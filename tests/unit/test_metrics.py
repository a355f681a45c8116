"""The metric families as declared (stream/metrics.yaml rows) are what Prometheus scrapes, and what
the README's metrics table documents."""

from __future__ import annotations

import re

import pytest
from prometheus_client import Counter, Gauge, Histogram

from stream.metrics import EvaluatorMetrics, KafkaHealth, SimulatorMetrics, WorkerMetrics
from tests.helpers import ROOT

COMPONENTS = (WorkerMetrics, EvaluatorMetrics, SimulatorMetrics)
TYPES = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}
PROCESS_INFO = ("ecg_process_info", "gauge", ("component", "process"))


def wire_name(name: str, kind: str) -> str:
    """The client strips `_total` from a counter's family name; the exposition puts it back."""
    return f"{name}_total" if kind == "counter" else name


def scraped(metrics) -> list[tuple[str, str, tuple[str, ...]]]:
    """[(name, type, label names)] in exposition order, each labelled family given one child so
    its labels show; a sample lists them in the order `.labels(...)` takes them positionally."""
    for owner, families in (
        (metrics, type(metrics).FAMILIES),
        (metrics.kafka, KafkaHealth.FAMILIES),
    ):
        for family in families:
            if family.labels:
                getattr(owner, family.attr).labels(*family.labels)
    found = []
    for metric in metrics.registry.collect():
        labels = next((tuple(s.labels) for s in metric.samples if "le" not in s.labels), ())
        found.append((wire_name(metric.name, metric.type), metric.type, labels))
    return found


def declared(component) -> list[tuple[str, str, tuple[str, ...]]]:
    rows = [*KafkaHealth.FAMILIES, *component.FAMILIES]
    return [PROCESS_INFO] + [(f.name, TYPES[f.kind], f.labels) for f in rows]


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.COMPONENT)
def test_every_declared_family_is_scraped_as_declared_and_in_order(component):
    assert scraped(component()) == declared(component)


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.COMPONENT)
def test_each_row_is_reached_by_its_own_attribute(component):
    attrs = [f.attr for f in component.FAMILIES]
    assert len(set(attrs)) == len(attrs)
    assert not {"registry", "info", "kafka"} & set(attrs)
    metrics = component()
    for family in component.FAMILIES:
        (metric,) = getattr(metrics, family.attr).collect()
        assert wire_name(metric.name, metric.type) == family.name


def expand(spec: str) -> list[tuple[str, tuple[str, ...]]]:
    """`name{l1,l2}`: one metric and its labels; `a_{x,y}_total`: a_x_total and a_y_total."""
    if labelled := re.fullmatch(r"(\w+)(?:\{([\w,]+)\})?", spec):
        name, labels = labelled.groups()
        return [(name, tuple(labels.split(",")) if labels else ())]
    head, middles, tail = re.fullmatch(r"(\w*)\{([\w,]+)\}(\w+)", spec).groups()
    return [(head + middle + tail, ()) for middle in middles.split(",")]


def readme_table() -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """{metric: (type or None where the row gives none, labels)} from README "## Metrics"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        types = [t.strip() for t in cells[1].split(",") if t.strip()]
        types = types * len(names) if len(types) == 1 else types or [None] * len(names)
        assert len(types) == len(names), line
        for spec, kind in zip(names, types):
            for name, labels in expand(spec):
                documented[name] = (kind, labels)
    assert len(documented) > 30, "the README's metrics table was not found"
    return documented


def all_scraped() -> dict[str, tuple[str, tuple[str, ...]]]:
    return {name: (kind, labels) for c in COMPONENTS for name, kind, labels in scraped(c())}


def test_every_metric_the_readme_documents_is_scraped_with_its_labels_and_type():
    exported = all_scraped()
    for name, (kind, labels) in readme_table().items():
        assert name in exported, name
        assert exported[name][1] == labels, name
        assert kind in (None, exported[name][0]), name


def test_every_scraped_metric_is_documented_in_the_readme():
    assert set(all_scraped()) - set(readme_table()) == set()
