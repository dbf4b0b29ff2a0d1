"""Two tiny `pio-vllm serve` replicas behind vllm-router, started by `pio-vllm serve-replicas`
(loopback only): requests spread over both, priority headers and API keys pass through, a
429 from a full replica is retried on the other, and a killed replica fails its in-flight
requests (a stream straight from it ends with an error; the kernel's teardown of a killed
replica took 0.1-17 s on this VM) while the survivor serves, until the supervisor has restarted it
and the router readmits it. Last, an engine death on a replica ends its streams with an error
and turns its /health to 503 while the router serves from the other one.

The router runs round_robin here so that which replica a request reaches is known; the
default power_of_two reads each replica's /get_load, checked in test_get_load_*.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from benchmarks.server_mode import free_port_block
from tests.server_helpers import KEYS, MODEL, metric, write_config

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = {"Authorization": "Bearer key-plain"}


@dataclass
class ReplicaSet:
    proc: subprocess.Popen[bytes]
    router: str
    replicas: list[str]
    log_dir: Path

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*")))

    def supervisor_log(self) -> str:
        return self.log_dir.joinpath("supervisor.out").read_text(errors="replace")

    def replica_pid(self, index: int) -> int:
        pids = re.findall(rf"started replica-{index} \(pid (\d+)\)", self.supervisor_log())
        return int(pids[-1])


# A replica decoding full tilt answers reads in seconds on this 2-core box (see the fixture).
READ_TIMEOUT_S = 60.0


def admission_events(url: str, **labels: str) -> float:
    """A replica's pio_admission_events_total for `labels`."""
    return metric(httpx.get(url + "/metrics", timeout=READ_TIMEOUT_S).text,
                  "pio_admission_events_total", **labels)


def load(url: str, timeout_s: float = READ_TIMEOUT_S) -> int:
    """What a replica's /get_load reports."""
    return int(httpx.get(url + "/get_load", timeout=timeout_s).json()["load"])


def completed(url: str) -> float:
    return admission_events(url, event="completed")


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.5)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def replica_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSet]:
    tmp = tmp_path_factory.mktemp("replicas")
    config = write_config(
        tmp / "replica.yaml",
        engine={"max_num_seqs": 2},
        # keep-alive: a replica whose engine died stays up answering 503 (the death test)
        vllm_env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"},
        priority_classes={
            "interactive": {"level": 0, "max_queue_len": 8, "weight": 4.0},
            "standard": {"level": 1, "max_queue_len": 8, "weight": 2.0},
            "batch": {"level": 2, "max_queue_len": 1, "weight": 1.0},
        },
        server={"api_keys": [{"key": k, **v} for k, v in KEYS.items()],
                "drain_timeout_s": 2.0},
    )
    port = free_port_block(3)  # the router, then replica i on port + 1 + i
    log_dir = tmp / "logs"
    log_dir.mkdir()
    with (log_dir / "supervisor.out").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pio_vllm", "serve-replicas", "--replicas", "2",
             "--port", str(port), "--policy", "round_robin", "--log-dir", str(log_dir),
             # a replica whose engine decodes full tilt leaves this 2-core box's other
             # processes little CPU: /get_load reads of 3-11 s and 4-token requests of 8-18 s
             # were measured in the 429 test, and the router's default 5 s health timeout then
             # took the full replica out, so no request reached it to be refused
             "--router-arg=--health-check-timeout-secs=30",
             "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rs = ReplicaSet(proc, f"http://127.0.0.1:{port}",
                    [f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"], log_dir)
    try:
        wait_for(lambda: proc.poll() is not None or "serving on" in rs.supervisor_log(), 600,
                 "replicas and router up")
        assert proc.poll() is None, rs.log()[-4000:]
        yield rs
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(180)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(10)
            assert code == 0, rs.supervisor_log()[-3000:]


def chat(text: str, max_tokens: int = 4) -> dict[str, object]:
    return {"model": MODEL, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}]}


def test_requests_spread_over_both_replicas(replica_set: ReplicaSet) -> None:
    before = [completed(url) for url in replica_set.replicas]
    for i in range(6):
        r = httpx.post(replica_set.router + "/v1/chat/completions", json=chat(f"hi {i}"),
                       headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
    after = [completed(url) for url in replica_set.replicas]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]


def test_priority_headers_and_keys_pass_through_the_router(replica_set: ReplicaSet) -> None:
    def done(cls: str) -> float:
        return sum(metric(httpx.get(url + "/metrics", timeout=10).text,
                          "pio_admission_events_total", priority_class=cls,
                          event="completed") for url in replica_set.replicas)

    before = done("interactive")
    r = httpx.post(replica_set.router + "/v1/chat/completions", json=chat("now"), timeout=60,
                   headers={"Authorization": "Bearer key-interactive", "X-Priority": "0"})
    assert r.status_code == 200, r.text
    assert done("interactive") == before + 1
    r = httpx.post(replica_set.router + "/v1/chat/completions", json=chat("now"), timeout=60,
                   headers={"Authorization": "Bearer key-batch", "X-Priority": "interactive"})
    assert r.status_code == 403 and "above this API key's class" in r.text
    r = httpx.post(replica_set.router + "/v1/chat/completions", json=chat("x"), timeout=60)
    assert r.status_code == 401


def test_get_load_counts_what_a_replica_holds(replica_set: ReplicaSet) -> None:
    url = replica_set.replicas[0]
    assert httpx.get(url + "/get_load", timeout=10).json() == {"load": 0}
    assert httpx.get(url + "/ready", timeout=10).json() == {"ready": True}
    with httpx.Client(timeout=60) as c, c.stream(
            "POST", url + "/v1/chat/completions", headers=KEY,
            json={**chat("long", 4000), "stream": True, "ignore_eos": True}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: {"), first
        loads: list[int] = []

        def held() -> bool:
            loads.append(httpx.get(url + "/get_load", timeout=30).json()["load"])
            return loads[-1] == 1

        try:
            wait_for(held, 10, "get_load reads the streaming request")
        except AssertionError as e:
            metrics = [line for line in httpx.get(url + "/metrics", timeout=10).text
                       .splitlines() if line.startswith(("pio_admission_events_total",
                                                         "vllm:num_requests"))]
            tail = [line[:200] for line in lines if line][-3:]  # how the stream ended
            raise AssertionError(f"{e}: loads {loads}; {metrics}; stream tail {tail}") from None
        # still streaming after the read: the load was read while the request ran
        assert next(line for line in lines if line).startswith("data: {")
    assert loads[-1] == 1 and set(loads) <= {0, 1}, loads


def test_a_full_replica_429_is_retried_on_the_other(replica_set: ReplicaSet) -> None:
    """Replica 0's batch capacity (max_num_seqs 2 + lookahead 2) and queue (1) are filled
    directly; router requests that land there are refused with 429 and retried on replica
    1, so the client sees none (requests are sent until replica 0 has refused one)."""
    full = replica_set.replicas[0]
    batch = {"Authorization": "Bearer key-batch"}

    def shed() -> float:
        return admission_events(full, event="shed")

    shed_before = shed()
    with httpx.Client(timeout=120) as c:
        streams = [c.stream("POST", full + "/v1/chat/completions", headers=batch,
                            json={**chat(f"fill {i}", 4000), "stream": True,
                                  "ignore_eos": True}) for i in range(4)]
        opened = [s.__enter__() for s in streams]
        # keep each line iterator: a dropped one closes its response (httpx closes the
        # connection on GeneratorExit), and the server then cancels that request
        lines = [response.iter_lines() for response in opened]
        queued = threading.Thread(target=lambda: httpx.post(
            full + "/v1/chat/completions", headers=batch, json=chat("queued"), timeout=120))
        try:
            for it in lines[:2]:
                next(it)  # the two running ones stream
            queued.start()
            loads: list[tuple[int, float]] = []  # (load, seconds the read took)

            def full_load() -> bool:
                t = time.monotonic()
                held = load(full)
                loads.append((held, round(time.monotonic() - t, 2)))
                return held == 5

            try:
                wait_for(full_load, 60, "replica 0 full: 4 admitted, 1 queued")
            except AssertionError as e:
                events = [line for line in httpx.get(full + "/metrics", timeout=30).text
                          .splitlines() if line.startswith("pio_admission_events_total")]
                raise AssertionError(f"{e}; last loads read {loads[-10:]}; {events}") from None
            # round robin sends every other request to replica 0; send until it has refused
            # one (the router skips a replica it holds unhealthy: see the fixture's timeout)
            codes: list[int] = []
            sent: list[tuple[int, int, float]] = []  # (replica 0's load before, status, s)
            refused = False
            while len(codes) < 12 and not refused:
                before = load(full)
                t = time.monotonic()
                codes.append(httpx.post(replica_set.router + "/v1/chat/completions",
                                        json=chat("x"), headers=batch, timeout=120).status_code)
                sent.append((before, codes[-1], round(time.monotonic() - t, 2)))
                refused = shed() > shed_before
            load_after = load(full)
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
            queued.join(120)
    assert codes == [200] * len(codes), codes  # the client saw no 429
    assert refused, (f"replica 0 refused none of {len(codes)} router requests: (replica 0 load "
                     f"before, status, seconds) {sent}; replica 0 load after {load_after}")


def test_killed_replica_fails_fast_survivor_serves_and_restart_is_readmitted(
        replica_set: ReplicaSet) -> None:
    victim = replica_set.replicas[1]
    ended: list[float] = []

    def held_by(url: str) -> int:  # a read can take seconds while both replicas stream
        return load(url, timeout_s=30)

    with httpx.Client(timeout=120) as c:
        streams: list[Any] = []
        lines: list[Iterator[str]] = []  # kept: see the 429 test

        def open_stream() -> None:
            stream = c.stream("POST", replica_set.router + "/v1/chat/completions",
                              headers=KEY, json={**chat(f"long {len(streams)}", 3000),
                                                 "stream": True, "ignore_eos": True})
            response = stream.__enter__()
            it = response.iter_lines()
            streams.append(stream)
            lines.append(it)
            assert response.status_code == 200, (response.status_code, next(it, ""))
            next(it)

        # the 429 test's aborted streams may still count on replica 0 for a moment
        wait_for(lambda: all(held_by(url) == 0 for url in replica_set.replicas), 60,
                 "both replicas idle before the streams open")
        # round robin alternates, but the 429 test's retries move its counter (one run put
        # two consecutive streams on the victim): open streams through the router until
        # each replica holds one
        while len(streams) < 2 or (len(streams) < 6 and min(
                held_by(url) for url in replica_set.replicas) == 0):
            open_stream()
        # and one stream straight to the victim: what the replica itself does when killed
        direct = c.stream("POST", victim + "/v1/chat/completions", headers=KEY,
                          json={**chat("direct", 3000), "stream": True, "ignore_eos": True})
        direct_lines = direct.__enter__().iter_lines()
        streams.append(direct)
        next(direct_lines)
        held = [held_by(url) for url in replica_set.replicas]
        # the victim holds a router stream and the direct one; what the survivor holds is
        # recorded only (two fresh-clone runs read 0 there although a router stream had
        # been placed on it: the assertions below do not depend on it)
        assert held[1] >= 2, held
        killed_at = time.monotonic()
        direct_ended: list[float] = []

        def drain(it: Iterator[str], into: list[float]) -> None:
            try:
                for _ in it:
                    pass
            except httpx.HTTPError:
                pass
            finally:
                into.append(time.monotonic() - killed_at)

        readers = [threading.Thread(target=drain, args=(it, ended), daemon=True)
                   for it in lines]
        readers.append(threading.Thread(target=drain, args=(direct_lines, direct_ended),
                                        daemon=True))
        for reader in readers:
            reader.start()
        victim_pid = replica_set.replica_pid(1)
        os.killpg(victim_pid, signal.SIGKILL)

        def gone() -> bool:  # tearing down a killed process's memory can take seconds here
            try:
                return psutil.Process(victim_pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(gone, 60, "the killed replica's process exited")
        gone_at = time.monotonic() - killed_at
        # a stream straight from the killed replica ends with an error (its sockets close
        # some seconds after the process is reaped on this VM: 0-8 s measured)
        wait_for(lambda: bool(direct_ended), 30, f"the killed replica's direct stream ended "
                 f"(held {held}; process gone {gone_at:.1f}s after SIGKILL)")
        # Through vllm-router the client's stream usually ends too (0.1-2.6 s measured), but
        # in some runs the router kept it open past 10 s after its upstream died: recorded,
        # not asserted (a router behaviour; README, replicas).
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.2)
        for stream in streams:
            stream.__exit__(None, None, None)  # ends the survivor's stream too
    router_ended = f"{min(ended):.2f}" if ended else "not within 10 s"
    codes = [httpx.post(replica_set.router + "/v1/chat/completions", json=chat(f"after {i}"),
                        headers=KEY, timeout=60).status_code for i in range(4)]
    assert codes == [200] * 4, codes  # new requests go to the survivor
    served_at = time.monotonic() - killed_at
    # the supervisor starts the replica again; the router's health check readmits it
    wait_for(lambda: healthy(victim), 600, "replica 1 restarted")
    healthy_at = time.monotonic() - killed_at
    before = completed(victim)
    wait_for(lambda: httpx.post(replica_set.router + "/v1/chat/completions", json=chat("back"),
                                headers=KEY, timeout=60).status_code == 200
             and completed(victim) > before, 60, "replica 1 readmitted by the router")
    print(f"failure timeline (s after SIGKILL): process gone {gone_at:.2f}; direct stream "
          f"ended {direct_ended[0]:.2f}; a stream through the router ended {router_ended}; "
          f"4 new "
          f"requests served by the survivor by {served_at:.1f}; replica 1 healthy again "
          f"{healthy_at:.1f}; served through the router again "
          f"{time.monotonic() - killed_at:.1f}")


def test_engine_death_ends_streams_and_health_503(replica_set: ReplicaSet) -> None:
    """Last in the module: replica 0's engine stays dead (its server stays up, as
    VLLM_KEEP_ALIVE_ON_ENGINE_DEATH asks) until the module's teardown stops the set."""
    url = replica_set.replicas[0]
    c = openai.OpenAI(base_url=url + "/v1", api_key="key-plain", max_retries=0)
    stream = c.completions.create(model=MODEL, prompt="go", max_tokens=3500, stream=True,
                                  extra_body={"ignore_eos": True})
    next(iter(stream))
    server = psutil.Process(replica_set.replica_pid(0))
    cores = [p for p in server.children(recursive=True)
             if "EngineCor" in " ".join(p.cmdline()) + p.name()]
    assert cores, [p.name() for p in server.children(recursive=True)]
    killed_at = time.monotonic()
    for p in cores:
        p.kill()
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert time.monotonic() - killed_at < 5.0
    assert httpx.get(url + "/health", timeout=5).status_code == 503
    assert httpx.get(url + "/ready", timeout=5).json()["reason"] == "engine dead"

    def router_serves() -> bool:  # once its health check has taken replica 0 out
        return all(httpx.post(replica_set.router + "/v1/chat/completions", json=chat("on"),
                              headers=KEY, timeout=60).status_code == 200 for _ in range(4))

    wait_for(router_serves, 60, "the router serves from the live replica only")
