"""The access log: one line per request, in nginx's style or as JSON, never with a credential."""

from __future__ import annotations

import json
import logging
import time
import uuid

import httpx
import pytest

from proxy.access_log import json_line, keep_query_strings_out_of_the_server_log, text_line
from proxy.exchange import Exchange
from tests.conftest import PROXY_CLIENT_KEY, PROXY_OPENAI_KEY, ProxyFactory
from tests.servers import FakeUpstream


def exchange(**changes: object) -> Exchange:
    values: dict[str, object] = {
        "method": "POST",
        "path": "/v1/chat/completions",
        "client": "127.0.0.1",
        "user_agent": "OpenAI/Python 1.0",
        "started": 100.0,
        "at": 1_700_000_000.25,
        "provider": "openai",
        "endpoint": "chat/completions",
        "model": "gpt-4o-mini",
        "key": "0123456789abcdef" * 4,
        "status": 200,
        "cache_status": "HIT",
        "sent_bytes": 512,
        "first_byte": 100.002,
        "ended": 100.004,
    }
    values.update(changes)
    return Exchange(**values)  # type: ignore[arg-type]


def test_the_text_line_is_nginx_combined_with_the_cache_fields_after_it() -> None:
    line = text_line(exchange())
    assert line == (
        '127.0.0.1 - - [14/Nov/2023:22:13:20 +0000] "POST /v1/chat/completions HTTP/1.1" 200 512 "-"'
        ' "OpenAI/Python 1.0" HIT openai chat/completions "gpt-4o-mini" 0.004 - 0123456789ab'
    )


def test_a_stream_shows_its_time_to_first_byte() -> None:
    assert text_line(exchange(streamed=True)).endswith(" 0.004 0.002 0123456789ab")
    assert json.loads(json_line(exchange(streamed=True)))["ttfb_ms"] == pytest.approx(2.0)


def test_the_json_line_is_one_object_with_every_field() -> None:
    record = json.loads(json_line(exchange()))
    assert record == {
        "time": "2023-11-14T22:13:20.250Z",
        "client": "127.0.0.1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 200,
        "bytes": 512,
        "cache_status": "HIT",
        "coalesced": False,
        "provider": "openai",
        "endpoint": "chat/completions",
        "model": "gpt-4o-mini",
        "duration_ms": pytest.approx(4.0),
        "ttfb_ms": None,
        "key": "0123456789ab",
        "user_agent": "OpenAI/Python 1.0",
    }


def test_a_client_cannot_forge_a_text_line() -> None:
    forged = 'x" 200 1 "-" "y\n127.0.0.1 - - [01/Jan/2020:00:00:00 +0000] "GET /admin'
    line = text_line(exchange(user_agent=forged, model="m\r\nfake"))
    assert "\n" not in line and "\r" not in line
    assert line.count('"') - line.count('\\"') == 8, "four quoted fields, whatever their content"


def read_lines(capsys: pytest.CaptureFixture[str], marker: str, count: int) -> list[str]:
    """The log lines of this test's requests (marked in their paths or models), once `count` arrived."""
    lines: list[str] = []
    deadline = time.monotonic() + 5
    while len(lines) < count:
        assert time.monotonic() < deadline, f"only {len(lines)} of {count} lines: {lines}"
        time.sleep(0.05)
        lines += [line for line in capsys.readouterr().out.splitlines() if marker in line]
    return lines


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_one_line_per_request_after_it_ended_and_no_credential(
    start_proxy: ProxyFactory, upstream: FakeUpstream, capsys: pytest.CaptureFixture[str], log_format: str
) -> None:
    base = start_proxy(log_format=log_format)
    marker = uuid.uuid4().hex
    body = {"model": f"m-{marker}", "messages": [{"role": "user", "content": "hi"}]}
    secret = {"authorization": f"Bearer {PROXY_CLIENT_KEY}"}
    url = f"{base}/v1/chat/completions?beta=not-a-secret"
    sent = [
        httpx.post(url, json=body, headers=secret),
        httpx.post(url, json=body, headers=secret),
        httpx.post(url, json={**body, "messages": [{"role": "user", "content": "go"}], "stream": True}, headers=secret),
        httpx.post(f"{base}/nowhere-{marker}/v1/x", headers=secret),
        httpx.get(f"{base}/healthz?{marker}"),
    ]
    lines = read_lines(capsys, marker, 4)
    time.sleep(0.3)
    lines += [line for line in capsys.readouterr().out.splitlines() if marker in line]
    assert len(lines) == 4, "one line per request (the /healthz line shows no query, so no marker)"
    everything = "\n".join(lines)
    assert PROXY_CLIENT_KEY not in everything and PROXY_OPENAI_KEY not in everything
    assert "not-a-secret" not in everything, "paths are logged without their query string"
    # A line is written once the request is done, storing included, so lines may come in another order.
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        statuses = sorted((record["status"], record["cache_status"] or "-") for record in records)
        assert statuses == [(200, "HIT"), (200, "MISS"), (200, "MISS"), (404, "-")]
        assert {record["provider"] for record in records if record["status"] == 200} == {"openai"}
        assert {record["endpoint"] for record in records if record["status"] == 200} == {"chat/completions"}
        hit = next(record for record in records if record["cache_status"] == "HIT")
        assert hit["key"] == sent[1].headers["x-cache-key"][:12]
        assert [record["ttfb_ms"] is not None for record in records].count(True) == 1, "the stream's only"
        assert sorted(record["bytes"] for record in records) == sorted(len(response.content) for response in sent[:4])
    else:
        assert sorted(line.split('"')[2].split()[0] for line in lines) == ["200", "200", "200", "404"]
        assert sorted(line.split('"')[6].split()[0] for line in lines) == ["-", "HIT", "MISS", "MISS"]


def test_uvicorns_own_access_log_shows_no_query_string(caplog: pytest.LogCaptureFixture) -> None:
    """Served as `uvicorn openai_proxy:app`, uvicorn logs each request itself: never a `?key=` in it."""
    keep_query_strings_out_of_the_server_log()
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    logger = logging.getLogger("uvicorn.access")
    logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "POST", "/gemini/v1/x?key=secret-in-query&a=1", "1.1", 200)
    assert [record.getMessage() for record in caplog.records] == ['127.0.0.1:5 - "POST /gemini/v1/x HTTP/1.1" 200']
