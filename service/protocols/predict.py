"""The /predict request and response shapes: raw image body, multipart ``file`` or JSON base64."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field

from service.errors import PayloadTooLarge, RequestError, UnsupportedMediaType
from service.protocols.wire import Wire, load_object, validate

RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
MULTIPART = "multipart/form-data"
JSON = "application/json"
WHOLE_NUMBER = re.compile(r"\s*[0-9]+\s*")  # int() alone would also take "1_0" and non-ASCII digits


@dataclass(frozen=True)
class PredictRequest:
    image: bytes
    top_k: int


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


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, lower case, without parameters (absent: octet-stream)."""
    return (content_type or "application/octet-stream").split(";")[0].strip().lower()


def body_limit(media: str, max_image_bytes: int) -> int:
    """The most bytes a /predict body of type ``media`` may have. Raises UnsupportedMediaType (415)."""
    if media in RAW_TYPES:
        return max_image_bytes
    if media in (JSON, MULTIPART):  # base64 and multipart framing: up to 4/3 + a little over the image
        return max_image_bytes * 4 // 3 + 64 * 1024
    raise UnsupportedMediaType(
        f"content type {media!r} is not accepted: send the image as {', '.join(RAW_TYPES)}, "
        f"as multipart/form-data field 'file', or as JSON {{\"image\": \"<base64>\"}}",
        reason="content_type",
    )


def from_raw(body: bytes, query_k: str | None) -> PredictRequest:
    return PredictRequest(body, parse_top_k(query_k))


def from_json(body: bytes, query_k: str | None, max_image_bytes: int) -> PredictRequest:
    doc = load_object(body, reason="json")
    if "image" not in doc:
        raise RequestError('JSON body must be an object with an "image" field holding base64 image bytes', reason="json")
    parsed = validate(PredictJSON, doc, quote=True, reason="json")
    try:
        image = base64.b64decode(parsed.image, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError('"image" is not valid base64', reason="base64") from None
    if len(image) > max_image_bytes:
        raise PayloadTooLarge(f"image is {len(image)} bytes, over the limit of {max_image_bytes}", reason="too_large")
    return PredictRequest(image, parse_top_k(parsed.top_k if parsed.top_k is not None else query_k))


def from_form(upload: bytes | str | None, form_k: str | None, query_k: str | None) -> PredictRequest:
    """A multipart body's ``file`` field (bytes of an upload; a plain string or None is refused) and ``top_k``."""
    if not isinstance(upload, bytes):
        raise RequestError("multipart body must have a file field named 'file'", reason="multipart")
    return PredictRequest(upload, parse_top_k(form_k if form_k is not None else query_k))


class PredictJSON(Wire):
    """The JSON form of a /predict body (other keys are ignored)."""

    model_config = ConfigDict(extra="ignore")
    image: Annotated[str, Field(description="a base64 string of the image bytes")]
    # checked by parse_top_k, as the query parameter and the form field are: a positive whole number
    top_k: Annotated[Any, Field(description="how many classes to return (default 5)",
                                json_schema_extra={"type": "integer", "minimum": 1})] = None


class Prediction(Wire):
    label: str
    index: int
    score: float


class ServedModel(Wire):
    name: str
    version: str
    slot: str


class PredictResponse(Wire):
    """What /predict answers: the top classes, best first, and the model version that answered."""

    predictions: list[Prediction]
    model: ServedModel


def predict_body(result: Any, model_name: str) -> dict[str, Any]:
    """The answer to one image: ``PredictResponse`` as a JSON-ready dict."""
    return PredictResponse(
        predictions=[Prediction(label=label, index=index, score=score) for label, index, score in result.top],
        model=ServedModel(name=model_name, version=result.version, slot=result.slot),
    ).model_dump()
