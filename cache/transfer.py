"""Pure: entries as JSON lines, for `openai-proxy export` and `import`."""

from __future__ import annotations

import base64
import json
import math
from dataclasses import asdict
from typing import Any

from cache.base import CachedResponse

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "status": int,
    "content_type": str,
    "created_at": (int, float),
    "provider": str,
    "endpoint": str,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "namespace": str,
    "ttl": (int, float),
    "input_tokens": int,
    "output_tokens": int,
    "cached_input_tokens": int,
    "cache_write_tokens": int,
    "upstream_seconds": (int, float),
    "prompt_preview": str,
}


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
    for name, kind in _REQUIRED.items():
        if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
            raise MalformedLine(f"field {name!r} is missing or of the wrong type")
    for name, kind in _OPTIONAL.items():
        if record.get(name) is not None and (not isinstance(record[name], kind) or isinstance(record[name], bool)):
            raise MalformedLine(f"field {name!r} is of the wrong type")
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
    entry = CachedResponse(
        status=record["status"],
        content_type=record["content_type"],
        body=body,
        created_at=float(record["created_at"]),
        provider=record["provider"],
        endpoint=record["endpoint"],
        model=record.get("model"),
        namespace=record.get("namespace") or "",
        ttl=record.get("ttl"),
        input_tokens=record.get("input_tokens"),
        output_tokens=record.get("output_tokens"),
        cached_input_tokens=record.get("cached_input_tokens"),
        cache_write_tokens=record.get("cache_write_tokens"),
        upstream_seconds=record.get("upstream_seconds"),
        prompt_preview=record.get("prompt_preview"),
    )
    return record["key"], entry
