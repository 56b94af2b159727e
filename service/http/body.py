"""Reading request bodies under a limit, and multipart forms from a body already read."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from service.errors import PayloadTooLarge, RequestError
from service.protocols.wire import load_object


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes, over the limit of {limit}", reason="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body passes the limit of {limit} bytes", reason="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: Request, body: bytes) -> tuple[bytes | str | None, str | None]:
    """A multipart ``body``'s ``file`` field (bytes for an upload) and its ``top_k`` field. Raises
    RequestError for bad framing."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as exc:  # python-multipart raises several unrelated types on bad framing
        raise RequestError(f"malformed multipart body: {exc}", reason="multipart") from None
    upload = form.get("file")
    top_k = form.get("top_k")
    data = await upload.read() if upload is not None and not isinstance(upload, str) else upload
    return data, top_k if isinstance(top_k, str) else None


async def json_body(request: Request, what: str = "admin request body") -> dict[str, Any]:
    """The request's JSON object (none: ``{}``). Raises RequestError (400) for one over 64 KiB or not an object."""
    raw = await request.body()
    if len(raw) > 64 * 1024:
        raise RequestError(f"{what} over 64 KiB", reason="body")
    return load_object(raw or b"{}", what=what, reason="body")
