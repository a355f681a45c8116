"""The ops contract, checked against a real Prometheus scraping the real pipeline: every PromQL
expression of the Grafana dashboard returns data, and every rule expression evaluates."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from stream.evaluate_live import LiveEvaluator
from stream.kafka import ensure_topics, make_producer
from stream.metrics import SimulatorMetrics, serve
from stream.tooling.broker import free_port
from tests.conftest import require_binary
from tests.helpers import DEPLOY, scrape, start_workers, stop_workers, wait_for_metrics
from tests.ops.prometheus import query, start_prometheus

# Series that only exist after a rare event; their panels fall back to `or vector(0)`.
RARE = ("ecg_kafka_errors_total",)


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "ecg-stream.json").read_text())

    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return [
        (p["title"], t["expr"])
        for p in walk(board["panels"])
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def prometheus_config(tmp_path: Path, targets: dict[str, list[str]]) -> Path:
    """The deployed config with its targets pointed at this test's ports."""
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / "rules" / "*.yml")]
    cfg.pop("alerting", None)  # no Alertmanager here
    jobs = []
    for job in cfg["scrape_configs"]:
        if job["job_name"] in targets:
            jobs.append(
                {
                    "job_name": job["job_name"],
                    "static_configs": [{"targets": targets[job["job_name"]]}],
                }
            )
    assert {j["job_name"] for j in jobs} == set(targets)
    cfg["scrape_configs"] = jobs
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def substitute(expr: str) -> str:
    return expr.replace("$worker", ".*").replace("$__rate_interval", "1m")


def without_fallback(expr: str) -> str:
    return re.sub(r"\s+or\s+(on\(\)\s+)?vector\(0\)\s*$", "", expr)


@pytest.mark.slow
def test_dashboard_queries_return_data(pipeline_config, checkpoint, tmp_path):
    prometheus = require_binary("prometheus")
    cfg = pipeline_config(
        "simulator.patients=12",
        "simulator.rate=150",
        "simulator.duration_s=60",
        "simulator.truth=true",
        "simulator.dropout.lost_beat_prob=0.02",
        "simulator.dropout.gap_prob=0.5",
    )
    ensure_topics(cfg.kafka, cfg.topics)
    procs = start_workers(cfg, tmp_path, 2)
    evaluator = LiveEvaluator(cfg)
    eval_port, sim_port, prom_port = free_port(), free_port(), free_port()
    eval_server = serve(evaluator.metrics.registry, "127.0.0.1", eval_port)
    sim_metrics = SimulatorMetrics()
    sim_server = serve(sim_metrics.registry, "127.0.0.1", sim_port)
    stop = threading.Event()
    threads = [threading.Thread(target=evaluator.run, daemon=True)]
    prom = None
    try:
        for _, port in procs:
            wait_for_metrics(port)
        from simulator.run import simulate

        producer = make_producer(cfg.kafka)
        threads.append(
            threading.Thread(target=simulate, args=(cfg, producer, sim_metrics, stop), daemon=True)
        )
        for t in threads:
            t.start()
        # A few bad messages, so the dead-letter panels have series too.
        for value in (b"not json", b"[]", b'{"schema_version": 9}'):
            producer.send(cfg.topics.raw, key=b"bad", value=value)
        producer.flush()

        config = prometheus_config(
            tmp_path,
            {
                "ecg-worker": [f"127.0.0.1:{port}" for _, port in procs],
                "ecg-evaluator": [f"127.0.0.1:{eval_port}"],
                "ecg-simulator": [f"127.0.0.1:{sim_port}"],
            },
        )
        check = subprocess.run(
            [require_binary("promtool"), "check", "config", str(config)],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        prom = start_prometheus(prometheus, config, tmp_path, prom_port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = query(prom_port, "count(up == 1)")["data"]["result"]
            if result and float(result[0]["value"][1]) == 4:  # 2 workers, evaluator, simulator
                break
            time.sleep(1)
        else:
            raise AssertionError("Prometheus never saw all four targets up")
        time.sleep(20)  # enough scrapes for [1m] rates, while the simulator still sends

        empty, errors = [], []
        for title, expr in dashboard_exprs():
            for candidate in {substitute(expr), substitute(without_fallback(expr))}:
                if candidate != substitute(expr) and any(m in candidate for m in RARE):
                    continue
                answer = query(prom_port, candidate)
                if answer["status"] != "success":
                    errors.append((title, candidate, answer))
                elif not answer["data"]["result"]:
                    empty.append((title, candidate))
        assert not errors, errors
        assert not empty, "dashboard queries without data:\n" + "\n".join(map(str, empty))

        rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "ecg-alerts.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                assert query(prom_port, rule["expr"])["status"] == "success", rule
        # The worker totals Prometheus sees agree with the workers' own endpoints.
        scraped = sum(scrape(port).get("ecg_messages_consumed_total", 0) for _, port in procs)
        seen = query(prom_port, "sum(ecg_messages_consumed_total)")["data"]["result"]
        assert 0 < float(seen[0]["value"][1]) <= scraped
    finally:
        stop.set()
        evaluator.stop.set()
        if prom:
            prom.terminate()
            prom.wait(timeout=20)
        stop_workers(procs)
        for server in (eval_server, sim_server):
            server.shutdown()
