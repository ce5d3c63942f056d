"""Hostile input at every route: malformed JSON, huge numbers, deep nesting, invalid UTF-8, odd
content types. No request may make the proxy fail (a 500), and no failed request may leave an entry."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ProxyFactory
from tests.servers import FakeUpstream

ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"),
    ("POST", "/anthropic/v1/messages"),
    ("POST", "/openai/v1/chat/completions?x=%ff"),
    ("GET", "/v1/models"),
    ("POST", "/v1/files"),
    ("GET", "/healthz"),
    ("GET", "/cache/stats"),
    ("GET", "/cache/entries"),
    ("DELETE", "/cache"),
    ("GET", "/nowhere/v1/chat/completions"),
]

CONTENT_TYPES = [
    "application/json",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zz",
    "",
    ";;;=",
    "application/json-seq",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def chat_like(value: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": value}], "stream": False}).encode()


def nested(depth: int) -> bytes:
    return b'{"model":"m","messages":[{"role":"user","content":' + b"[" * depth + b"1" + b"]" * depth + b"}]}"


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    json_values.map(chat_like),
    st.integers(min_value=1, max_value=1100).map(nested),
    st.sampled_from(
        [
            b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}',
            b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
            b'{"model":"m","messages":"hi","temperature":1e999}',
            b'{"model":"m","messages":[],"n":123456789012345678901234567890123}',
            b'{"model":"m","messages":[{"role":"user","content":"a"}],"stream":"yes","stream_options":7}',
            b'{"model":{"a":1},"messages":[1,{"role":5}]}',
            b'{"model":"m","messages":[{"role":"user","content":"a"}]',
            b"\x00" * 64,
        ]
    ),
)


@pytest.fixture
def fuzzed_proxy(start_proxy: ProxyFactory, tmp_path: Path) -> Iterator[httpx.Client]:
    base = start_proxy(cache_db=tmp_path / "fuzz.db", admin_api_key=None)
    with httpx.Client(base_url=base, timeout=10) as client:
        yield client


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(route=st.sampled_from(ROUTES), body=bodies, content_type=st.sampled_from(CONTENT_TYPES))
def test_no_input_makes_the_proxy_fail(
    fuzzed_proxy: httpx.Client, route: tuple[str, str], body: bytes, content_type: str
) -> None:
    method, path = route
    headers = {"content-type": content_type} if content_type else {}
    response = fuzzed_proxy.request(method, path, content=body, headers=headers)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "message" in response.json()["error"]


def test_failed_requests_leave_no_entry(fuzzed_proxy: httpx.Client, upstream: FakeUpstream, tmp_path: Path) -> None:
    for body in (nested(1020), b'{"model":"m","messages":[1]}', b'{"model":"m","messages":"x"', b"[1, 2]"):
        fuzzed_proxy.post("/v1/chat/completions", content=body)
    fuzzed_proxy.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "ok"}]})
    fuzzed_proxy.get("/cache/stats")
    with sqlite3.connect(tmp_path / "fuzz.db") as db:
        rows = db.execute("SELECT status, body FROM entries").fetchall()
    assert [status for status, _ in rows] == [200, 200], "the valid request and the one with messages [1]"
    assert all(json.loads(body)["object"] == "chat.completion" for _, body in rows)


def test_a_body_nested_too_deeply_to_key_is_a_400(fuzzed_proxy: httpx.Client, upstream: FakeUpstream) -> None:
    response = fuzzed_proxy.post("/v1/chat/completions", content=nested(1020))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert upstream.calls == 0
