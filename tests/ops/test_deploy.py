"""Static checks of deploy/, the Dockerfile and the monitoring files (fast, no network).

Docker cannot run here, so this checks what can be checked: every file parses, every reference
resolves, every command is a real `ecg-stream` subcommand, every config key is valid, every
metric name exists in stream/metrics.yaml, and promtool accepts the Prometheus config, the rules
and their unit tests. promtool comes with the Debian package `prometheus`: without it these
tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stream.cli import build_parser
from stream.config import load_config
from stream.metrics import EvaluatorMetrics, SimulatorMetrics, WorkerMetrics
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROM_DIR = DEPLOY / "prometheus"
RULES = PROM_DIR / "rules" / "ecg-alerts.yml"
RULE_TESTS = PROM_DIR / "tests" / "ecg-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ecg-stream.json"
K8S = DEPLOY / "k8s"

IMAGE = "ecg-stream"
PORTS = {"worker": 9108, "evaluate-live": 9109, "simulate": 9110}
JOBS = {"ecg-worker": "worker", "ecg-evaluator": "evaluator", "ecg-simulator": "simulator"}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


# ---------------------------------------------------------------- helpers


def subcommands() -> set[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    pytest.fail("stream.cli.build_parser() has no subcommands")


def check_command(args: list[str]) -> None:
    """args is a real subcommand, and the CLI parser accepts its flags."""
    assert args and args[0] in subcommands(), f"not an ecg-stream subcommand: {args}"
    try:
        build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"ecg-stream rejects the arguments {args}")


def check_env(env: dict[str, str], where: str) -> None:
    """ECG_* variables must be valid config keys (load_config rejects unknown ones)."""
    ecg = {k: str(v) for k, v in env.items() if k.startswith("ECG_") and k != "ECG_CONFIG"}
    try:
        load_config(env=ecg)
    except Exception as exc:  # ConfigError names the key
        pytest.fail(f"{where}: {exc}")


def metric_names() -> set[str]:
    """Series names the worker, evaluator and simulator export (a histogram as its three)."""
    names = {"up"}
    for component in (WorkerMetrics, EvaluatorMetrics, SimulatorMetrics):
        for metric in component().registry.collect():
            if metric.type == "histogram":  # exposed only as its three series
                names |= {f"{metric.name}_bucket", f"{metric.name}_sum", f"{metric.name}_count"}
            else:
                names.add(f"{metric.name}_total" if metric.type == "counter" else metric.name)
    assert len(names) > 30, "too few metrics found"
    return names


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a small lexer: enough for our expressions)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    s = re.sub(r"\boffset\s+\w+", "", s)
    names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", s))
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def expand_recorded(expr: str, rules: list[dict]) -> str:
    """expr with the recording rules it reads replaced by their expressions."""
    recorded = {r["record"]: r["expr"] for r in rules if "record" in r}
    while any(name in expr for name in recorded):
        for name, body in recorded.items():
            expr = expr.replace(name, f"({body})")
    return expr


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every target, rows included."""
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def load_all(path: Path) -> list[dict]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        assert (K8S / name).is_file(), f"kustomization lists a missing file {name}"
        docs += load_all(K8S / name)
    return docs


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"])
        for d in docs
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    ]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is missing on CI: install the Debian package 'prometheus'")
    pytest.skip("promtool not installed (apt-get install prometheus)")


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
    return out


# ---------------------------------------------------------------- image


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    assert len(stages) >= 2, "multi-stage build expected"
    # The runtime stage and the two targets built on it: no compiler, not root.
    runtime = text[text.index("\nFROM ${PYTHON_IMAGE} AS runtime") :]
    assert "build-essential" not in runtime and "apt-get install" not in runtime
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", runtime, re.M), "images must not run as root"
    assert re.search(r"^HEALTHCHECK .*9108", runtime, re.M | re.S)
    assert re.search(r'^ENTRYPOINT \["ecg-stream"\]$', runtime, re.M)
    targets = dict(re.findall(r"^FROM runtime AS (\w+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    assert list(targets) == ["simulator", "worker"], "the worker must be the last (default) target"
    for target, body in targets.items():
        cmd = json.loads(re.search(r"^CMD (\[.*\])$", body, re.M).group(1))
        check_command(cmd)
        assert cmd == [{"simulator": "simulate", "worker": "worker"}[target]]
    # The worker's venv holds the core dependencies only; the simulator's adds `data`.
    assert "COPY --from=build /opt/venv" in targets["worker"]
    assert "COPY --from=build-data /opt/venv" in targets["simulator"]
    assert re.search(r"^RUN pip install \. ", text, re.M) and 'pip install ".[data]"' in text
    for sources in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        for src in sources.split()[:-1]:  # a glob (README*) may match nothing
            assert "*" in src or (ROOT / src).exists(), f"Dockerfile copies a missing {src}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^ecg-stream = "stream\.cli:main"$', pyproject, re.M)
    assert '"weights/*.pt"' in pyproject, "the weights must be package data"


def test_dockerignore_keeps_sources_and_weights():
    lines = [
        s for s in (ROOT / ".dockerignore").read_text().splitlines() if s and not s.startswith("#")
    ]
    for needed in ("pyproject.toml", "models", "stream", "simulator"):
        assert f"!{needed}" in lines
    assert not [s for s in lines if ".pt" in s or "weights" in s or s.startswith("models/")]


# ---------------------------------------------------------------- compose


def test_compose_services_and_commands(compose):
    services = compose["services"]
    assert {
        "kafka",
        "create-topics",
        "simulator",
        "worker",
        "evaluator",
        "prometheus",
        "grafana",
    } <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    ours = {
        n: s for n, s in services.items() if re.match(rf"{IMAGE}(-simulator)?:", s.get("image", ""))
    }
    assert set(ours) == {"create-topics", "simulator", "worker", "evaluator"}
    for name, service in ours.items():
        check_command(service["command"])
        env = service.get("environment", {})
        check_env(env, f"compose service {name}")
        assert env["ECG_BOOTSTRAP_SERVERS"] == "kafka:9092"
        port = PORTS.get(service["command"][0])
        if port:
            assert int(env.get("ECG_HEALTH_PORT", 9108)) == port, f"{name}: healthcheck port"
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, "worker must scale"
    assert services["simulator"]["environment"]["ECG_SIMULATOR__METRICS_PORT"] == "9110"
    assert services["simulator"]["environment"]["ECG_SIMULATOR__TRUTH"] == "true"
    assert services["evaluator"]["environment"]["ECG_EVALUATOR__METRICS_PORT"] == "9109"
    assert worker["environment"]["ECG_METRICS__PORT"] == "9108"
    for name in ("worker", "simulator", "evaluator"):
        dep = services[name]["depends_on"]["create-topics"]["condition"]
        assert dep == "service_completed_successfully"


def test_compose_references_exist(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts a missing {source}"
            else:
                assert source in compose.get("volumes", {}), f"{name}: undeclared volume {source}"
    grafana_env = compose["services"]["grafana"]["environment"]
    home = grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/" + DASHBOARD.name


def test_prometheus_config_matches_compose(compose):
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(JOBS) <= set(jobs)
    dns = jobs["ecg-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["type"] == "A" and dns["port"] == 9108
    for job, service in JOBS.items():
        assert service in compose["services"]
        if job != "ecg-worker":
            (target,) = jobs[job]["static_configs"][0]["targets"]
            host, port = target.split(":")
            command = compose["services"][host]["command"][0]
            assert host == service and int(port) == PORTS[command]
    assert config["rule_files"] == ["rules/*.yml"]


# ---------------------------------------------------------------- kubernetes


def test_k8s_manifests_parse_and_share_the_image(compose):
    docs = k8s_docs()
    for path in K8S.glob("*.yaml"):
        assert all("kind" in d for d in load_all(path)), path.name
    for d in docs:
        assert "namespace" not in d["metadata"], "manifests must be namespace-agnostic"
    images = {c["image"] for _, t in pod_specs(docs) for c in t["spec"]["containers"]}
    services = compose["services"]
    assert images == {services["worker"]["image"], services["simulator"]["image"]}
    assert services["simulator"]["build"]["target"] == "simulator"
    assert "target" not in services["worker"]["build"], "the worker is the default target"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {f"{i['name']}:{i['newTag']}" for i in kustomization["images"]} == images


def test_k8s_commands_ports_probes_and_annotations():
    docs = k8s_docs()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    commands, selected = set(), set()
    for name, template in pod_specs(docs):
        for c in template["spec"]["containers"]:
            check_command(c["args"])
            commands.add(c["args"][0])
            env = {e["name"]: e.get("value", "x") for e in c.get("env", [])}
            check_env({k: v for k, v in env.items() if "__" in k}, f"k8s {name}")
            port = PORTS.get(c["args"][0])
            if port is None:
                continue
            assert [p["containerPort"] for p in c["ports"]] == [port], name
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in (port, "metrics"), f"{name} {probe}"
                    assert c[probe]["httpGet"]["path"] == "/metrics"
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == str(port), name
            for svc_name, svc in services.items():
                if svc["spec"]["selector"].items() <= template["metadata"]["labels"].items():
                    selected.add(svc_name)
                    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [port]
                    assert svc["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert {"worker", "evaluate-live", "simulate", "create-topics"} <= commands
    assert selected == set(services), "a Service selects no metrics pod"
    worker = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ecg-worker"
    )
    spec = worker["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 15, "worker drain takes up to 10 s"
    (container,) = spec["containers"]
    assert {"readinessProbe", "livenessProbe"} <= set(container)
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "700Mi"}
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    names = {e["name"] for e in container["env"]}
    assert "ECG_KAFKA_SASL_PASSWORD" in names
    secret_ref = next(e for e in container["env"] if e["name"] == "ECG_KAFKA_SASL_PASSWORD")
    (secret,) = load_all(K8S / "secret.example.yaml")
    key_ref = secret_ref["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"]
    assert key_ref["key"] in secret["stringData"]


def test_k8s_configmap_is_a_valid_config(tmp_path):
    docs = k8s_docs()
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    path = tmp_path / "ecg-stream.yaml"
    path.write_text(config_maps["ecg-stream-config"]["data"]["ecg-stream.yaml"])
    cfg = load_config(path, env={})  # raises ConfigError on unknown keys or bad values
    env = config_maps["ecg-stream-env"]["data"]
    mount = next(
        m
        for _, t in pod_specs(docs)
        for c in t["spec"]["containers"]
        for m in c["volumeMounts"]
        if m["name"] == "config"
    )
    assert env["ECG_CONFIG"] == f"{mount['mountPath']}/ecg-stream.yaml"
    assert cfg.metrics.port == PORTS["worker"]
    assert cfg.evaluator.metrics_port == PORTS["evaluate-live"]
    assert cfg.simulator.metrics_port == PORTS["simulate"]
    assert cfg.kafka.session_timeout_ms >= 6000, "real Kafka refuses shorter sessions"

    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == cfg.worker.group_id == "ecg-stream-workers"
    assert trigger["metadata"]["topic"] == cfg.topics.raw
    assert int(trigger["metadata"]["lagThreshold"]) > 0
    assert scaled["spec"]["maxReplicaCount"] == cfg.kafka.partitions, "partitions cap workers"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "ecg-worker"


def test_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed (optional)")
    out = run([kubectl, "kustomize", str(K8S)], ROOT)
    assert out.count("image: ecg-stream:") == 3 and out.count("image: ecg-stream-simulator:") == 1


# ---------------------------------------------------------------- dashboard


def test_dashboard_is_generated_from_its_script():
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", DEPLOY / "grafana" / "build_dashboard.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run deploy/grafana/build_dashboard.py"


def test_dashboard_panels_and_metrics(dashboard):
    known = metric_names()
    ds = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert ds["datasources"][0]["type"] == "prometheus"  # what ${datasource} offers
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "worker"}
    assert variables["datasource"]["type"] == "datasource"
    var = variables["worker"]
    assert var["allValue"] == ".*" and var["includeAll"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for p in panels:
        exprs = [t.get("expr", "") for t in p["targets"]]
        assert exprs and all(exprs), f"panel {p['title']!r} needs targets with expr"
        assert p["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    for title, expr in dashboard_exprs(dashboard):
        assert "$__interval" not in expr and not re.search(r"\[\d+[smh]\]", expr), title
        unknown = promql_metrics(expr) - known
        assert not unknown, f"panel {title!r} uses unknown metrics {unknown}"
        if "$worker" in expr:
            assert 'process=~"$worker"' in expr, f"{title}: use =~ with $worker"
    used = {m for _, e in dashboard_exprs(dashboard) for m in promql_metrics(e)}
    required = [
        "ecg_messages_consumed_total",
        "ecg_beats_produced_total",
        "ecg_process_info",
        "ecg_consumer_lag",
        "ecg_end_to_end_latency_seconds_bucket",
        "ecg_batch_size_bucket",
        "ecg_inference_seconds_bucket",
        "ecg_samples_imputed_total",
        "ecg_beats_lost_total",
        "ecg_anomalies_total",
        "ecg_dlq_messages_total",
        "ecg_beats_classified_total",
        "ecg_live_squared_error_total",
        "ecg_live_masked_samples_total",
        "ecg_live_accuracy",
        "ecg_model_info",
        "ecg_kafka_connected",
        "ecg_sim_buffered_beats",
        "ecg_sim_beats_dropped_total",
    ]
    assert not set(required) - used, f"no panel shows {set(required) - used}"


def test_dashboard_promql_is_valid(dashboard, promtool, tmp_path):
    rules = [
        {
            "record": f"dashboard:expr_{i}",
            "expr": expr.replace("$worker", ".*").replace("$__rate_interval", "1m"),
        }
        for i, (_, expr) in enumerate(dashboard_exprs(dashboard))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([promtool, "check", "rules", str(path)], tmp_path)


# ---------------------------------------------------------------- rules


def test_rules_metrics_and_annotations():
    known = metric_names()
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = [r for r in rules if "alert" in r]
    for rule in rules:
        unknown = promql_metrics(rule["expr"]) - known - recorded
        assert not unknown, f"{rule.get('alert') or rule['record']}: unknown metrics {unknown}"
    for alert in alerts:
        name = alert["alert"]
        assert alert.get("for"), f"{name} needs for:"
        assert alert["labels"]["severity"] in ("info", "warning", "critical"), name
        assert {"summary", "description"} <= set(alert["annotations"]), name
    exprs = {a["alert"]: expand_recorded(a["expr"], rules) for a in alerts}
    assert any(re.search(r"\bup == 0\b", e) for e in exprs.values()), "a worker-down alert"
    assert any("ecg_consumer_lag" in e and "deriv(" in e for e in exprs.values())
    assert any("ecg_dlq_messages_total" in e for e in exprs.values())
    assert any(
        "histogram_quantile(0.99" in e and "ecg_end_to_end_latency" in e for e in exprs.values()
    )
    assert any("ecg_anomalies_total" in e for e in exprs.values())
    assert any('status="unrecoverable"' in e for e in exprs.values())
    assert any(
        'method="model"' in e and "ecg_live_masked_samples_total" in e for e in exprs.values()
    )
    assert any(re.search(r"ecg_kafka_connected.*== 0$", e, re.S) for e in exprs.values())


def test_every_alert_has_firing_and_quiet_unit_tests():
    alerts = {
        r["alert"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    suite = yaml.safe_load(RULE_TESTS.read_text())
    fired, quiet = set(), set()
    for test in suite["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def test_promtool_check_config(promtool):
    # rule_files are relative to prometheus.yml: run from its directory.
    out = run([promtool, "check", "config", "prometheus.yml"], PROM_DIR)
    found = re.search(r"(\d+) rule files found", out)
    assert found and int(found.group(1)) >= 1, out


def test_promtool_check_rules(promtool):
    run([promtool, "check", "rules", str(RULES.relative_to(PROM_DIR))], PROM_DIR)


def test_promtool_test_rules(promtool):
    out = run([promtool, "test", "rules", RULE_TESTS.name], RULE_TESTS.parent)
    assert "SUCCESS" in out
