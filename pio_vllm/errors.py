"""The pio-vllm error tree (frontend process; pure Python, no vLLM import).

Every error pio raises to a caller is one of these. The tree::

    PioError
    ├── ConfigError                 bad settings or engine arguments; fatal at start
    ├── RequestError                the request cannot be served as sent
    │   ├── InvalidRequestError     bad input (HTTP 400)
    │   │   ├── PayloadTooLargeError    body over the server's limit (HTTP 413)
    │   │   ├── EmptyPromptError
    │   │   ├── PromptTooLongError
    │   │   ├── InvalidSamplingError
    │   │   ├── UnknownPriorityError
    │   │   └── ImageError
    │   │       ├── ImageNotFoundError
    │   │       ├── ImageSourceError        unsupported or disallowed source (scheme, dir, host)
    │   │       ├── ImageFetchError         http(s) fetch failed or timed out
    │   │       ├── ImageDecodeError        bytes are not a readable image
    │   │       ├── ImageTooLargeError      over the byte or pixel limit (decompression bombs)
    │   │       └── TooManyImagesError
    │   ├── BodyTimeoutError        the body did not arrive in time (HTTP 408)
    │   ├── RouteNotServedError     a route pio does not serve (HTTP 404)
    │   ├── UnauthorizedError       missing or unknown API key (HTTP 401)
    │   │   └── PriorityNotAllowedError  a class above the request's ceiling (HTTP 403)
    │   ├── RequestRejectedError    shed by admission (HTTP 429, retry_after_s)
    │   └── DeadlineExceededError   the request's deadline passed (HTTP 504)
    └── EngineError                 the engine cannot serve (HTTP 503)
        ├── EngineNotRunningError   not started yet, or shut down
        └── EngineDeadError         the vLLM engine process died

Messages state the value received and what would be accepted. HTTP statuses are mapped in
one place, the server's error handler; the classes only carry the data it needs.
"""

from __future__ import annotations


class PioError(Exception):
    """Base of every error pio-vllm raises."""


class ConfigError(PioError):
    """Settings or engine arguments are invalid. Raised at start; fix the config and restart."""


class RequestError(PioError):
    """The request cannot be served as sent. Other requests are unaffected."""


class InvalidRequestError(RequestError):
    """The request is malformed or violates a configured limit."""


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts."""


class BodyTimeoutError(RequestError):
    """The client did not send its whole body within the server's body deadline."""


class RouteNotServedError(RequestError):
    """pio's server does not serve this route (deny by default)."""


class EmptyPromptError(InvalidRequestError):
    """Neither a non-empty prompt nor any message content was given."""


class PromptTooLongError(InvalidRequestError):
    """Prompt tokens (text plus vision tokens) plus max_tokens exceed the model's context."""

    def __init__(self, message: str, prompt_tokens: int, max_model_len: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


class InvalidSamplingError(InvalidRequestError):
    """A sampling parameter is out of range (max_tokens <= 0, unknown field, ...)."""


class UnknownPriorityError(InvalidRequestError):
    """The priority names no configured class, or the level is not an integer."""


class ImageError(InvalidRequestError):
    """An image could not be used. `index` is its position in the request's images."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message if index is None else f"image {index}: {message}")
        self.index = index


class ImageNotFoundError(ImageError):
    """A local image path does not exist or is not a file."""


class ImageSourceError(ImageError):
    """The image source is unsupported (URL scheme, type) or not allowed (dir, domain)."""


class ImageFetchError(ImageError):
    """An http(s) image could not be fetched: timeout, connection error or HTTP status."""


class ImageDecodeError(ImageError):
    """The bytes are not an image format Pillow can decode, or are truncated."""


class ImageTooLargeError(ImageError):
    """The image is over the byte or pixel limit (a decompression bomb included)."""


class TooManyImagesError(ImageError):
    """More images than the per-request limit."""


class UnauthorizedError(RequestError):
    """The server needs an API key and the request has none or an unknown one."""


class PriorityNotAllowedError(UnauthorizedError):
    """The request names a higher class than its API key (or the server's ceiling for
    requests without a key class) allows."""


class RequestRejectedError(RequestError):
    """Shed by admission control: retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float, reason: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class DeadlineExceededError(RequestError):
    """The request's deadline passed before it finished. Partial output is discarded."""


class EngineError(PioError):
    """The engine cannot serve requests."""


class EngineNotRunningError(EngineError):
    """The engine was not started (use `async with`) or has been shut down."""


class EngineDeadError(EngineError):
    """The vLLM engine core died; requests in flight fail and new ones are refused."""
