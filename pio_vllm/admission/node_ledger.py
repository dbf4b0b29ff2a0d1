"""NodeLedger: one admission order across several API-server processes (shared memory).

With `pio-vllm serve --api-server-count N`, vLLM runs N API-server processes in front of one
EngineCore, each with its own event loop, its own rendering thread and its own pio
AdmissionController. Left alone, each controller would admit up to the engine's capacity,
each would keep its own SLO work bucket, and an urgent request arriving at one process would
not outrank batch work queued at another. The ledger makes the N controllers decide as one:

- every process publishes its state in its own row of a small file mapped into all of them
  (under /dev/shm where there is one): the tickets it has granted (level, class, slots, state,
  work, first token) and the tickets queued in it (level, arrival, slots, work);
- a controller decides with the other rows' granted tickets counted as its own (capacity,
  the preparing bound, the engine backlog SLO pricing sees) and the other rows' queued
  tickets placed in its queue order as work it may not take (`controller._pump`): one order
  across the node, in which each process grants only its own tickets;
- the SLO work bucket and the latest engine stats live in the header, read and written
  under the same lock;
- decisions take an exclusive `flock` on the file for the few microseconds of a pump. The
  kernel drops a process's flock when it dies, and a row whose process is gone is skipped
  by every reader: a dead process's tickets are released at once, nothing waits on it.

A process learns of another's change by reading the rows: while it has queued tickets it
pumps again every `poll_s` (5 ms: one row read, no syscall but the lock). Chosen over
EngineCore utility calls because those are answered between engine steps (a 2B prefill
step took ~5 s on this CPU), and over a network service, which the issue rules out.

Why hand-written: `multiprocessing.shared_memory` gives the bytes but neither the lock that
a dying process releases nor the layout; the layout is numpy arrays over one mmap.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from pio_vllm.admission.ticket import Ticket, TicketState

MAGIC = 0x70696F6C  # "piol"
VERSION = 1
MAX_ENTRIES = 1024  # granted (and, separately, queued) tickets one row can publish

# header (float64): magic, version, processes, bucket level, bucket time, engine kv usage,
# engine running, engine stats time, engine stats sequence, the step model (base, per token,
# per vision token, sequence), the admission capacity and its sequence
_HEADER = 16
_H_MAGIC, _H_VERSION, _H_PROCS, _H_BUCKET, _H_BUCKET_AT, _H_KV, _H_RUNNING, _H_STATS_AT, \
    _H_STATS_SEQ, _H_MODEL_BASE, _H_MODEL_TOKEN, _H_MODEL_VISION, _H_MODEL_SEQ, \
    _H_CAPACITY, _H_CAPACITY_SEQ = range(15)

# a row's head (float64): pid, heartbeat, granted entries, queued entries, version
_ROW_HEAD = 8
_R_PID, _R_BEAT, _R_GRANTED, _R_QUEUED, _R_VERSION = range(5)

# a granted entry: level, class index, slots, state (1 preparing, 2 in engine), late,
# ttft target (nan: none), work_s, vision tokens, started_at (nan), first_token_at (nan)
_G_FIELDS = 10
# a queued entry: level, class index, slots, arrival_at (for the order), work_s, charge_s,
# vision tokens, prompt tokens
_Q_FIELDS = 8

_ROW = _ROW_HEAD + MAX_ENTRIES * (_G_FIELDS + _Q_FIELDS)
_STATE_CODE = {TicketState.PREPARING: 1.0, TicketState.IN_ENGINE: 2.0}


def ledger_size(processes: int) -> int:
    """Bytes of a ledger for `processes` rows."""
    return 8 * (_HEADER + processes * _ROW)


def default_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path("/tmp")


def create(path: Path, processes: int) -> Path:
    """Make the ledger file for `processes` API-server processes (the parent, before it
    starts them); rows start empty."""
    if not 1 <= processes <= 64:
        raise ValueError(f"a node ledger holds 1..64 processes, got {processes}")
    size = ledger_size(processes)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mem:
            header = np.ndarray((_HEADER,), dtype=np.float64, buffer=mem)
            header[_H_MAGIC], header[_H_VERSION], header[_H_PROCS] = MAGIC, VERSION, processes
            header[_H_BUCKET] = math.nan  # the first process to price work fills it
            del header
    finally:
        os.close(fd)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class NodeLedger:
    """One process's view of the shared ledger (`attach` it in each API-server process)."""

    def __init__(self, path: Path, index: int, class_names: list[str], *,
                 poll_s: float = 0.005, alive: Callable[[int], bool] = _alive,
                 pid: int | None = None) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR)
        size = os.fstat(self._fd).st_size
        self._mem = mmap.mmap(self._fd, size)
        self._header = np.ndarray((_HEADER,), dtype=np.float64, buffer=self._mem)
        if int(self._header[_H_MAGIC]) != MAGIC or int(self._header[_H_VERSION]) != VERSION:
            raise ValueError(f"{self.path} is not a pio node ledger (version {VERSION})")
        self.processes = int(self._header[_H_PROCS])
        if size < ledger_size(self.processes):
            raise ValueError(f"{self.path}: {size} bytes, a ledger of {self.processes} "
                             f"processes needs {ledger_size(self.processes)}")
        if not 0 <= index < self.processes:
            raise ValueError(f"process index {index} is outside 0..{self.processes - 1}")
        self.index = index
        self.poll_s = poll_s
        self._classes = list(class_names)
        self._class_index = {name: i for i, name in enumerate(self._classes)}
        self._alive = alive
        self._rows = [self._row(i) for i in range(self.processes)]
        self._lock_depth = 0
        self._published = (np.zeros((0, _G_FIELDS)), np.zeros((0, _Q_FIELDS)))
        self._stats_seen = 0.0
        self._model_seen = float(self._header[_H_MODEL_SEQ])
        self._capacity_seen = float(self._header[_H_CAPACITY_SEQ])
        self._cache: dict[int, tuple[float, list[Ticket], list[Ticket]]] = {}
        self._liveness: dict[int, tuple[float, bool]] = {}
        mine = self._rows[index]
        version = float(mine[0][_R_VERSION])  # stays increasing: readers cache by it
        mine[0][:] = 0.0
        mine[0][_R_VERSION] = version + 1
        mine[0][_R_PID] = float(os.getpid() if pid is None else pid)
        mine[0][_R_BEAT] = time.monotonic()

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        base = 8 * (_HEADER + i * _ROW)
        head = np.ndarray((_ROW_HEAD,), dtype=np.float64, buffer=self._mem, offset=base)
        granted = np.ndarray((MAX_ENTRIES, _G_FIELDS), dtype=np.float64, buffer=self._mem,
                             offset=base + 8 * _ROW_HEAD)
        queued = np.ndarray((MAX_ENTRIES, _Q_FIELDS), dtype=np.float64, buffer=self._mem,
                            offset=base + 8 * (_ROW_HEAD + MAX_ENTRIES * _G_FIELDS))
        return head, granted, queued

    def close(self) -> None:
        """Empty this process's row (its tickets leave the node's view) and unmap."""
        if self._mem.closed:
            return
        head = self._rows[self.index][0]
        head[_R_GRANTED] = head[_R_QUEUED] = 0.0
        head[_R_PID] = 0.0
        del head
        self._rows.clear()
        self._header = None  # type: ignore[assignment]
        self._mem.close()
        os.close(self._fd)

    # -- the lock -----------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive over the node (re-entrant within this process). The kernel releases it
        if the process dies holding it."""
        if self._lock_depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- this process's row ---------------------------------------------------------------

    def publish(self, granted: Iterable[Ticket],
                queued: Iterable[tuple[float, float, Ticket]]) -> None:
        """Write this process's granted tickets and queued ones, each queued one as
        (the arrival time its place in the order uses, what it will charge the work bucket,
        the ticket). The row's version moves only when its content does, so the other
        processes' polls skip their decisions while nothing changed."""
        g = np.array([
            (t.level, self._class_index.get(t.class_name, -1), t.slots,
             _STATE_CODE.get(t.state, 0.0), float(t.late),
             math.nan if t.ttft_target_s is None else t.ttft_target_s, t.work_s,
             t.vision_tokens, math.nan if t.started_at is None else t.started_at,
             math.nan if t.first_token_at is None else t.first_token_at)
            for t in itertools.islice(granted, MAX_ENTRIES)], dtype=np.float64).reshape(
            -1, _G_FIELDS)
        q = np.array([
            (t.level, self._class_index.get(t.class_name, -1), t.slots, arrival_at, t.work_s,
             charge_s, t.vision_tokens, t.prompt_tokens)
            for arrival_at, charge_s, t in itertools.islice(queued, MAX_ENTRIES)],
            dtype=np.float64).reshape(-1, _Q_FIELDS)
        head, g_rows, q_rows = self._rows[self.index]
        head[_R_BEAT] = time.monotonic()
        if (np.array_equal(g, self._published[0], equal_nan=True)
                and np.array_equal(q, self._published[1], equal_nan=True)):
            return
        g_rows[:len(g)] = g
        q_rows[:len(q)] = q
        head[_R_GRANTED], head[_R_QUEUED] = len(g), len(q)
        head[_R_VERSION] += 1
        self._published = (g, q)

    def token(self) -> tuple[float, ...]:
        """Changes whenever another process's row, the engine stats, the step model or the
        capacity changed, or a process died (a poll with the same token has nothing to
        decide). The bucket
        moves only with a row (a grant takes from it, a release refunds), or with time,
        which the controller's own timer covers."""
        h = self._header
        return (*(float(self._rows[i][0][_R_VERSION]) for i in self.others()),
                float(h[_H_STATS_SEQ]), float(h[_H_MODEL_SEQ]), float(h[_H_CAPACITY_SEQ]),
                float(self.live_processes()))  # a process that died releases its tickets

    # -- the other rows -------------------------------------------------------------------

    def _live(self, i: int, pid: int, now: float) -> bool:
        seen = self._liveness.get(i)
        if seen is not None and seen[0] > now - 0.5 and pid == int(self._rows[i][0][_R_PID]):
            return seen[1]
        alive = pid > 0 and self._alive(pid)
        self._liveness[i] = (now, alive)
        return alive

    def _remote(self, i: int) -> tuple[list[Ticket], list[Ticket]]:
        head, g_rows, q_rows = self._rows[i]
        pid = int(head[_R_PID])
        if pid <= 0 or not self._live(i, pid, time.monotonic()):
            return [], []
        version = float(head[_R_VERSION])
        cached = self._cache.get(i)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
        granted = [self._granted_ticket(i, k, g_rows[k]) for k in range(int(head[_R_GRANTED]))]
        queued = [self._queued_ticket(i, k, q_rows[k]) for k in range(int(head[_R_QUEUED]))]
        self._cache[i] = (version, granted, queued)
        return granted, queued

    def _class(self, index: float) -> str:
        i = int(index)
        return self._classes[i] if 0 <= i < len(self._classes) else "?"

    def _granted_ticket(self, row: int, k: int, e: np.ndarray) -> Ticket:
        level, cls, slots, state, late, ttft, work, vision, started, first = (float(x) for x in e)
        return Ticket(
            key=-(row * MAX_ENTRIES + k + 1), request_id=f"api-server-{row}", class_name=
            self._class(cls), level=int(level), weight=1.0, arrival_at=0.0,
            queue_deadline_at=None, slots=int(slots), vision_tokens=int(vision),
            ttft_target_s=None if math.isnan(ttft) else ttft, late=bool(late),
            state=TicketState.PREPARING if state == 1.0 else TicketState.IN_ENGINE,
            work_s=work, started_at=None if math.isnan(started) else started,
            first_token_at=None if math.isnan(first) else first)

    def _queued_ticket(self, row: int, k: int, e: np.ndarray) -> Ticket:
        level, cls, slots, arrival, work, charge, vision, prompt = (float(x) for x in e)
        return Ticket(
            key=-(row * MAX_ENTRIES + k + 1) - MAX_ENTRIES * self.processes,
            request_id=f"api-server-{row}", class_name=self._class(cls), level=int(level),
            weight=1.0, arrival_at=arrival, queue_deadline_at=None, slots=int(slots),
            prompt_tokens=int(prompt), vision_tokens=int(vision), work_s=work,
            charged_s=charge, state=TicketState.QUEUED)

    def others(self) -> Iterator[int]:
        return (i for i in range(self.processes) if i != self.index)

    def remote_granted(self) -> list[Ticket]:
        """The other live processes' granted tickets (stand-ins: level, class, slots, state,
        work, first token)."""
        out: list[Ticket] = []
        for i in self.others():
            out.extend(self._remote(i)[0])
        return out

    def remote_queued(self) -> list[Ticket]:
        """The other live processes' queued tickets (stand-ins, each with its arrival time
        in the order as `arrival_at`): places in the node's order this process may not
        grant."""
        out: list[Ticket] = []
        for i in self.others():
            out.extend(self._remote(i)[1])
        return out

    def live_processes(self) -> int:
        """Processes with a live row (this one included)."""
        now = time.monotonic()
        return 1 + sum(1 for i in self.others()
                       if (pid := int(self._rows[i][0][_R_PID])) > 0 and self._live(i, pid, now))

    # -- shared bucket and engine stats ---------------------------------------------------

    def load_bucket(self) -> tuple[float, float] | None:
        """(level, time) of the node's work bucket; None before any process priced work."""
        level = float(self._header[_H_BUCKET])
        return None if math.isnan(level) else (level, float(self._header[_H_BUCKET_AT]))

    def store_bucket(self, level: float, at: float) -> None:
        if (level, at) != (float(self._header[_H_BUCKET]), float(self._header[_H_BUCKET_AT])):
            self._header[_H_BUCKET], self._header[_H_BUCKET_AT] = level, at

    def store_engine(self, kv_usage: float, running: int, at: float) -> None:
        """The engine stats this process just received (vLLM sends each step's stats to one
        API-server process only)."""
        self._header[_H_KV], self._header[_H_RUNNING] = kv_usage, running
        self._header[_H_STATS_AT] = at
        self._header[_H_STATS_SEQ] += 1

    def newer_engine(self) -> tuple[float, int] | None:
        """(kv usage, running) if another process stored stats since this one last looked."""
        seq = float(self._header[_H_STATS_SEQ])
        if seq == self._stats_seen:
            return None
        self._stats_seen = seq
        return float(self._header[_H_KV]), int(self._header[_H_RUNNING])

    def store_model(self, model: tuple[float, float, float]) -> None:
        """The step model one process fitted (only process 0 runs the tuning loop)."""
        h = self._header
        h[_H_MODEL_BASE], h[_H_MODEL_TOKEN], h[_H_MODEL_VISION] = model
        h[_H_MODEL_SEQ] += 1
        self._model_seen = float(h[_H_MODEL_SEQ])

    def newer_model(self) -> tuple[float, float, float] | None:
        h = self._header
        seq = float(h[_H_MODEL_SEQ])
        if seq == self._model_seen:
            return None
        self._model_seen = seq
        return float(h[_H_MODEL_BASE]), float(h[_H_MODEL_TOKEN]), float(h[_H_MODEL_VISION])

    def store_capacity(self, capacity: int) -> None:
        self._header[_H_CAPACITY] = capacity
        self._header[_H_CAPACITY_SEQ] += 1
        self._capacity_seen = float(self._header[_H_CAPACITY_SEQ])

    def newer_capacity(self) -> int | None:
        seq = float(self._header[_H_CAPACITY_SEQ])
        if seq == self._capacity_seen:
            return None
        self._capacity_seen = seq
        return int(self._header[_H_CAPACITY])
