"""Pydantic models of the JSON the service takes, and one-line messages for what they refuse.

Models are strict (no coercion: ``"10"`` is not 10, ``true`` is not 1) and forbid unknown keys.
Each field's ``description`` says what it must be; it is both the OpenAPI text and the error
message (``canary.weight must be an integer 0-100, found 101``), so the schema a client reads and
the refusal it gets say the same thing.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from service.errors import RequestError

M = TypeVar("M", bound=BaseModel)


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


def load_object(raw: bytes, *, what: str = "request body", reason: str = "not_json") -> dict[str, Any]:
    """``raw`` parsed as a JSON object (NaN and Infinity are not JSON numbers). Raises RequestError."""

    def reject(constant: str) -> float:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        doc = json.loads(raw, parse_constant=reject)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"{what} is not valid JSON: {exc}", reason=reason) from None
    if not isinstance(doc, dict):
        raise RequestError(f"{what} must be a JSON object, found {json_kind(doc)}", reason=reason)
    return doc


def json_kind(value: object) -> str:
    """The JSON type name of a parsed value, for error messages."""
    return _JSON_TYPES.get(type(value), "null" if value is None else type(value).__name__)


def schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema for an OpenAPI document: nested models inlined (a ``$ref`` into the
    schema's own ``$defs`` would point into the document's root), no ``"default": null``."""
    doc = model.model_json_schema()
    defs = doc.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items() if not (k == "default" and v is None)}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(doc)


def validate(model: type[M], doc: Any, *, where: str = "", quote: bool = False, reason: str = "body",
             error: type[RequestError] = RequestError) -> M:
    """``doc`` as ``model``. Raises ``error`` with one line per refusal (``where: ``-prefixed), field
    paths dotted (``canary.weight``) or, with ``quote``, as JSON names (``"min_match"``)."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise error(explain(exc, model, where=where, quote=quote), reason=reason) from None


def explain(exc: ValidationError, model: type[BaseModel], *, where: str = "", quote: bool = False) -> str:
    """The refusals of ``exc`` in the project's words: unknown keys grouped per object, else what
    the field must be (its description) and what was found."""
    unknown: dict[tuple[Any, ...], list[Any]] = {}
    lines: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] in ("extra_forbidden", "invalid_key"):  # invalid_key: a YAML key that is not a string
            unknown.setdefault(loc[:-1], []).append(loc[-1])
            continue
        name = _path(loc, quote)
        what = _description(model, loc) or err["msg"].lower()
        found = "" if err["type"] in ("missing", "model_type", "dict_type") else f", found {_brief(err['input'])}"
        lines.append(f"{name} must be {what}{found}")
    for parent, keys in unknown.items():
        listed = sorted(keys, key=str)
        lines.insert(0, f"{_path(parent, quote)} has unknown keys {listed}" if parent else f"unknown keys {listed}")
    prefix = f"{where}: " if where else ""
    return prefix + ("; ".join(dict.fromkeys(lines)) or "invalid")


def _path(loc: tuple[Any, ...], quote: bool) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)] or ["body"]
    return ".".join(f'"{p}"' if quote else p for p in parts)


def _description(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The description of the field at ``loc`` (list indexes skipped), None if there is none."""
    current: type[BaseModel] | None = model
    description = None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = current.model_fields if current is not None else {}
        if part not in fields:
            return description
        description = fields[part].description
        current = _nested_model(fields[part].annotation)
    return description


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model inside an annotation (``M``, ``M | None``, ``list[M]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in get_args(annotation) if (m := _nested_model(arg)) is not None), None)


def _brief(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, bool, int, float)) or value is None else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
