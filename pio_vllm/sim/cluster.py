"""Replicas behind a router, on virtual time: the simulator's run (simulator process).

Each replica is a ModelledEngine and a frontend (pio's or plain vLLM's). The router sends
each arrival to a replica by its policy (`round_robin`, `power_of_two`: the lower load of
two replicas drawn at random, `least_load`); a refusal (429) is retried on the replicas not
tried yet, as vllm-router retries a 429 elsewhere. The run happens on an asyncio loop whose
clock is virtual (`looptime`: sleeps, timers and timeouts take no real time), so pio's
controller runs unchanged in virtual seconds; one seeded RNG orders everything random, and
the same inputs give the same outcomes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pio_vllm.cost.vision_tokens import VisionGeometry, vision_tokens
from pio_vllm.errors import ConfigError
from pio_vllm.settings import PioSettings
from pio_vllm.sim.engine import ModelledEngine
from pio_vllm.sim.frontend import (
    Frontend,
    Outcome,
    PioFrontend,
    PlainFrontend,
    SimRequest,
    side_settings,
)
from pio_vllm.sim.profile import SimProfile
from pio_vllm.sim.trace import TraceRow

POLICIES = ("round_robin", "power_of_two", "least_load")


@dataclass(frozen=True)
class SimResult:
    outcomes: list[Outcome]
    wall_s: float  # virtual seconds from the first arrival to the last request's end
    steps: int
    busy_s: float  # engine seconds, all replicas


class Router:
    def __init__(self, policy: str, replicas: Sequence[Frontend], rng: random.Random) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"router policy {policy!r}; accepted: {', '.join(POLICIES)}")
        self._policy = policy
        self._replicas = list(replicas)
        self._rng = rng
        self._next = 0

    def order(self) -> list[Frontend]:
        """The replicas to try, first choice first."""
        n = len(self._replicas)
        if self._policy == "round_robin":
            first = self._next % n
            self._next += 1
        elif self._policy == "power_of_two" and n > 1:
            a, b = self._rng.sample(range(n), 2)
            first = a if self._replicas[a].load() <= self._replicas[b].load() else b
        else:
            loads = [r.load() for r in self._replicas]
            first = loads.index(min(loads))
        return [self._replicas[(first + k) % n] for k in range(n)]


def simulate(settings: PioSettings, model_path: str, profile: SimProfile,
             rows: Sequence[TraceRow], *, side: str, replicas: int = 1,
             policy: str = "round_robin", mode: str = "server", seed: int = 0) -> SimResult:
    """Serve `rows` with `replicas` replicas of `side` ("pio" or "plain")."""
    import looptime

    if side not in ("pio", "plain"):
        raise ConfigError(f"side {side!r}; accepted: pio, plain")
    if replicas < 1:
        raise ConfigError(f"replicas {replicas}; accepted: 1 or more")
    loop = looptime.new_event_loop(start=0.0)
    try:
        return loop.run_until_complete(_run(settings, model_path, profile, rows, side,
                                            replicas, policy, mode, seed))
    finally:
        loop.close()


async def _run(settings: PioSettings, model_path: str, profile: SimProfile,
               rows: Sequence[TraceRow], side: str, replicas: int, policy: str, mode: str,
               seed: int) -> SimResult:
    rng = random.Random(seed)
    run_settings = side_settings(settings, side)
    engines = [ModelledEngine(run_settings, model_path, profile,
                              random.Random(rng.randrange(1 << 30)), pio=side == "pio")
               for _ in range(replicas)]
    frontends: list[Frontend] = [
        PioFrontend(e, profile, run_settings, vllm_renders=mode == "server") if side == "pio"
        else PlainFrontend(e, profile) for e in engines]
    router = Router(policy, frontends, random.Random(rng.randrange(1 << 30)))
    geometry = _geometry(model_path, settings)
    loop = asyncio.get_running_loop()
    start = loop.time()
    steps = [asyncio.create_task(e.run(), name=f"sim-engine-{i}")
             for i, e in enumerate(engines)]

    async def one(index: int, row: TraceRow) -> Outcome:
        delay = row.arrival_s - (loop.time() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        cls = settings.priority_classes[row.priority_class]
        vision = vision_tokens(row.image_w, row.image_h, geometry) if row.has_image else 0
        outcome = Outcome(f"r{index}", row.priority_class, error="no replica")
        for attempt, replica in enumerate(router.order()):
            request = SimRequest(f"r{index}-{attempt}", row.priority_class, cls.level,
                                 start + row.arrival_s, row.prompt_tokens, vision,
                                 row.output_tokens, seed=index)
            outcome = await replica.serve(request)
            outcome.request_id = f"r{index}"
            if not outcome.refused:
                break
        return outcome

    served: asyncio.Future[list[Outcome]] = asyncio.ensure_future(
        asyncio.gather(*(one(i, r) for i, r in enumerate(rows))))
    # an engine that fails (or gets stuck) ends the run with its error, not a hang
    watched: list[asyncio.Future[Any]] = [served, *steps]
    await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in steps if t.done() and not t.cancelled() and t.exception()]
    if failed and not served.done():
        served.cancel()
        await asyncio.gather(served, return_exceptions=True)
        raise failed[0].exception()  # type: ignore[misc]
    outcomes = await served
    wall = loop.time() - start
    for task in steps:
        task.cancel()
    await asyncio.gather(*steps, return_exceptions=True)
    for f in frontends:
        if isinstance(f, PioFrontend):
            f.admission.close()
    return SimResult(list(outcomes), wall, sum(e.steps for e in engines),
                     sum(e.busy_s for e in engines))


def _geometry(model_path: str, settings: PioSettings) -> VisionGeometry:
    from pio_vllm.engine.vllm_backend import read_geometry

    return read_geometry(model_path, settings.engine)
