"""Generate deploy/grafana/dashboards/ecg-stream.json (run after editing, commit both).

    python deploy/grafana/build_dashboard.py          # write the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is out of date

Every query is a plain `expr` in panels[].targets[] (no collapsed rows), rate windows are a
fixed [1m] (no $__rate_interval), and worker queries filter with instance=~"$instance", whose
"All" value is ".*": a test can substitute that and run each expr against Prometheus.
Metric names come from stream/metrics.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "ecg-stream.json"
DS = {"type": "prometheus", "uid": "prometheus"}
W = 'instance=~"$instance"'  # worker instances chosen in the template variable


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend or "__auto"}


def quantiles(metric: str, qs=(0.5, 0.95, 0.99)) -> list[dict]:
    return [
        q(
            f"histogram_quantile({x}, sum by (le) (rate({metric}_bucket{{{W}}}[1m])))",
            f"p{x * 100:g}",
        )
        for x in qs
    ]


def timeseries(title: str, targets: list[dict], unit: str = "short", desc: str = "") -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
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


CONNECTED = {
    "unit": "short",
    "mappings": [
        {
            "type": "value",
            "options": {
                "0": {"text": "disconnected", "color": "red"},
                "1": {"text": "connected", "color": "green"},
            },
        }
    ],
    "thresholds": {
        "mode": "absolute",
        "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
    },
}

# (row title, [(width, height, panel), ...]); panels are laid out left to right, 24 columns.
# fmt: off
LAYOUT = [
    ("Throughput and latency", [
        (8, 8, timeseries("Throughput in / out (msgs/s)", [
            q(f"sum(rate(ecg_messages_consumed_total{{{W}}}[1m])) or vector(0)", "consumed"),
            q(f"sum by (status) (rate(ecg_beats_produced_total{{{W}}}[1m]))",
              "produced {{status}}"),
        ], "ops", "Raw messages consumed and repaired beats published, by status")),
        (8, 8, timeseries("End-to-end latency p50 / p95 / p99",
                          quantiles("ecg_end_to_end_latency_seconds"), "s",
                          "Simulator/device publish to repaired-beat publish")),
        (4, 8, timeseries("Batch size", [
            *quantiles("ecg_batch_size", (0.5, 0.99)),
            q(f"sum(rate(ecg_batch_size_sum{{{W}}}[1m])) "
              f"/ sum(rate(ecg_batch_size_count{{{W}}}[1m]))", "mean"),
        ], "short", "Beats per model batch")),
        (4, 8, timeseries("Inference and batch time", [
            *quantiles("ecg_inference_seconds", (0.5, 0.99)),
            q(f"histogram_quantile(0.99, sum by (le) "
              f"(rate(ecg_batch_seconds_bucket{{{W}}}[1m])))", "publish+commit p99"),
        ], "s", "Model time per batch; whole batch = decode, model, publish, flush, commit")),
    ]),
    ("Scale-out", [
        (4, 8, stat("Workers up", [
            q('count(up{job="ecg-worker"} == 1) or vector(0)', "workers"),
        ], "Scraped worker targets that are up")),
        (8, 8, timeseries("Consumer lag per partition (records)", [
            q(f"max by (partition) (ecg_consumer_lag{{{W}}})", "partition {{partition}}"),
            q(f"sum(max by (partition) (ecg_consumer_lag{{{W}}})) or vector(0)", "total"),
        ], "short", "Records behind the high watermark on ecg.beats.raw")),
        (6, 8, timeseries("Assigned partitions per worker", [
            q(f"ecg_assigned_partitions{{{W}}}", "{{instance}}"),
        ], "short", "Partitions cap parallelism: a worker with 0 partitions is idle")),
        (6, 8, timeseries("Commits, patients tracked, state resets", [
            q(f"sum(rate(ecg_commits_total{{{W}}}[1m])) or vector(0)", "commits/s"),
            q(f"sum(rate(ecg_commit_failures_total{{{W}}}[1m])) or vector(0)",
              "commit failures/s"),
            q(f"sum(ecg_patients_tracked{{{W}}}) or vector(0)", "patients tracked"),
            q(f"sum(increase(ecg_state_resets_total{{{W}}}[1m])) or vector(0)",
              "state resets (1m)"),
        ], "short", "Per-patient template state is rebuilt after a rebalance")),
    ]),
    ("Repair, classes and anomalies", [
        (6, 8, timeseries("Gaps filled (samples/s)", [
            q(f"sum(rate(ecg_samples_imputed_total{{{W}}}[1m])) or vector(0)", "imputed"),
            q(f"sum(rate(ecg_samples_missing_total{{{W}}}[1m])) or vector(0)", "missing"),
        ], "short", "Missing samples that arrived, and those the model filled")),
        (6, 8, timeseries("Repaired, unrecoverable and lost beats (beats/s)", [
            q(f'sum(rate(ecg_beats_produced_total{{status="repaired",{W}}}[1m])) '
              "or vector(0)", "repaired"),
            q(f'sum(rate(ecg_beats_produced_total{{status="unrecoverable",{W}}}[1m]))'
              " or vector(0)", "unrecoverable"),
            q(f"sum(rate(ecg_beats_lost_total{{{W}}}[1m])) or vector(0)", "lost"),
        ], "short", "Unrecoverable: too much missing to repair honestly; lost: never received")),
        (6, 8, timeseries("Beat classes (beats/s)", [
            q(f"sum by (beat_class) (rate(ecg_beats_classified_total{{{W}}}[1m]))",
              "{{beat_class}}"),
        ], "short", "Predicted AAMI class (N, S, V, F, Q)")),
        (6, 8, timeseries("Anomalies by class (beats/s)", [
            q(f"sum by (beat_class) (rate(ecg_anomalies_total{{{W}}}[1m])) "
              "or on() vector(0)", "{{beat_class}}"),
        ], "short", "Beats flagged anomalous, by predicted class")),
        (12, 8, timeseries("Alerts published by type (alerts/s)", [
            q(f"sum by (type) (rate(ecg_alerts_total{{{W}}}[1m])) or on() vector(0)",
              "{{type}}"),
        ], "short", "Messages on ecg.alerts")),
        (12, 8, timeseries("DLQ by reason (msgs/s)", [
            q(f"sum by (reason) (rate(ecg_dlq_messages_total{{{W}}}[1m])) "
              "or on() vector(0)", "{{reason}}"),
        ], "short", "Messages sent to ecg.beats.dlq")),
    ]),
    ("Rhythm episodes (ecg.events)", [
        (6, 8, timeseries("Open episodes by type", [
            q(f"sum by (type) (ecg_episodes_open{{{W}}}) or on() vector(0)", "{{type}}"),
        ], "short", "Episodes open now, all patients (signal_loss includes silent patients)")),
        (6, 8, timeseries("Episodes started by type (per minute)", [
            q(f"60 * sum by (type) (rate(ecg_episodes_started_total{{{W}}}[1m])) "
              "or on() vector(0)", "{{type}}"),
        ], "short", "Opened episodes, and short ones reported whole (couplets, pauses)")),
        (6, 8, timeseries("Events and alerts per patient-hour", [
            q(f"3600 * sum(rate(ecg_events_total{{{W}}}[1m])) "
              f"/ sum(rate(ecg_patient_seconds_total{{{W}}}[1m]))", "events"),
            q(f"3600 * sum(rate(ecg_alerts_total{{{W}}}[1m])) "
              f"/ sum(rate(ecg_patient_seconds_total{{{W}}}[1m]))", "per-beat alerts"),
        ], "short", "Messages per hour of patient time: what a monitoring system must read")),
        (6, 8, timeseries("Rhythm state restores", [
            q(f"sum(increase(ecg_rhythm_patients_restored_total{{{W}}}[1m])) or vector(0)",
              "patients restored (1m)"),
            q(f"histogram_quantile(0.99, sum by (le) "
              f"(rate(ecg_rhythm_restore_seconds_bucket{{{W}}}[1m])))", "restore p99 (s)"),
        ], "short", "Changelog reads on partition assignment (rebalances, restarts)")),
    ]),
    ("Live quality (simulator --truth + evaluate-live)", [
        (10, 8, timeseries("Live RMSE: model vs linear interpolation", [
            q("sqrt(sum by (method) (rate(ecg_live_squared_error_total[1m])) / ignoring(method)"
              " group_left sum(rate(ecg_live_masked_samples_total[1m])))", "{{method}} (1m)"),
            q("max by (method) (ecg_live_rmse)", "{{method}} since start"),
        ], "short", "Masked-sample RMSE on imputed samples against the truth topic")),
        (7, 8, timeseries("Live classification accuracy", [
            q("sum(rate(ecg_live_class_correct_total[1m])) "
              "/ sum(rate(ecg_live_class_evaluated_total[1m]))", "1m"),
            q("max(ecg_live_accuracy)", "since start"),
        ], "percentunit", "Predicted class vs the annotated class")),
        (7, 8, timeseries("Evaluator: matched and pending beats", [
            q("sum(rate(ecg_live_beats_evaluated_total[1m])) or vector(0)", "evaluated/s"),
            q("sum(ecg_live_pending) or vector(0)", "pending"),
        ], "short", "Repaired beats joined with their ground truth")),
    ]),
    ("Health: model, Kafka, simulator", [
        (6, 6, stat("Model version", [
            q(f"max by (version, threshold) (ecg_model_info{{{W}}})",
              "{{version}} (threshold {{threshold}})"),
        ], "Loaded model per worker", text_mode="name")),
        (6, 6, stat("Kafka connected", [
            q("min by (job, instance) (ecg_kafka_connected)", "{{job}} {{instance}}"),
        ], "1 while the last Kafka operation succeeded", defaults=CONNECTED)),
        (12, 6, timeseries("Kafka errors by operation (errors/s)", [
            q("sum by (job, operation) (rate(ecg_kafka_errors_total[1m]))"
              " or on() vector(0)", "{{job}} {{operation}}"),
        ])),
        (12, 8, timeseries("Simulator: sent, acked, retried, dropped, skipped (beats/s)", [
            q(f"sum(rate(ecg_sim_beats_{name}_total[1m])) or vector(0)", name)
            for name in ("sent", "acked", "retried", "dropped", "skipped")
        ], "short", "Dropped: send buffer full; skipped: simulated lost beats")),
        (12, 8, timeseries("Simulator buffered beats", [
            q("sum(ecg_sim_buffered_beats) or vector(0)", "buffered"),
        ], "short", "Sent but not yet acknowledged (grows while the broker is away)")),
    ]),
]
# fmt: on


def build() -> dict:
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
            refs = "ABCDEFGH"
            targets = [
                {"datasource": DS, "refId": refs[i], **t} for i, t in enumerate(panel["targets"])
            ]
            panels.append(
                {
                    "id": pid,
                    "datasource": DS,
                    "gridPos": {"x": x, "y": y, "w": w, "h": h},
                    **panel,
                    "targets": targets,
                }
            )
            pid, x, row_h = pid + 1, x + w, max(row_h, h)
        y += row_h
    return {
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
        "templating": {
            "list": [
                {
                    "name": "instance",
                    "label": "worker",
                    "type": "query",
                    "datasource": DS,
                    "definition": 'label_values(up{job="ecg-worker"}, instance)',
                    "query": {
                        "query": 'label_values(up{job="ecg-worker"}, instance)',
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "refresh": 2,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "sort": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != render():
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
