"""Typed request errors and the one table that maps them to HTTP status codes."""

from __future__ import annotations


class RequestError(ValueError):
    """A client error. ``reason`` is a short machine label (a metrics label value)."""

    status = 400

    def __init__(self, message: str, *, reason: str = "invalid", details: dict | None = None) -> None:
        self.reason = reason
        self.details = details or {}
        super().__init__(message)

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error's response."""
        return {}


class PayloadTooLarge(RequestError):
    status = 413


class UnsupportedMediaType(RequestError):
    status = 415


class NotFound(RequestError):
    status = 404


class Conflict(RequestError):
    status = 409


class Unprocessable(RequestError):
    status = 422


class Unauthorized(RequestError):
    status = 401


class NotReady(RequestError):
    status = 503


class Overloaded(NotReady):
    """More work than the server takes: shed at once, with when to come back."""

    def __init__(self, message: str, *, retry_after: int, reason: str = "overload") -> None:
        self.retry_after = retry_after
        super().__init__(message, reason=reason)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def status_of(exc: BaseException) -> int:
    """HTTP status for an exception: its RequestError status, else 500."""
    return exc.status if isinstance(exc, RequestError) else 500


class GatewayTimeout(RequestError):
    status = 504


class InternalError(RequestError):
    """A server fault reported to the client without internals (no traces, no paths)."""

    status = 500
