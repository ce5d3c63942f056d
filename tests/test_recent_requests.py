"""RecentRequests: a request sent again byte for byte is asked as before, without being worked out again;
any byte that differs (a header included) makes it a request of its own."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from cache.control import RequestControl
from proxy.exchange import Exchange
from proxy.request import Asked, RecentRequests
from tests.conftest import ProxyFactory
from tests.servers import FakeUpstream

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"again"}]}'


def asked(key: str) -> Asked:
    return Asked(key, "openai", "v1/chat/completions", "chat/completions", None, RequestControl(), {}, BODY,
                 False, False, False, None)  # fmt: skip


def scope(headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
    return {"raw_path": b"/v1/chat/completions", "query_string": b"", "headers": headers}


def test_the_same_bytes_find_what_was_asked_and_other_bytes_do_not() -> None:
    recent = RecentRequests()
    sent = recent.bytes_of(scope([(b"content-type", b"application/json")]), BODY)
    recent.add(sent, asked("k1"))

    again = recent.get(recent.bytes_of(scope([(b"content-type", b"application/json")]), BODY))
    assert again is not None and again.key == "k1"
    assert recent.get(recent.bytes_of(scope([(b"content-type", b"application/json")]), BODY + b" ")) is None
    other_header = scope([(b"content-type", b"application/json"), (b"cache-control", b"no-store")])
    assert recent.get(recent.bytes_of(other_header, BODY)) is None


def test_past_its_bound_the_oldest_request_is_forgotten() -> None:
    recent = RecentRequests(entries=2)
    bodies = [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    for number, body in enumerate(bodies):
        recent.add(recent.bytes_of(scope([]), body), asked(f"k{number}"))

    assert recent.get(recent.bytes_of(scope([]), bodies[0])) is None
    assert [recent.get(recent.bytes_of(scope([]), body)) is not None for body in bodies[1:]] == [True, True]


def test_asked_again_is_the_same_request_in_its_own_exchange() -> None:
    first = Asked("k", "openai", "v1/chat/completions", "chat/completions", "gpt-4o-mini", RequestControl(),
                  {"model": "gpt-4o-mini"}, BODY, True, False, True, None)  # fmt: skip
    exchange = Exchange(method="POST", path="/v1/chat/completions", client="-", user_agent="", started=0, at=0)

    again = first.for_exchange(exchange)

    assert again == dataclasses.replace(first, exchange=exchange)
    assert (exchange.model, exchange.key) == ("gpt-4o-mini", "k")


def test_headers_given_as_lists_are_not_kept() -> None:
    recent = RecentRequests()
    sent = recent.bytes_of(scope([[b"content-type", b"application/json"]]), BODY)  # type: ignore[list-item]
    recent.add(sent, asked("k"))
    assert recent.get(sent) is None
    assert len(recent._asked) == 0


def test_a_large_body_is_not_kept() -> None:
    recent = RecentRequests(max_body=10)
    assert recent.bytes_of(scope([]), b"x" * 11) is None
    recent.add(None, asked("k"))
    assert recent.get(None) is None


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({"X-Cache-Namespace": "other"}, "MISS", id="namespace"),
        pytest.param({"Cache-Control": "no-cache"}, "REFRESH", id="no-cache"),
        pytest.param({"Cache-Control": "no-store"}, "HIT", id="no-store"),
        pytest.param({"X-Unrelated": "1"}, "HIT", id="unrelated-header"),
    ],
)
def test_a_request_sent_again_with_other_headers_is_asked_afresh(
    start_proxy: ProxyFactory, upstream: FakeUpstream, headers: dict[str, str], status: str
) -> None:
    base = start_proxy()
    plain = {"content-type": "application/json"}
    statuses = [
        httpx.post(f"{base}/v1/chat/completions", content=BODY, headers=plain).headers["x-cache-status"],
        httpx.post(f"{base}/v1/chat/completions", content=BODY, headers=plain).headers["x-cache-status"],
        httpx.post(f"{base}/v1/chat/completions", content=BODY, headers={**plain, **headers}).headers["x-cache-status"],
    ]

    assert statuses == ["MISS", "HIT", status]


def test_an_invalid_directive_is_refused_every_time(start_proxy: ProxyFactory) -> None:
    base = start_proxy()
    headers = {"content-type": "application/json", "Cache-Control": "max-age=soon"}
    answers = [httpx.post(f"{base}/v1/chat/completions", content=BODY, headers=headers) for _ in range(2)]

    assert [answer.status_code for answer in answers] == [400, 400]
