"""`pio-vllm serve-replicas`: N `pio-vllm serve` replicas behind vLLM's router, on one node
(a supervisor process; each replica and the router are child processes).

    pio-vllm serve-replicas --replicas 2 --config FILE [--port 8000] [--policy power_of_two]
                            [--router-arg ...] [vllm serve flags ...]

Each replica is `pio-vllm serve` on a local port (`--port` + 1 + i) with the same config and
flags; with CUDA each gets its own GPUs (`CUDA_VISIBLE_DEVICES`, tensor-parallel size GPUs
apiece). The router is `vllm-router` (the `router` extra): it routes with `--policy`
(default power_of_two, which reads each replica's `GET /get_load`: the requests pio holds,
queued ones included), health-checks `/health` and takes a failing replica out until it
answers again, and retries a request that a replica sheds with 429 on another replica. A
replica that exits unexpectedly is started again (the router readmits it once healthy). On
SIGTERM or SIGINT the router stops first (no new requests), then every replica drains
(`server.drain_timeout_s`) and exits; the supervisor exits 0 when all exited cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pio_vllm.errors import ConfigError

logger = logging.getLogger(__name__)

POLICIES = ("power_of_two", "round_robin", "random", "cache_aware", "kv_aware",
            "consistent_hash")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    command: list[str]
    env: dict[str, str]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(pio's own arguments, the rest: passed to every replica's `pio-vllm serve`)."""
    parser = argparse.ArgumentParser(
        prog="pio-vllm serve-replicas", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, required=True, help="number of replicas")
    parser.add_argument("--host", default="127.0.0.1", help="where the router listens")
    parser.add_argument("--port", type=int, default=8000, help="the router's port; replica i "
                        "listens on 127.0.0.1 at port + 1 + i")
    parser.add_argument("--policy", default=None, choices=POLICIES,
                        help="vllm-router's routing policy (default: power_of_two; "
                        "round_robin for one replica, which power_of_two does not accept)")
    parser.add_argument("--router-arg", action="append", default=[],
                        help="one more argument for vllm-router (repeatable), e.g. "
                        "--router-arg=--retry-max-retries=3")
    parser.add_argument("--startup-timeout-s", type=float, default=900.0,
                        help="time the replicas get to become healthy")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="write each child's output to a file here (default: inherit)")
    args, rest = parser.parse_known_args(argv)
    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: accepted: 1 or more")
    if args.policy is None:
        args.policy = "power_of_two" if args.replicas >= 2 else "round_robin"
    elif args.policy == "power_of_two" and args.replicas < 2:
        # vllm-router refuses it at start: "Power-of-two policy requires at least 2 workers"
        raise ConfigError("--policy power_of_two needs --replicas 2 or more (vllm-router "
                          "refuses it with one worker); accepted for one replica: "
                          + ", ".join(p for p in POLICIES if p != "power_of_two"))
    for flag in ("--port", "--host"):
        if flag in rest:
            raise ConfigError(f"{flag} is the router's; replicas listen on --port + 1 + i")
    return args, rest


def busy_ports(host: str, ports: list[int]) -> list[int]:
    """The ports in `ports` that cannot be bound on `host` now (in use or not allowed)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


def check_ports_free(args: argparse.Namespace) -> None:
    """Refuse to start when the router's or a replica's port is taken: otherwise a replica
    dies mid-start-up with `Address already in use` and takes the others down with it."""
    wanted = [(args.host, args.port)] + [
        ("127.0.0.1", args.port + 1 + i) for i in range(args.replicas)]
    busy = [port for host, port in wanted if busy_ports(host, [port])]
    if busy:
        raise ConfigError(
            f"--port {args.port}: port(s) {', '.join(map(str, busy))} already in use; "
            f"serve-replicas needs ports {args.port}..{args.port + args.replicas} free "
            f"(the router on --port, replica i on --port + 1 + i): choose another --port")


def router_command(args: argparse.Namespace, worker_urls: list[str]) -> list[str]:
    binary = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    if not Path(binary).exists():
        raise ConfigError(
            "vllm-router is not installed; install pio's `router` extra "
            "(uv run --extra cpu --extra router pio-vllm serve-replicas ...)")
    return [binary, "--worker-urls", *worker_urls, "--policy", args.policy,
            "--host", args.host, "--port", str(args.port),
            "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
            "--health-success-threshold", "1", *args.router_arg]


def _gpus_per_replica(rest: list[str]) -> int:
    for i, flag in enumerate(rest):
        for name in ("--tensor-parallel-size", "-tp"):
            if flag == name and i + 1 < len(rest):
                return int(rest[i + 1])
            if flag.startswith(name + "="):
                return int(flag.split("=", 1)[1])
    return 1


def _visible_devices(index: int, per_replica: int) -> str | None:
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a vLLM dependency
        count = 0
    if count == 0:
        return None
    first = index * per_replica
    if first + per_replica > count:
        raise ConfigError(
            f"replica {index} needs GPUs {first}..{first + per_replica - 1}; this node has "
            f"{count}: use fewer --replicas or a smaller --tensor-parallel-size")
    return ",".join(str(first + k) for k in range(per_replica))


def _spawn(name: str, command: list[str], env: dict[str, str], log_dir: Path | None,
           url: str) -> Child:
    out = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        out = (log_dir / f"{name}.log").open("ab")
    proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out
                            else None, start_new_session=True)
    logger.info("started %s (pid %d): %s", name, proc.pid, " ".join(command))
    return Child(name, proc, url, command, env)


def _wait_healthy(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while pending:
        for child in list(pending):
            if child.proc.poll() is not None:
                raise ConfigError(f"{child.name} exited with status {child.proc.returncode} "
                                  "while starting; see its log")
            try:
                if httpx.get(child.url + "/health", timeout=2).status_code == 200:
                    logger.info("%s is healthy at %s", child.name, child.url)
                    pending.remove(child)
            except httpx.HTTPError:
                pass
        if pending and time.monotonic() > deadline:
            raise ConfigError(f"{[c.name for c in pending]} not healthy after {timeout_s:.0f}s")
        time.sleep(1)


def _stop(children: list[Child], timeout_s: float) -> bool:
    """SIGTERM each (replicas drain), wait, kill what is left; True if all exited 0."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    clean = True
    for child in children:
        try:
            code = child.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs; killing it", child.name, timeout_s)
            os.killpg(child.proc.pid, signal.SIGKILL)
            code = child.proc.wait(10)
        clean = clean and code in (0, -signal.SIGTERM)
        logger.info("%s exited with status %s", child.name, code)
    return clean


def main(argv: list[str]) -> int:
    # The supervisor's own lines must reach the operator whatever logging is set up already.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        args, rest = parse_args(argv)
        per_replica = _gpus_per_replica(rest)
        check_ports_free(args)
    except (ConfigError, ValueError) as e:
        logger.error("%s", e)
        return 2
    replicas: list[Child] = []
    router: Child | None = None
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logger.info("signal %d: stopping the router, then draining the replicas", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        for i in range(args.replicas):
            port = args.port + 1 + i
            env = dict(os.environ)
            devices = _visible_devices(i, per_replica)
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices
            replicas.append(_spawn(
                f"replica-{i}", [sys.executable, "-m", "pio_vllm", "serve", *rest,
                                 "--host", "127.0.0.1", "--port", str(port)],
                env, args.log_dir, f"http://127.0.0.1:{port}"))
        _wait_healthy(replicas, args.startup_timeout_s)
        router = _spawn("router", router_command(args, [c.url for c in replicas]),
                        dict(os.environ), args.log_dir, f"http://{args.host}:{args.port}")
        _wait_healthy([router], 60)
        logger.info("serving on %s with %d replicas (%s)", router.url, len(replicas),
                    args.policy)
        while not stop.wait(1.0):
            if router.proc.poll() is not None:
                logger.error("the router exited with status %s", router.proc.returncode)
                code = 1
                break
            for i, child in enumerate(replicas):
                if child.proc.poll() is not None and not stop.is_set():
                    logger.error("%s exited with status %s; starting it again", child.name,
                                 child.proc.returncode)
                    replicas[i] = _spawn(child.name, child.command, child.env, args.log_dir,
                                         child.url)
    except ConfigError as e:
        logger.error("%s", e)
        code = 2
    clean = _stop([router] if router is not None else [], 30)
    clean = _stop(replicas, 120) and clean
    return code if code else (0 if clean else 1)
