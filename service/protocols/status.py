"""The one table from error types to what each protocol answers: an HTTP status and a gRPC status code.

A type's entry is that of the nearest class in its MRO listed here. Both columns come from the same
row, so a request refused over HTTP and over gRPC is refused for the same reason with codes that mean
the same thing (gRPC's own HTTP mapping, except where noted). The gRPC code is its name in
``grpc.StatusCode``: this module is wire-level and imports no transport.
"""

from __future__ import annotations

from typing import NamedTuple

from service.errors import (
    Conflict,
    GatewayTimeout,
    InternalError,
    NotFound,
    NotReady,
    PayloadTooLarge,
    RequestError,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)


class Status(NamedTuple):
    http: int
    grpc: str


STATUS: dict[type[Exception], Status] = {
    PayloadTooLarge: Status(413, "RESOURCE_EXHAUSTED"),
    UnsupportedMediaType: Status(415, "INVALID_ARGUMENT"),
    NotFound: Status(404, "NOT_FOUND"),
    Conflict: Status(409, "FAILED_PRECONDITION"),
    Unprocessable: Status(422, "INVALID_ARGUMENT"),
    Unauthorized: Status(401, "UNAUTHENTICATED"),
    NotReady: Status(503, "UNAVAILABLE"),  # Overloaded too: shed, retry later
    GatewayTimeout: Status(504, "DEADLINE_EXCEEDED"),
    InternalError: Status(500, "INTERNAL"),
    RequestError: Status(400, "INVALID_ARGUMENT"),
}
UNEXPECTED = Status(500, "INTERNAL")  # anything else: a bug, answered without its internals


def status_for(kind: type[BaseException]) -> Status:
    """What errors of type ``kind`` are answered with: its nearest listed type's entry, else UNEXPECTED."""
    return next((STATUS[cls] for cls in kind.__mro__ if cls in STATUS), UNEXPECTED)
