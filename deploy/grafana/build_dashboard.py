"""Generate deploy/grafana/dashboards/ecg-stream.json (run after editing, commit both).

    python deploy/grafana/build_dashboard.py          # write the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is out of date

Portable: every panel and target uses the `${datasource}` variable (any Prometheus, no uid),
and no query names a scrape job. A series gets its process identity from `ecg_process_info`
(stream/metrics.py) with `* on (job, instance) group_left (process)`, and `max by (process)`
before `sum` counts a process once however many scrape jobs collect it (deploy/README.md,
"Scrape-independent monitoring"). Rate windows are `$__rate_interval`; `$worker` filters the
workers (its "All" is ".*"). Every query is a plain `expr` in panels[].targets[] (no collapsed
rows), so a test can substitute the variables and run each one against Prometheus.
Threshold lines are read from the alert rules (prometheus/rules/ecg-alerts.yml).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
OUT = HERE / "dashboards" / "ecg-stream.json"
RULES = HERE.parent / "prometheus" / "rules" / "ecg-alerts.yml"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
WORKER_INFO = 'ecg_process_info{component="worker", process=~"$worker"}'


def alert_thresholds(path: Path = RULES) -> dict[str, float]:
    """Alert name -> the number of its first `>` / `>=` comparison (alerts without one are
    left out): panels draw the rules' own thresholds instead of copies of them."""
    found = {}
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            match = re.search(r">=?\s*(\d+(?:\.\d+)?)\b", rule.get("expr", ""))
            if "alert" in rule and match:
                found[rule["alert"]] = float(match.group(1))
    return found


THRESHOLDS = alert_thresholds()


# ---------------------------------------------------------------- PromQL helpers


def sel(metric: str, matchers: str = "") -> str:
    return f"{metric}{{{matchers}}}" if matchers else metric


def rate(metric: str, matchers: str = "") -> str:
    return f"rate({sel(metric, matchers)}[{RATE}])"


def identified(expr: str, component: str | None) -> str:
    """expr with the process label of the ecg_process_info of its target (every component's
    when component is None: then the component label comes along too)."""
    if component is None:
        return f"{expr} * on (job, instance) group_left (component, process) ecg_process_info"
    info = WORKER_INFO if component == "worker" else f'ecg_process_info{{component="{component}"}}'
    return f"{expr} * on (job, instance) group_left (process) {info}"


def per_process(expr: str, by: tuple[str, ...] = (), component: str | None = "worker") -> str:
    """One series per process (and `by` labels): a process scraped twice counts once."""
    identity = ("process",) if component else ("component", "process")
    labels = dict.fromkeys((*identity, *by))  # in order, once each
    return f"max by ({', '.join(labels)}) ({identified(expr, component)})"


def total(expr: str, by: tuple[str, ...] = (), component: str | None = "worker") -> str:
    grouping = f" by ({', '.join(by)})" if by else ""
    return f"sum{grouping} ({per_process(expr, by, component)})"


def quantile(x: float, metric: str, component: str = "worker") -> str:
    return f"histogram_quantile({x}, {total(rate(metric + '_bucket'), ('le',), component)})"


def q(expr: str, legend: str = "", unit: str | None = None) -> dict:
    """A target; `unit` overrides the panel's unit for this series only."""
    target = {"expr": expr, "legendFormat": legend or "__auto"}
    return {**target, "unit": unit} if unit else target


def quantiles(metric: str, qs=(0.5, 0.95, 0.99)) -> list[dict]:
    return [q(quantile(x, metric), f"p{x * 100:g}") for x in qs]


# ---------------------------------------------------------------- panels


def alert_line(defaults: dict, alert: str) -> None:
    """A dashed red line at the alert's threshold."""
    defaults["thresholds"] = {
        "mode": "absolute",
        "steps": [{"color": "green", "value": None}, {"color": "red", "value": THRESHOLDS[alert]}],
    }
    defaults["custom"] = {"thresholdsStyle": {"mode": "dashed"}}


def timeseries(
    title: str, targets: list[dict], unit: str, desc: str = "", alert: str | None = None
) -> dict:
    defaults = {"unit": unit, "min": 0}
    if alert:
        alert_line(defaults, alert)
        desc = f"{desc}. Dashed line: the {alert} threshold".lstrip(". ")
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
    }


def stat(
    title: str,
    targets: list[dict],
    desc: str = "",
    text_mode: str = "auto",
    defaults: dict | None = None,
) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": desc,
        "targets": targets,
        "fieldConfig": {"defaults": defaults or {"unit": "short"}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": text_mode,
        },
    }


def red_below(value: float, unit: str = "short") -> dict:
    return {
        "unit": unit,
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": "red", "value": None}, {"color": "green", "value": value}],
        },
    }


CONNECTED = {
    **red_below(1),
    "mappings": [
        {
            "type": "value",
            "options": {
                "0": {"text": "disconnected", "color": "red"},
                "1": {"text": "connected", "color": "green"},
            },
        }
    ],
}


def share(part: str, whole: str, by: tuple[str, ...] = ()) -> str:
    """part / whole, both summed per process; part may carry `by` labels."""
    match = f" / ignoring ({', '.join(by)}) group_left " if by else " / "
    return total(part, by) + match + total(whole)


CONSUMED = rate("ecg_messages_consumed_total")
PRODUCED = rate("ecg_beats_produced_total")
LOST = rate("ecg_beats_lost_total")
REPAIRED = rate("ecg_beats_produced_total", 'status="repaired"')
UNRECOVERABLE = rate("ecg_beats_produced_total", 'status="unrecoverable"')
ANOMALIES, CLASSIFIED = rate("ecg_anomalies_total"), rate("ecg_beats_classified_total")

# (row title, [(width, height, panel), ...]); panels are laid out left to right, 24 columns.
# fmt: off
LAYOUT = [
    ("Throughput and latency", [
        (8, 8, timeseries("Throughput in / out", [
            q(f"{total(CONSUMED)} or vector(0)", "consumed"),
            q(total(PRODUCED, ("status",)), "produced {{status}}"),
        ], "ops", "Raw messages consumed and repaired beats published (per second), by status")),
        (8, 8, timeseries("End-to-end latency p50 / p95 / p99",
                          quantiles("ecg_end_to_end_latency_seconds"), "s",
                          "Simulator/device publish to repaired-beat publish",
                          alert="EcgEndToEndLatencyHigh")),
        (4, 8, timeseries("Batch size", [
            *quantiles("ecg_batch_size", (0.5, 0.99)),
            q(f"{total(rate('ecg_batch_size_sum'))} / {total(rate('ecg_batch_size_count'))}",
              "mean"),
        ], "short", "Beats per model batch")),
        (4, 8, timeseries("Inference and batch time", [
            *quantiles("ecg_inference_seconds", (0.5, 0.99)),
            q(quantile(0.99, "ecg_batch_seconds"), "publish+commit p99"),
        ], "s", "Model time per batch; whole batch = decode, model, publish, flush, commit")),
    ]),
    ("Scale-out", [
        # EcgNoWorkersUp is an absent() rule: red below one worker.
        (4, 8, stat("Workers up", [
            q('count(count by (process) (ecg_process_info{component="worker"})) or vector(0)',
              "workers"),
        ], "Worker processes whose metrics Prometheus scrapes now", defaults=red_below(1))),
        (8, 8, timeseries("Consumer lag per partition (records)", [
            q(f"max by (partition) ({identified('ecg_consumer_lag', 'worker')})",
              "partition {{partition}}"),
            q(f"sum(max by (partition) ({identified('ecg_consumer_lag', 'worker')}))"
              " or vector(0)", "total"),
        ], "short", "Records behind the high watermark on ecg.beats.raw",
           alert="EcgConsumerLagGrowing")),
        (6, 8, timeseries("Assigned partitions per worker", [
            q(per_process("ecg_assigned_partitions"), "{{process}}"),
        ], "short", "Partitions cap parallelism: a worker with 0 partitions is idle")),
        (6, 8, timeseries("Commits, patients tracked, state resets", [
            q(f"{total(rate('ecg_commits_total'))} or vector(0)", "commits/s"),
            q(f"{total(rate('ecg_commit_failures_total'))} or vector(0)", "commit failures/s"),
            q(f"{total('ecg_patients_tracked')} or vector(0)", "patients tracked", "short"),
            q(f"{total(rate('ecg_state_resets_total'))} or vector(0)", "state resets/s"),
        ], "ops", "Per-patient template state is rebuilt after a rebalance")),
    ]),
    ("Repair, classes and anomalies", [
        (6, 8, timeseries("Gaps filled (samples/s)", [
            q(f"{total(rate('ecg_samples_imputed_total'))} or vector(0)", "imputed"),
            q(f"{total(rate('ecg_samples_missing_total'))} or vector(0)", "missing"),
        ], "ops", "Missing samples that arrived, and those the model filled")),
        (6, 8, timeseries("Repaired, unrecoverable and lost beats (share)", [
            q(f"{share(REPAIRED, PRODUCED)} or vector(0)", "repaired"),
            q(f"{share(UNRECOVERABLE, PRODUCED)} or vector(0)", "unrecoverable"),
            q(f"{total(LOST)} / ({total(PRODUCED)} + {total(LOST)}) or vector(0)", "lost"),
        ], "percentunit", "Unrecoverable: too much missing to repair honestly; lost: never "
           "received", alert="EcgUnrecoverableBeatsHigh")),
        (6, 8, timeseries("Beat classes (beats/s)", [
            q(total(rate("ecg_beats_classified_total"), ("beat_class",)), "{{beat_class}}"),
        ], "ops", "Predicted AAMI class (N, S, V, F, Q)")),
        (6, 8, timeseries("Anomalous beats (share of classified)", [
            q(f"{share(ANOMALIES, CLASSIFIED)} or vector(0)", "all"),
            q(f"{share(ANOMALIES, CLASSIFIED, ('beat_class',))} or on() vector(0)",
              "{{beat_class}}"),
        ], "percentunit", "Beats flagged anomalous, by predicted class",
           alert="EcgAnomalyRateSpike")),
        (12, 8, timeseries("Alerts published by type (alerts/s)", [
            q(f"{total(rate('ecg_alerts_total'), ('type',))} or on() vector(0)", "{{type}}"),
        ], "ops", "Messages on ecg.alerts")),
        (12, 8, timeseries("DLQ by reason (share of consumed)", [
            q(f"{share(rate('ecg_dlq_messages_total'), CONSUMED, ('reason',))}"
              " or on() vector(0)", "{{reason}}"),
        ], "percentunit", "Messages sent to ecg.beats.dlq", alert="EcgDlqRateHigh")),
    ]),
    ("Rhythm episodes (ecg.events)", [
        (6, 8, timeseries("Open episodes by type", [
            q(f"{total('ecg_episodes_open', ('type',))} or on() vector(0)", "{{type}}"),
        ], "short", "Episodes open now, all patients (signal_loss includes silent patients)")),
        (6, 8, timeseries("Episodes started by type (per minute)", [
            q(f"60 * {total(rate('ecg_episodes_started_total'), ('type',))} or on() vector(0)",
              "{{type}}"),
        ], "opm", "Opened episodes, and short ones reported whole (couplets, pauses)")),
        (6, 8, timeseries("Patients in signal loss (share)", [
            q(share('ecg_episodes_open{type="signal_loss"}', "ecg_patients_tracked"),
              "signal loss"),
        ], "percentunit", "Tracked patients with an open signal_loss episode",
           alert="EcgSignalLossWidespread")),
        (6, 8, timeseries("Events and alerts per patient-hour", [
            q(f"3600 * {total(rate('ecg_events_total'))} "
              f"/ {total(rate('ecg_patient_seconds_total'))}", "events"),
            q(f"3600 * {total(rate('ecg_alerts_total'))} "
              f"/ {total(rate('ecg_patient_seconds_total'))}", "per-beat alerts"),
        ], "suffix: /patient-h", "Messages per hour of patient time: what a monitoring system "
           "must read", alert="EcgEventRateHigh")),
        (12, 8, timeseries("Rhythm state restore time p99", [
            q(quantile(0.99, "ecg_rhythm_restore_seconds"), "restore p99"),
        ], "s", "Changelog reads on partition assignment (rebalances, restarts)",
           alert="EcgRhythmRestoreSlow")),
        (12, 8, timeseries("Patients restored from the rhythm changelog", [
            q(f"{total(rate('ecg_rhythm_patients_restored_total'))} or vector(0)",
              "patients restored/s"),
        ], "ops", "Patients whose rhythm state was read back on assignment")),
    ]),
    ("Live quality (simulator --truth + evaluate-live)", [
        (10, 8, timeseries("Live RMSE: model vs linear interpolation", [
            q(f"sqrt({total(rate('ecg_live_squared_error_total'), ('method',), 'evaluator')}"
              " / ignoring(method) group_left "
              f"{total(rate('ecg_live_masked_samples_total'), (), 'evaluator')})", "{{method}}"),
            q("max by (method) (ecg_live_rmse)", "{{method}} since start"),
        ], "none", "Masked-sample RMSE on imputed samples against the truth topic",
           alert="EcgModelRmseHigh")),
        (7, 8, timeseries("Live classification accuracy", [
            q(f"{total(rate('ecg_live_class_correct_total'), (), 'evaluator')} "
              f"/ {total(rate('ecg_live_class_evaluated_total'), (), 'evaluator')}", "recent"),
            q("max(ecg_live_accuracy)", "since start"),
        ], "percentunit", "Predicted class vs the annotated class")),
        (7, 8, timeseries("Evaluator: matched and pending beats", [
            q(f"{total(rate('ecg_live_beats_evaluated_total'), (), 'evaluator')} or vector(0)",
              "evaluated/s"),
            q(f"{total('ecg_live_pending', (), 'evaluator')} or vector(0)", "pending", "short"),
        ], "ops", "Repaired beats joined with their ground truth")),
    ]),
    ("Health: model, Kafka, simulator", [
        (6, 6, stat("Model version", [
            q(f"max by (version, threshold) ({identified('ecg_model_info', 'worker')})",
              "{{version}} (threshold {{threshold}})"),
        ], "Loaded model per worker", text_mode="name")),
        (6, 6, stat("Kafka connected", [
            q(per_process("ecg_kafka_connected", (), None), "{{component}} {{process}}"),
        ], "1 while the last Kafka operation succeeded (alert: EcgKafkaDisconnected)",
           defaults=CONNECTED)),
        (12, 6, timeseries("Kafka errors by operation (errors/s)", [
            q(f"{total(rate('ecg_kafka_errors_total'), ('component', 'operation'), None)}"
              " or on() vector(0)", "{{component}} {{operation}}"),
        ], "ops", "Failed Kafka operations of every component")),
        (12, 8, timeseries("Simulator: sent, acked, retried, dropped, skipped (beats/s)", [
            q(f"{total(rate(f'ecg_sim_beats_{name}_total'), (), 'simulator')} or vector(0)",
              name)
            for name in ("sent", "acked", "retried", "dropped", "skipped")
        ], "ops", "Dropped: send buffer full; skipped: simulated lost beats")),
        (12, 8, timeseries("Simulator buffered beats", [
            q(f"{total('ecg_sim_buffered_beats', (), 'simulator')} or vector(0)", "buffered"),
        ], "short", "Sent but not yet acknowledged (grows while the broker is away)")),
    ]),
]
# fmt: on


def with_targets(panel: dict) -> dict:
    """refIds, the datasource variable, and the per-target unit overrides."""
    targets, overrides = [], []
    for ref, target in zip("ABCDEFGH", panel["targets"]):
        target = dict(target)
        unit = target.pop("unit", None)
        if unit:
            overrides.append(
                {
                    "matcher": {"id": "byFrameRefID", "options": ref},
                    "properties": [{"id": "unit", "value": unit}],
                }
            )
        targets.append({"datasource": DS, "refId": ref, **target})
    field_config = {**panel["fieldConfig"], "overrides": overrides}
    return {**panel, "targets": targets, "fieldConfig": field_config}


def layout() -> list[dict]:
    panels, y, pid = [], 0, 1
    for row_title, row in LAYOUT:
        panels.append(
            {
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "id": pid,
                "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for w, h, panel in row:
            if x + w > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(
                {
                    "id": pid,
                    "datasource": DS,
                    "gridPos": {"x": x, "y": y, "w": w, "h": h},
                    **with_targets(panel),
                }
            )
            pid, x, row_h = pid + 1, x + w, max(row_h, h)
        y += row_h
    return panels


# Grafana's import dialog asks for a Prometheus datasource; the `datasource` variable then
# lets every viewer pick one (provisioned: the default Prometheus datasource).
INPUTS = [
    {
        "name": "DS_PROMETHEUS",
        "label": "Prometheus",
        "description": "The Prometheus that scrapes the ecg-stream workers",
        "type": "datasource",
        "pluginId": "prometheus",
        "pluginName": "Prometheus",
    }
]
REQUIRES = [
    {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
    {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
    {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
    {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
]
VARIABLES = [
    {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "regex": "",
        "refresh": 1,
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "current": {},
    },
    {
        "name": "worker",
        "label": "worker",
        "type": "query",
        "datasource": DS,
        "definition": 'label_values(ecg_process_info{component="worker"}, process)',
        "query": {
            "query": 'label_values(ecg_process_info{component="worker"}, process)',
            "refId": "PrometheusVariableQueryEditor-VariableQuery",
        },
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    },
]


def build() -> dict:
    return {
        "__inputs": INPUTS,
        "__requires": REQUIRES,
        "uid": "ecg-stream",
        "title": "ecg-stream",
        "description": "Streaming ECG beat repair: throughput, latency, lag, repair quality",
        "tags": ["ecg-stream", "kafka", "pytorch"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": VARIABLES},
        "annotations": {"list": []},
        "panels": layout(),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def write_or_check(out: Path, text: str, argv: list[str], script: str) -> int:
    """Write a generated file, or with --check fail (1) when the committed one differs.
    Shared with prometheus/build_prometheusrule.py."""
    if "--check" in argv:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is out of date: run python {script}", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(write_or_check(OUT, render(), sys.argv[1:], Path(__file__).name))
