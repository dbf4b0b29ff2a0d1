"""HTTP statuses for pio's errors: the one mapping (OpenAI server, frontend process).

Bodies follow OpenAI's (and vLLM's `ErrorResponse`) shape,
`{"error": {"message", "type", "param", "code"}}`, so official clients raise their usual
typed exceptions. A shed request (429) and a draining or dead server (503) carry
`Retry-After`.
"""

from __future__ import annotations

import math
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from vllm.exceptions import GracefulHTTPError

from pio_vllm.errors import (
    BodyTimeoutError,
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    PayloadTooLargeError,
    PioError,
    PriorityNotAllowedError,
    RequestRejectedError,
    RouteNotServedError,
    UnauthorizedError,
)

# Most specific first.
_STATUS: tuple[tuple[type[PioError], HTTPStatus], ...] = (
    (PayloadTooLargeError, HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
    (BodyTimeoutError, HTTPStatus.REQUEST_TIMEOUT),
    (RouteNotServedError, HTTPStatus.NOT_FOUND),
    (PriorityNotAllowedError, HTTPStatus.FORBIDDEN),
    (UnauthorizedError, HTTPStatus.UNAUTHORIZED),
    (RequestRejectedError, HTTPStatus.TOO_MANY_REQUESTS),
    (DeadlineExceededError, HTTPStatus.GATEWAY_TIMEOUT),
    (InvalidRequestError, HTTPStatus.BAD_REQUEST),
    (EngineError, HTTPStatus.SERVICE_UNAVAILABLE),
)

# Seconds a client should wait before retrying a draining or dead server.
ENGINE_RETRY_AFTER_S = 5.0


def status_for(error: PioError) -> HTTPStatus:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR


def retry_after_for(error: PioError) -> float | None:
    if isinstance(error, RequestRejectedError):
        return error.retry_after_s
    if isinstance(error, EngineError):
        return ENGINE_RETRY_AFTER_S
    return None


def error_body(message: str, status: HTTPStatus, param: str | None = None) -> dict[str, Any]:
    err_type = "BadRequestError" if status == HTTPStatus.BAD_REQUEST else status.phrase
    return {"error": {"message": message, "type": err_type, "param": param,
                      "code": status.value}}


# llm-d's flow control names why it dropped a request in this header; pio does the same
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"


def _headers(retry_after_s: float | None, dropped: str | None = None) -> dict[str, str]:
    """Retry-After (whole seconds) and, for a shed request, the machine-readable reason
    (`queue_full`, `slo_infeasible`, `deadline_infeasible`)."""
    headers = {} if retry_after_s is None else {
        "Retry-After": str(max(1, math.ceil(retry_after_s)))}
    if dropped is not None:
        headers[DROPPED_REASON_HEADER] = dropped
    return headers


def dropped_reason_for(error: PioError) -> str | None:
    return error.reason if isinstance(error, RequestRejectedError) else None


def error_response(error: PioError, param: str | None = None) -> JSONResponse:
    """The HTTP response for `error` (before a response has started)."""
    status = status_for(error)
    return JSONResponse(error_body(str(error), status, param), status_code=status.value,
                        headers=_headers(retry_after_for(error), dropped_reason_for(error)))


class PioHTTPError(GracefulHTTPError):
    """A pio error on its way through vLLM's serving code, which renders GracefulHTTPError
    with its status (and, for a stream already started, as an error event)."""

    def __init__(self, error: PioError) -> None:
        super().__init__(str(error), status_for(error))
        self.retry_after_s = retry_after_for(error)
        self.dropped_reason = dropped_reason_for(error)


def to_vllm_error(error: PioError) -> PioHTTPError:
    return PioHTTPError(error)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PioHTTPError)
    status = HTTPStatus(exc.http_status)
    return JSONResponse(error_body(exc.message, status), status_code=status.value,
                        headers=_headers(exc.retry_after_s, exc.dropped_reason))


def install_error_handler(app: Any) -> None:
    """Render PioHTTPError with its Retry-After (vLLM's VLLMError handler drops headers;
    Starlette picks the most specific handler by the exception's MRO)."""
    app.add_exception_handler(PioHTTPError, _handle)
