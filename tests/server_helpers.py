"""Launch `pio-vllm serve` as a real process on 127.0.0.1 for the server tests; the image host
the shared server may fetch from (one loopback port, opened in its config)."""

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
from tests.helpers import TEST_MAX_MODEL_LEN, TINY_CONFIG, Route, http_server

KEYS = {
    "key-interactive": {"tenant": "alpha", "priority_class": "interactive"},
    "key-batch": {"tenant": "beta", "priority_class": "batch"},
    "key-plain": {"tenant": "gamma"},
}


MODEL = "pio:tiny"


class ImageHost:
    """A loopback HTTP server whose routes tests add while it runs (`routes[path] = ...`);
    the shared server's config allows fetches from its port only."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self._cm = http_server(self.routes)
        self.base = self._cm.__enter__()
        self.port = int(self.base.rsplit(":", 1)[1])

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def shared_server_config(path: Path, image_port: int) -> Path:
    """The shared test server: max_num_seqs 4 (capacity 4 + lookahead 2), a batch queue of
    2, three API keys, the image host's port as the only non-public fetch destination, the
    model's whole context (fills of `FILL_TOKENS` outlast any test)."""
    return write_config(
        path,
        engine={"max_num_seqs": 4, "disable_log_stats": False,
                "max_model_len": TEST_MAX_MODEL_LEN},
        priority_classes={
            "interactive": {"level": 0, "max_queue_len": 16, "weight": 4.0},
            "standard": {"level": 1, "max_queue_len": 16, "weight": 2.0},
            "batch": {"level": 2, "max_queue_len": 2, "weight": 1.0},
        },
        images={"max_image_bytes": 2_000_000,
                "allowed_private_networks": [f"127.0.0.1/32:{image_port}"]},
        server={"api_keys": [{"key": k, **v} for k, v in KEYS.items()],
                "drain_timeout_s": 4.0, "body_timeout_s": 3.0, "max_body_bytes": 4_000_000,
                "objectives": {"chat": "interactive", "offline": "batch"}},
    )


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


def launch_server(config: Path, log_path: Path, *extra: str) -> Server:
    """Start `pio-vllm serve` on a free loopback port without waiting for it."""
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pio_vllm", "serve", "--config", str(config),
         "--host", "127.0.0.1", "--port", str(port), *extra],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


def wait_healthy(server: Server, timeout_s: float = 240) -> Server:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n"
                               f"{server.log()[-4000:]}")
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


def logged_routes(log: str) -> dict[str, dict[str, str]]:
    """path -> method -> policy, from the route table the server logs at start-up."""
    table: dict[str, dict[str, str]] = {}
    for line in log.splitlines():
        head, sep, rest = line.partition(" route ")
        if not sep or "pio_vllm.server.launcher" not in head:
            continue
        path, _, policies = rest.partition(": ")
        for item in policies.split(", "):
            method, _, policy = item.strip().partition(" ")
            table.setdefault(path, {})[method] = policy
    return table
