"""Start the suite's long, independent start-ups side by side.

Each engine start here is mostly two or three single-threaded imports of vLLM, torch and
transformers (~17 s each on this 2-core machine). Run one after another, the session
engine, the shared server, the seed example and the benchmark smoke test spend ~4.5 minutes
starting up while one core idles. So when the session engine or the shared server is first
needed, the other selected start-ups are launched as processes too, and the fixture that
started them waits for all of them before any test runs: every timing-sensitive test still
has the machine to itself.

A test module opts in with `EARLY = {job name: Early(test name, job factory)}`; the test
reads a job's result with `EarlyStart.result(job name)`, which starts the job then if it was
not started early (a run that selects only that test). A job starts early only when its test
is selected."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Job:
    """A command to run to completion: argv in cwd with extra environment variables."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 600
    nice: int = 0  # > 0: runs on what the other start-ups leave (it is not the longest)


JobFactory = Callable[[Path], Job]  # given a fresh folder of its own


@dataclass(frozen=True)
class Early:
    test: str  # the test (its name, parameters included) that reads the job's result
    make: JobFactory


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    folder: Path
    wall_s: float


class _Running:
    def __init__(self, job: Job, folder: Path) -> None:
        self.job, self.folder = job, folder
        self.started = time.monotonic()
        self._out = (folder / "stdout.txt").open("wb")
        self._err = (folder / "stderr.txt").open("wb")
        argv = ["nice", "-n", str(job.nice), *job.argv] if job.nice else job.argv
        self.proc = subprocess.Popen(argv, cwd=job.cwd, stdout=self._out, stderr=self._err,
                                     env={**os.environ, **job.env})

    def wait(self) -> Finished:
        left = self.job.timeout_s - (time.monotonic() - self.started)
        try:
            code = self.proc.wait(max(left, 1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            code = -9
        self._out.close()
        self._err.close()
        return Finished(code, (self.folder / "stdout.txt").read_text(errors="replace"),
                        (self.folder / "stderr.txt").read_text(errors="replace"),
                        self.folder, round(time.monotonic() - self.started, 1))


class EarlyStart:
    """The selected tests' early jobs, started at most once each."""

    def __init__(self, session: pytest.Session, tmp: Path) -> None:
        self._tmp = tmp
        self._factories: dict[str, JobFactory] = {}
        for item in session.items:
            early: dict[str, Early] = getattr(getattr(item, "module", None), "EARLY", {})
            for name, job in early.items():
                if job.test == item.name:
                    self._factories[name] = job.make
        self._running: dict[str, _Running] = {}
        self._finished: dict[str, Finished] = {}

    def start_all(self) -> None:
        for name in self._factories:
            self._start(name)

    def settle(self) -> None:
        """Wait for every started job (each has its own timeout)."""
        for name in list(self._running):
            self.result(name)

    def result(self, name: str) -> Finished:
        """The job's outcome, waiting for it (and starting it first if needed)."""
        if name not in self._finished:
            running = self._running.get(name) or self._start(name)
            done = self._finished[name] = running.wait()
            print(f"early job {name}: exit {done.returncode} after {done.wall_s} s",
                  file=sys.stderr)
        return self._finished[name]

    def _start(self, name: str) -> _Running:
        if name not in self._running:
            if name not in self._factories:
                raise KeyError(f"no early job {name!r} among the selected tests' EARLY jobs "
                               f"{sorted(self._factories)}")
            folder = self._tmp / name
            folder.mkdir(parents=True, exist_ok=True)
            self._running[name] = _Running(self._factories[name](folder), folder)
        return self._running[name]
