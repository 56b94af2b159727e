"""The /predict request and response shapes: raw image body, multipart ``file`` or JSON base64."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from service.errors import PayloadTooLarge, RequestError, UnsupportedMediaType

RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
MULTIPART = "multipart/form-data"
JSON = "application/json"
WHOLE_NUMBER = re.compile(r"\s*[0-9]+\s*")  # int() alone would also take "1_0" and non-ASCII digits


@dataclass(frozen=True)
class PredictRequest:
    image: bytes
    top_k: int


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


def parse_top_k(value: Any, default: int = 5) -> int:
    if value is None:
        return default
    if isinstance(value, str) and not WHOLE_NUMBER.fullmatch(value):
        raise RequestError(f"top_k must be a positive integer, found {value!r}", reason="top_k")
    try:
        top_k = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"top_k must be a positive integer, found {value!r}", reason="top_k") from None
    if isinstance(value, bool) or top_k < 1 or (isinstance(value, float) and value != top_k):
        raise RequestError(f"top_k must be a positive integer, found {value!r}", reason="top_k")
    return top_k


async def parse_predict(request: Request, max_image_bytes: int) -> PredictRequest:
    """Any of the three input forms -> image bytes and top_k. Raises 400/413/415."""
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    query_k = request.query_params.get("top_k")
    if content_type in RAW_TYPES:
        return PredictRequest(await read_body(request, max_image_bytes), parse_top_k(query_k))
    # base64 and multipart framing make the body up to 4/3 + a little larger than the image
    body_limit = max_image_bytes * 4 // 3 + 64 * 1024
    if content_type == JSON:
        return _from_json(await read_body(request, body_limit), query_k, max_image_bytes)
    if content_type == MULTIPART:
        body = await read_body(request, body_limit)
        return await _from_multipart(request, body, query_k)
    raise UnsupportedMediaType(
        f"content type {content_type!r} is not accepted: send the image as {', '.join(RAW_TYPES)}, "
        f"as multipart/form-data field 'file', or as JSON {{\"image\": \"<base64>\"}}",
        reason="content_type",
    )


def _from_json(body: bytes, query_k: str | None, max_image_bytes: int) -> PredictRequest:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"body is not valid JSON: {exc}", reason="json") from None
    if not isinstance(doc, Mapping) or "image" not in doc:
        raise RequestError('JSON body must be an object with an "image" field holding base64 image bytes', reason="json")
    if not isinstance(doc["image"], str):
        raise RequestError(f'"image" must be a base64 string, found {type(doc["image"]).__name__}', reason="json")
    try:
        image = base64.b64decode(doc["image"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError('"image" is not valid base64', reason="base64") from None
    if len(image) > max_image_bytes:
        raise PayloadTooLarge(f"image is {len(image)} bytes, over the limit of {max_image_bytes}", reason="too_large")
    return PredictRequest(image, parse_top_k(doc.get("top_k", query_k)))


async def _from_multipart(request: Request, body: bytes, query_k: str | None) -> PredictRequest:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        form = await form_request.form()
    except Exception as exc:  # python-multipart raises several unrelated types on bad framing
        raise RequestError(f"malformed multipart body: {exc}", reason="multipart") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise RequestError("multipart body must have a file field named 'file'", reason="multipart")
    data = await upload.read()
    return PredictRequest(data, parse_top_k(form.get("top_k", query_k)))


def predict_body(result: Any, model_name: str) -> dict[str, Any]:
    return {
        "predictions": [{"label": label, "index": index, "score": score} for label, index, score in result.top],
        "model": {"name": model_name, "version": result.version, "slot": result.slot},
    }
