"""The monitoring works in other people's Prometheus and Grafana: no rule or panel depends on a
scrape job name, a process scraped twice counts once (checked against a real Prometheus), the
dashboard imports anywhere, every alert has a runbook section, the PrometheusRule matches the
rules file, and Alertmanager's config (default and example) passes amtool."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stream.metrics import EvaluatorMetrics, WorkerMetrics, serve
from stream.tooling.broker import free_port
from tests.conftest import require_binary
from tests.helpers import ROOT
from tests.ops.prometheus import query, start_prometheus

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "ecg-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ecg-stream.json"
RUNBOOK = DEPLOY / "RUNBOOK.md"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
PER_SECOND_UNITS = {"ops", "reqps", "opm", "rps", "wps"}
# Alerts with a numeric threshold that a panel draws as a line.
DRAWN = {
    "EcgConsumerLagGrowing",
    "EcgDlqRateHigh",
    "EcgEndToEndLatencyHigh",
    "EcgAnomalyRateSpike",
    "EcgUnrecoverableBeatsHigh",
    "EcgModelRmseHigh",
    "EcgEventRateHigh",
    "EcgSignalLossWidespread",
    "EcgRhythmRestoreSlow",
}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def targets() -> list[tuple[dict, dict]]:
    return [(p, t) for p in panels() for t in p["targets"]]


def target_unit(panel: dict, target: dict) -> str:
    """The target's unit: its byFrameRefID override, else the panel's."""
    for override in panel["fieldConfig"]["overrides"]:
        if override["matcher"] == {"id": "byFrameRefID", "options": target["refId"]}:
            return next(p["value"] for p in override["properties"] if p["id"] == "unit")
    return panel["fieldConfig"]["defaults"]["unit"]


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def run(cmd: list[str], cwd: Path = ROOT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------- scrape independence


def test_no_rule_panel_or_variable_names_a_job():
    exprs = [r["expr"] for r in rules()] + [t["expr"] for _, t in targets()]
    exprs += [v.get("definition", "") for v in dashboard()["templating"]["list"]]
    for expr in exprs:
        assert not re.search(r"\bjob\s*=~?", expr), expr


def test_every_sum_deduplicates_first():
    """Every sum adds up maxima (per process, or per partition for the lag) or a recording
    rule made of them: a series scraped twice gives one value, not two."""
    exprs = [r["expr"] for r in rules()] + [t["expr"] for _, t in targets()]
    sums = 0
    for expr in exprs:
        for inner in re.findall(r"\bsum(?:\s+by\s*\([^)]*\))?\s*\(\s*([\w:]+)", expr):
            sums += 1
            assert inner == "max" or ":" in inner, expr  # recording rules are deduplicated
    assert sums > 40


def double_scrape_config(tmp_path: Path, worker_ports: list[int], eval_port: int) -> Path:
    """Two jobs with foreign names both scrape the first worker, as pod annotations and
    service endpoints do in one cluster."""
    first, *others = [f"127.0.0.1:{p}" for p in worker_ports]
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "kubernetes-pods", "static_configs": [{"targets": [first, *others]}]},
            {"job_name": "kubernetes-service-endpoints", "static_configs": [{"targets": [first]}]},
            {"job_name": "evaluator", "static_configs": [{"targets": [f"127.0.0.1:{eval_port}"]}]},
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fake_worker(process: str, patients: int, consumed: int) -> WorkerMetrics:
    """Real worker metrics with chosen values; one pytest process, so its own process id."""
    metrics = WorkerMetrics()
    metrics.info.clear()
    metrics.info.labels("worker", process).set(1)
    metrics.patients.set(patients)
    metrics.consumed.inc(consumed)
    return metrics


def scalar(port: int, expr: str) -> float | None:
    result = query(port, expr)["data"]["result"]
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else None


def dashboard_expr(legend: str) -> str:
    (expr,) = [t["expr"] for _, t in targets() if t["legendFormat"] == legend]
    return expr.replace("$worker", ".*").replace("$__rate_interval", "1m")


def test_double_scrape_under_other_job_names_counts_once(tmp_path):
    prometheus = require_binary("prometheus")
    workers = [fake_worker("worker-a-1", 7, 300), fake_worker("worker-b-1", 5, 200)]
    ports = [free_port() for _ in workers]
    eval_port, prom_port = free_port(), free_port()
    servers = [serve(w.registry, "127.0.0.1", p) for w, p in zip(workers, ports)]
    servers.append(serve(EvaluatorMetrics().registry, "127.0.0.1", eval_port))
    config = double_scrape_config(tmp_path, ports, eval_port)
    prom = None
    try:
        prom = start_prometheus(prometheus, config, tmp_path, prom_port)
        deadline = time.monotonic() + 60
        while scalar(prom_port, "ecg:patients_tracked:sum") is None:
            assert time.monotonic() < deadline, "the recording rule never produced a value"
            time.sleep(0.5)
        time.sleep(3)  # every target scraped a few times
        assert scalar(prom_port, "count(up == 1)") == 4  # worker a twice, b, evaluator
        assert scalar(prom_port, "sum(ecg_patients_tracked)") == 19, "the naive sum counts a twice"
        assert scalar(prom_port, "ecg:patients_tracked:sum") == 12
        assert scalar(prom_port, dashboard_expr("patients tracked")) == 12
        assert scalar(prom_port, dashboard_expr("workers")) == 2
        consumed = "sum(max by (process) (ecg_messages_consumed_total * on (job, instance) "
        consumed += 'group_left (process) ecg_process_info{component="worker"}))'
        assert scalar(prom_port, consumed) == 500
        assert scalar(prom_port, alerts()["EcgNoWorkersUp"]["expr"]) is None
        assert scalar(prom_port, alerts()["EcgWorkerDown"]["expr"]) is None
    finally:
        if prom:
            prom.terminate()
            prom.wait(timeout=20)
        for server in servers:
            server.shutdown()


# ---------------------------------------------------------------- dashboard


def test_dashboard_imports_into_any_grafana():
    board = dashboard()
    (needed,) = board["__inputs"]
    assert needed["type"] == "datasource" and needed["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    variable_ds = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["worker"]["datasource"] == variable_ds
    for panel, target in targets():
        assert panel["datasource"] == variable_ds and target["datasource"] == variable_ds
    uids = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())
    assert set(uids) == {"${datasource}", "ecg-stream"}, "a hard-coded datasource uid"
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert any(d["type"] == "prometheus" and d.get("isDefault") for d in provisioned)


def test_dashboard_rate_windows_and_units():
    for panel, target in targets():
        windows = re.findall(r"\[([^\]]+)\]", target["expr"])
        assert set(windows) <= {"$__rate_interval"}, (panel["title"], windows)
        unit = target_unit(panel, target)
        bare_rate = "rate(" in target["expr"] and not re.search(
            r"histogram_quantile| / ", target["expr"]
        )
        if bare_rate:
            assert unit in PER_SECOND_UNITS, (panel["title"], target["legendFormat"], unit)
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels()}
    assert units["End-to-end latency p50 / p95 / p99"] == "s"
    assert units["DLQ by reason (share of consumed)"] == "percentunit"


def test_threshold_lines_are_the_alert_thresholds():
    drawn = {}
    for panel in panels():
        match = re.search(r"the (Ecg\w+) threshold", panel["description"])
        if match and panel["type"] == "timeseries":
            defaults = panel["fieldConfig"]["defaults"]
            assert defaults["custom"]["thresholdsStyle"]["mode"] in ("line", "dashed")
            drawn[match.group(1)] = defaults["thresholds"]["steps"][-1]["value"]
    assert set(drawn) == DRAWN
    for name, value in drawn.items():
        numbers = [float(n) for n in re.findall(r">=?\s*(\d+(?:\.\d+)?)", alerts()[name]["expr"])]
        assert numbers and numbers[0] == value, (name, value, numbers)


# ---------------------------------------------------------------- rules


def test_promtool_lint_passes():
    out = run(
        [require_binary("promtool"), "check", "rules", "--lint=all", "--lint-fatal", str(RULES)]
    )
    assert "SUCCESS" in out


def test_every_alert_has_a_runbook_section():
    base = re.search(r"^# runbook base: (\S+)$", RULES.read_text(), re.M).group(1)
    assert base.endswith("/blob/main/deploy/RUNBOOK.md")
    path = ROOT / base.split("/blob/main/", 1)[1]
    assert path == RUNBOOK and path.is_file()
    headings = re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), re.M)
    anchors = {github_anchor(h) for h in headings}
    for name, alert in alerts().items():
        url = alert["annotations"]["runbook_url"]
        assert url.startswith(base + "#"), name
        assert url.split("#", 1)[1] in anchors, f"{name}: no RUNBOOK.md heading for {url}"
        assert url.split("#", 1)[1] == github_anchor(name), name


def test_github_anchor_rules():
    assert github_anchor("EcgWorkerDown") == "ecgworkerdown"
    assert github_anchor("Partitions bound parallelism!") == "partitions-bound-parallelism"
    assert github_anchor("Scrape-independent monitoring") == "scrape-independent-monitoring"


def test_prometheusrule_has_the_same_groups():
    script = DEPLOY / "prometheus" / "build_prometheusrule.py"
    run([sys.executable, str(script), "--check"])
    manifest = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    monitor = yaml.safe_load((DEPLOY / "k8s" / "servicemonitor.yaml").read_text())
    release = manifest["metadata"]["labels"]["release"]
    assert release and monitor["metadata"]["labels"]["release"] == release


# ---------------------------------------------------------------- alertmanager


def with_example(text: str) -> str:
    """The config with its commented example (between example-begin and example-end) enabled."""
    out, inside = [], False
    for line in text.splitlines():
        marker = line.strip()
        if marker.startswith("# example-begin") or marker.startswith("# example-end"):
            inside = marker.startswith("# example-begin")
            continue
        out.append(re.sub(r"^(\s*)# ", r"\1", line) if inside else line)
    return "\n".join(out) + "\n"


def route_for(amtool: str, config: Path, *labels: str) -> str:
    out = run([amtool, "config", "routes", "test", f"--config.file={config}", *labels])
    return out.split("Warning")[0].strip()


@pytest.mark.parametrize("example", [False, True], ids=["default", "example"])
def test_alertmanager_config_passes_amtool(example, tmp_path):
    amtool = require_binary("amtool")
    config = tmp_path / "alertmanager.yml"
    text = ALERTMANAGER.read_text()
    config.write_text(with_example(text) if example else text)
    run([amtool, "check-config", str(config)])
    critical = route_for(amtool, config, "alertname=EcgNoWorkersUp", "severity=critical")
    warning = route_for(amtool, config, "alertname=EcgDlqRateHigh", "severity=warning")
    if example:
        assert (critical, warning) == ("oncall-webhook", "team-email")
    else:
        assert (critical, warning) == ("null", "null")


def test_prometheus_sends_alerts_to_the_compose_alertmanager():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (manager,) = config["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    alertmanager = services["alertmanager"]
    assert alertmanager["ports"] == ["${ECG_BIND_ADDRESS:-127.0.0.1}:9093:9093"]
    mounted = {v.split(":")[0] for v in alertmanager["volumes"]}
    assert "./alertmanager/alertmanager.yml" in mounted
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
