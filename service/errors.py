"""The service's typed errors: what went wrong, never which HTTP status that is.

Domain code (control, inference, protocols) raises these; ``service.http.errors`` holds the one
table that maps each type to a status code. A worker sends an error back by its type's name
(``by_name``), so the client gets the error the worker raised, with its own status.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A client error. ``reason`` is a short machine label (a metrics label value); ``details``
    go into the error body beside the message."""

    def __init__(self, message: str, *, reason: str = "invalid", details: dict | None = None) -> None:
        self.reason = reason
        self.details = details or {}
        super().__init__(message)


class PayloadTooLarge(RequestError):
    """A body, an image or a tensor over its limit."""


class UnsupportedMediaType(RequestError):
    """A content type or an image format the server does not take."""


class NotFound(RequestError):
    """No such model, version, route target or stored checkpoint."""


class Conflict(RequestError):
    """The request does not fit what is served now (another architecture, nothing to promote)."""


class Unprocessable(RequestError):
    """A well-formed checkpoint that cannot be served (partial, non-finite, does not fit its model)."""


class Unauthorized(RequestError):
    """No admin token, or the wrong one."""


class NotReady(RequestError):
    """Nothing can answer yet (starting, or the worker went away)."""


class Overloaded(NotReady):
    """More work than the server takes: shed at once, with when to come back."""

    def __init__(self, message: str, *, retry_after: int, reason: str = "overload") -> None:
        self.retry_after = retry_after
        super().__init__(message, reason=reason)


class GatewayTimeout(RequestError):
    """No answer by the request's deadline."""


class InternalError(RequestError):
    """A server fault reported to the client without internals (no traces, no paths)."""


def by_name(name: str) -> type[RequestError]:
    """The error class called ``name`` (as a worker sends it back); RequestError for an unknown name."""
    for cls in _ALL:
        if cls.__name__ == name:
            return cls
    return RequestError


_ALL = (RequestError, PayloadTooLarge, UnsupportedMediaType, NotFound, Conflict, Unprocessable, Unauthorized, NotReady,
        Overloaded, GatewayTimeout, InternalError)

# The server's own failures, as opposed to the client's: what counts against a canary.
SERVER_SIDE = (NotReady, GatewayTimeout, InternalError)
