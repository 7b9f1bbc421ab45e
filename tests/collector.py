"""A real OpenTelemetry collector for the tests: the Rust ``rotel`` agent from its Python wheel.

The test receiver (``otlp_receiver.py``) decodes with Python's protobuf; a
collector written against another implementation of the OTLP schema (Rust's
prost and tonic here) is the independent check that what the proxy encodes by
hand is what collectors accept and pass on. :class:`Collector` runs the
agent with its OTLP receivers (gRPC and HTTP) on free local ports and its
OTLP exporter pointed at the test receiver.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["Collector", "agent_path"]


def agent_path() -> Path | None:
    """The agent binary the ``rotel`` wheel carries, or None without the wheel."""
    try:
        import rotel
    except ImportError:
        return None
    path = Path(rotel.__file__).parent / "rotel-agent"
    return path if os.access(path, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    """``rotel-agent start`` on free ports, exporting over OTLP to ``export_to`` (``http://host:port``)."""

    def __init__(self, workdir: Path, export_to: str, export_protocol: str = "grpc") -> None:
        binary = agent_path()
        if binary is None:
            raise RuntimeError("the rotel wheel is not installed")
        self.binary = binary
        self.workdir = workdir
        self.export_to = export_to
        self.export_protocol = export_protocol
        self.grpc_port = _free_port()
        self.http_port = _free_port()
        self.log = workdir / "collector.out"
        self.proc: subprocess.Popen | None = None

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 15.0) -> "Collector":
        args = [
            str(self.binary), "start",
            "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
            "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
            "--exporter", "otlp",
            "--otlp-exporter-endpoint", self.export_to,
            "--otlp-exporter-protocol", self.export_protocol,
            "--batch-timeout", "50ms",
            "--pid-file", str(self.workdir / "collector.pid"),
            "--log-file", str(self.workdir / "collector.log"),
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        for port in (self.grpc_port, self.http_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"collector exited with {self.proc.returncode}: {self.output()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"collector not listening on {port}: {self.output()}") from None
                    time.sleep(0.05)
        return self

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
