"""One admission order across API-server processes: controllers sharing a NodeLedger.

Two controllers here stand for two API-server processes: each maps the same ledger file
through its own file descriptor (the flock between them is the kernel's, as between
processes). States are built by construction and decisions re-run with `poke()`, as a
process's 5 ms poll would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pio_vllm.admission import node_ledger
from pio_vllm.admission.controller import AdmissionController, Release, Ticket, TicketState
from pio_vllm.admission.node_ledger import NodeLedger
from pio_vllm.admission.slo_policy import WorkBucket
from pio_vllm.settings import AdmissionSettings
from tests.unit.test_admission_policy import CLASSES, LEVEL, FakeClock, FakeEngine, settle


class Engine(FakeEngine):
    """Hands each granted ticket to 'vLLM' at once (its render is done): below the top
    class a process prepares one request at a time."""

    async def _admit(self, ticket: Ticket) -> None:
        await super()._admit(ticket)
        if ticket.state is TicketState.PREPARING:
            self.start(ticket)


def ledger(path: Path, index: int, pid: int, alive: object = None) -> NodeLedger:
    return NodeLedger(path, index, list(CLASSES), alive=alive or (lambda _pid: True), pid=pid)


def node_controller(led: NodeLedger, clock: FakeClock, capacity: int = 2,
                    **kw: object) -> AdmissionController:
    settings = AdmissionSettings(**{"max_preparing": 8, **kw})  # type: ignore[arg-type]
    # as in the OpenAI server: the top class is bounded by capacity only
    return AdmissionController(settings, CLASSES, "standard", capacity, clock=clock, node=led,
                               bound_top_class=False)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return node_ledger.create(tmp_path / "ledger", processes=2)


async def test_capacity_is_the_nodes_not_each_process(path: Path) -> None:
    clock = FakeClock()
    a = Engine(node_controller(ledger(path, 0, 101), clock))
    b = Engine(node_controller(ledger(path, 1, 102), clock))
    held = [a.submit(f"a{i}", "batch") for i in range(2)]
    await settle()
    assert a.granted == ["a0", "a1"]
    b.submit("b0", "batch")
    await settle()
    assert b.granted == []  # A holds the node's 2 sequences
    assert b.ctl.load() == 3 and b.ctl.queued_count() == 1
    a.finish(held[0])
    b.ctl.poke()
    await settle()
    assert b.granted == ["b0"]


async def test_a_request_queued_at_b_goes_before_batch_queued_earlier_at_a(path: Path) -> None:
    """The node's order, not each process's: when A frees a sequence, A's own queued batch
    request does not take it while B holds a standard one."""
    clock = FakeClock()
    a = Engine(node_controller(ledger(path, 0, 101), clock))
    b = Engine(node_controller(ledger(path, 1, 102), clock))
    running = [a.submit(f"s{i}", "standard") for i in range(2)]
    await settle()
    a.submit("a-batch", "batch")
    await settle()
    clock.now += 1.0
    b.submit("b-standard", "standard")
    await settle()
    assert a.granted == ["s0", "s1"] and b.granted == []
    a.finish(running[0])  # A's pump runs first, on A's release
    await settle()
    assert a.granted == ["s0", "s1"], "A took the freed sequence for its later-ranked batch"
    b.ctl.poke()
    await settle()
    assert b.granted == ["b-standard"]
    # an urgent request at B goes in at once: lower-priority work does not count against it
    # (pio's scheduler preempts it in vLLM), whichever process holds that work
    b.submit("b-urgent", "interactive")
    await settle()
    assert b.granted == ["b-standard", "b-urgent"]
    assert a.granted == ["s0", "s1"]


async def test_urgent_at_b_is_granted_while_a_has_batch_queued_at_full_capacity(
        path: Path) -> None:
    clock = FakeClock()
    a = Engine(node_controller(ledger(path, 0, 101), clock))
    b = Engine(node_controller(ledger(path, 1, 102), clock))
    for i in range(4):
        a.submit(f"a{i}", "batch")
    await settle()
    assert a.granted == ["a0", "a1"]
    b.submit("urgent", "interactive")
    await settle()
    assert b.granted == ["urgent"]
    assert [t.request_id for t in b.ctl._node_granted()].count("api-server-0") == 2


async def test_below_the_top_class_each_process_prepares_one_at_a_time(path: Path) -> None:
    clock = FakeClock()
    a = FakeEngine(node_controller(ledger(path, 0, 101), clock, capacity=8))
    b = FakeEngine(node_controller(ledger(path, 1, 102), clock, capacity=8))
    first = a.submit("a0", "batch")
    a.submit("a1", "batch")
    b.submit("b0", "batch")
    await settle()
    assert a.granted == ["a0"] and b.granted == ["b0"]  # one render per process
    a.start(first)  # a0 handed to vLLM: A's rendering thread is free
    await settle()
    assert a.granted == ["a0", "a1"]
    a.submit("urgent", "interactive")
    await settle()
    assert a.granted[-1] == "urgent"  # the top class is not held to one at a time


async def test_a_dead_process_releases_its_tickets(path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(proc.stdout)
    clock = FakeClock()
    a = Engine(node_controller(ledger(path, 0, dead_pid), clock))
    for i in range(2):
        a.submit(f"a{i}", "batch")
    await settle()
    assert a.granted == ["a0", "a1"]
    b = Engine(node_controller(NodeLedger(path, 1, list(CLASSES)), clock))  # real pids
    b.submit("b0", "batch")
    await settle()
    assert b.granted == ["b0"]  # A's row belongs to a process that is gone


def test_the_lock_of_a_killed_process_is_released(path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
         str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        led = ledger(path, 0, os.getpid())
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        with led.locked():  # would block forever if the kernel kept the dead holder's lock
            led.publish([], [])
    finally:
        holder.kill()
        holder.wait()


def test_work_bucket_is_shared_through_the_header(path: Path) -> None:
    a, b = ledger(path, 0, 101), ledger(path, 1, 102)
    assert a.load_bucket() is None
    bucket = WorkBucket(2.0, 10.0)
    bucket.take(1.5, 10.0)
    a.store_bucket(*bucket.state())
    loaded = b.load_bucket()
    assert loaded is not None
    other = WorkBucket(2.0, 0.0)
    other.restore(*loaded)
    other.rate = 1.0
    assert other.level(10.25) == pytest.approx(0.75)


def test_engine_stats_reach_the_other_processes(path: Path) -> None:
    a, b = ledger(path, 0, 101), ledger(path, 1, 102)
    assert b.newer_engine() is None
    a.store_engine(0.5, 7, 1.0)
    assert b.newer_engine() == (0.5, 7)
    assert b.newer_engine() is None


def test_attach_rejects_a_foreign_file_and_a_bad_index(tmp_path: Path, path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"\0" * node_ledger.ledger_size(2))
    with pytest.raises(ValueError, match="not a pio node ledger"):
        ledger(other, 0, 1)
    with pytest.raises(ValueError, match="outside 0..1"):
        ledger(path, 2, 1)
    with pytest.raises(ValueError, match="1..64"):
        node_ledger.create(tmp_path / "x", 0)


async def test_released_and_expired_tickets_leave_the_other_processes_view(
        path: Path) -> None:
    clock = FakeClock()
    a = Engine(node_controller(ledger(path, 0, 101), clock))
    b = Engine(node_controller(ledger(path, 1, 102), clock))
    tickets = [a.submit(f"a{i}", "batch") for i in range(3)]
    await settle()
    assert b.ctl.load() == 3
    for t in tickets[:2]:
        a.finish(t, Release.COMPLETED)
    await settle()
    a.finish(tickets[2])
    await settle()
    assert tickets[2].state is TicketState.DONE
    assert b.ctl.load() == 0 and a.ctl.held_state() == {
        "waiting": 0, "granted": 0, "class_queues": 0}
    assert LEVEL["batch"] == 2
    await asyncio.sleep(0)


async def test_a_restarted_process_row_is_read_afresh(path: Path) -> None:
    """A row's version only grows, also across a re-attach, so another process never keeps
    a cached view of a row that was rewritten."""
    clock = FakeClock()
    reader = ledger(path, 1, 102)
    first = Engine(node_controller(ledger(path, 0, 101), clock))
    first.submit("a0", "batch")
    await settle()
    assert len(reader.remote_granted()) == 1
    assert reader.remote_granted()[0].class_name == "batch"
    before = reader.token()[0]  # row 0's version, as process 1 sees it
    again = ledger(path, 0, 103)  # the same row, attached by a new process
    assert reader.token()[0] > before
    urgent = Ticket(key=1, request_id="u", class_name="interactive", level=0, weight=4.0,
                    arrival_at=0.0, queue_deadline_at=None, state=TicketState.IN_ENGINE)
    again.publish([urgent], [])  # its first publish: the same count as the cached view
    assert [t.class_name for t in reader.remote_granted()] == ["interactive"]
