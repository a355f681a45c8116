"""A real Prometheus for the ops tests: start it on a config, wait until ready, query it."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from stream.tooling.broker import wait_for_port


def query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def wait_ready(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("Prometheus never became ready")


def start_prometheus(binary: str, config: Path, tmp_path: Path, port: int) -> subprocess.Popen:
    """A real Prometheus on 127.0.0.1:port, its data and log in tmp_path; returns once ready."""
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_for_port(port, timeout=30)
    wait_ready(port)
    return prom
