"""Ticket: one request's place in pio's admission (frontend process, pure data).

A ticket moves

    QUEUED --grant--> PREPARING --started--> IN_ENGINE --release--> DONE

Priority follows vLLM: a lower level is served first.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from pio_vllm.admission.metrics import Event


class TicketState(enum.Enum):
    NEW = "new"
    QUEUED = "queued"  # waiting in pio's queue; nothing has been done for it yet
    PREPARING = "preparing"  # granted: being rendered / its images loaded
    IN_ENGINE = "in_engine"  # submitted to vLLM (running or in vLLM's waiting queue)
    DONE = "done"


class Release(enum.Enum):
    """How a granted request ended (one per request)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # its deadline passed after it was granted


RELEASE_EVENT = {Release.COMPLETED: Event.COMPLETED, Release.FAILED: Event.FAILED,
                 Release.CANCELLED: Event.CANCELLED, Release.EXPIRED: Event.EXPIRED}


@dataclass(eq=False)
class Ticket:
    """One request's place in admission. Priority follows vLLM: a lower level goes first."""

    key: int
    request_id: str
    class_name: str
    level: int
    weight: float
    arrival_at: float
    queue_deadline_at: float | None  # monotonic; request deadline or class max_queue_wait_s
    slots: int = 1  # sequences it occupies in vLLM (n > 1 fans out into n requests)
    prompt_tokens: int = 0  # estimated before admission (text plus vision tokens)
    vision_tokens: int = 0
    ttft_target_s: float | None = None  # what admission holds it to (None once served late)
    tpot_target_s: float | None = None  # its SLO: its class's, or tighter per request
    slo_ttft_s: float | None = None  # its SLO's TTFT, kept when it is served late
    state: TicketState = TicketState.NEW
    granted_at: float | None = None
    first_token_at: float | None = None
    work_s: float = 0.0  # engine seconds of its prefill, from the step model (SLO admission)
    started_at: float | None = None  # handed to vLLM
    predicted_ttft_s: float | None = None  # at its grant, arrival to first token
    late: bool = False  # predicted to miss its TTFT target and kept (serve_late): no SLO
    rationed: bool = True  # its work was taken from the work bucket at its grant
    charged_s: float = 0.0  # what its grant took from the work bucket (`SloPricing.charge_s`)
    future: asyncio.Future[None] | None = field(default=None, repr=False)


def tighter(class_s: float | None, request_s: float | None) -> float | None:
    """The stricter of a class's target and a request's own (None: none given)."""
    if request_s is None:
        return class_s
    return request_s if class_s is None else min(class_s, request_s)
