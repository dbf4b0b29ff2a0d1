"""CapacityGate: whether a ticket fits past pio's queue now (frontend process, pure).

A ticket of level L may be granted when

- the requests past the queue (preparing or in vLLM) of level <= L occupy fewer than the
  capacity's sequences: vLLM's max_num_seqs plus a small lookahead that waits, prepared, in
  vLLM's own priority-ordered queue, so a finished request's slot is refilled inside the
  engine, not after a frontend round trip. Lower-priority requests do not count against a
  higher-priority one: it enters vLLM anyway, and pio's scheduler in the EngineCore
  (patches/priority_preemption.py) preempts a lower-priority running request for it;
- fewer than `max_preparing` requests of level <= L are being prepared (bounded
  preprocessing: a flood's images are rendered a few at a time, and an urgent request is
  never behind more than that). The `unbounded_level` (the top class in the OpenAI server,
  where preparing is vLLM's rendering, one request at a time on its own thread) is bounded
  by capacity only: nothing outranks it, and taking turns through pio would only add a round
  trip per request of an urgent burst;
- vLLM's KV cache usage is under the high watermark, unless the ticket outranks something
  already in vLLM (vLLM frees KV by preempting the lowest priority first).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pio_vllm.admission.ticket import Ticket, TicketState


class CapacityGate:
    """The capacity, preparing and KV bounds on what passes pio's queue."""

    def __init__(self, capacity: int, max_preparing: int, unbounded_level: int | None,
                 kv_high_watermark: float) -> None:
        if capacity < 1:
            raise ValueError(f"admission capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.max_preparing = max_preparing
        self.unbounded_level = unbounded_level
        self.kv_high_watermark = kv_high_watermark
        self.kv_usage = 0.0

    def set_capacity(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"admission capacity must be >= 1, got {capacity}")
        self.capacity = capacity

    def set_kv_usage(self, kv_usage: float) -> bool:
        """Record vLLM's KV usage; True when it crossed the watermark either way."""
        crossed = (kv_usage < self.kv_high_watermark) != (
            self.kv_usage < self.kv_high_watermark)
        self.kv_usage = kv_usage
        return crossed

    @staticmethod
    def past_queue(level: int, granted: Iterable[Ticket]) -> tuple[int, int]:
        """(sequences past the queue, requests preparing) of level <= `level`."""
        slots = preparing = 0
        for t in granted:
            if t.level <= level:
                slots += t.slots
                preparing += t.state is TicketState.PREPARING
        return slots, preparing

    def may_grant(self, ticket: Ticket, granted: Collection[Ticket], capacity: int) -> bool:
        """Whether `ticket` fits now, against `capacity` sequences (the gate's own, or less
        where SLO admission caps the running set)."""
        slots, preparing = self.past_queue(ticket.level, granted)
        if preparing >= self.max_preparing and ticket.level != self.unbounded_level:
            return False
        if slots and slots + ticket.slots > capacity:
            return False
        if self.kv_usage < self.kv_high_watermark:
            return True
        # KV is nearly full: only a request that outranks something in vLLM goes in
        # (vLLM's priority policy frees KV from the lowest priority first).
        return any(t.level > ticket.level for t in granted)
