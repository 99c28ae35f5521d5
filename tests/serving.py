"""`llmc serve` in a process of its own on a free loopback port, for the server's tests."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time

import httpx2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(artifact, *args: str, timeout: float = 120):
    """Yields (base URL, process) once /health answers 200; stops the server with SIGTERM after
    and checks it exits 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmc.cli", "serve", str(artifact), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"llmc serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx2.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("llmc serve did not become healthy")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, proc.stdout.read()


def metric(base: str, name: str) -> float:
    """A metric's value from /metrics (unlabelled)."""
    for line in httpx2.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_for(base: str, name: str, value: float, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    while (got := metric(base, name)) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return got
