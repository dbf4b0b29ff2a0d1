"""Launch `pio-vllm serve` as a real process on 127.0.0.1 for the server tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import derive_config
from benchmarks.server_mode import free_port
from tests.helpers import TINY_CONFIG

KEYS = {
    "key-interactive": {"tenant": "alpha", "priority_class": "interactive"},
    "key-batch": {"tenant": "beta", "priority_class": "batch"},
    "key-plain": {"tenant": "gamma"},
}


def write_config(path: Path, **sections: Any) -> Path:
    """configs/tiny-cpu.yaml with `sections` merged one level deep."""
    return derive_config(TINY_CONFIG, path, **sections)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start_server(config: Path, log_path: Path, *extra: str, timeout_s: float = 240) -> Server:
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pio_vllm", "serve", "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port), *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server not healthy after {timeout_s}s:\n{server.log()[-4000:]}")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample's values whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
