"""Pure: entries as JSON lines, for `openai-proxy export` and `import`."""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict
from typing import Any

from cache.base import ENTRY_FIELDS, CachedResponse, EntryField

# What an exported line holds besides `key` and its body: the entry's fields (ENTRY_FIELDS), with JSON's
# types (a float field accepts an integer).
_JSON_TYPES: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,)}
_CHECKED = [
    (entry_field, _JSON_TYPES[entry_field.kind]) for entry_field in ENTRY_FIELDS if entry_field.kind is not bytes
]


_LATEST_TIME = 1e11  # seconds since the epoch, in the year 5138


class MalformedLine(ValueError):
    """A line that is not an exported entry; the message says what is wrong with it."""


def entry_to_line(key: str, entry: CachedResponse) -> str:
    record: dict[str, Any] = {"key": key, **asdict(entry)}
    body = record.pop("body")
    try:
        record["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        record["body_base64"] = base64.b64encode(body).decode("ascii")
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def line_to_entry(line: str) -> tuple[str, CachedResponse]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise MalformedLine(f"not JSON ({exc.args[0]})") from exc
    except RecursionError as exc:
        raise MalformedLine("not JSON (nested too deeply)") from exc
    if not isinstance(record, dict):
        raise MalformedLine("not a JSON object")
    if not isinstance(record.get("key"), str):
        raise MalformedLine("field 'key' is missing or of the wrong type")
    for entry_field, kinds in _CHECKED:
        value = record.get(entry_field.name)
        if value is None and not entry_field.required:
            continue
        if not isinstance(value, kinds) or isinstance(value, bool):
            problem = "is missing or of the wrong type" if entry_field.required else "is of the wrong type"
            raise MalformedLine(f"field {entry_field.name!r} {problem}")
    if abs(record["created_at"]) > _LATEST_TIME or not math.isfinite(record["created_at"]):
        raise MalformedLine("field 'created_at' is not a time")
    if isinstance(record.get("body"), str):
        try:
            body = record["body"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MalformedLine("field 'body' is not valid Unicode text") from exc
    elif isinstance(record.get("body_base64"), str):
        try:
            body = base64.b64decode(record["body_base64"], validate=True)
        except ValueError as exc:
            raise MalformedLine("field 'body_base64' is not valid base64") from exc
    else:
        raise MalformedLine("field 'body' (or 'body_base64') is missing")
    values = {
        entry_field.name: _value(entry_field, record.get(entry_field.name))
        for entry_field in ENTRY_FIELDS
        if entry_field.kind is not bytes
    }
    entry = CachedResponse(body=body, **values)
    return record["key"], entry


def _value(entry_field: EntryField, value: Any) -> Any:
    if value is None:
        return entry_field.default  # null where the field has no null: its default (namespace "")
    return float(value) if entry_field.kind is float else value
