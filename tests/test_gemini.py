"""Google Gemini (`/gemini/`) end to end through the google-genai SDK, against a fake that answers as the
Gemini API does: the model and method in the path, `x-goog-api-key` or `?key=`, `GenerateContentResponse`
chunks over `alt=sse` (events ending in CRLF CRLF, the last chunk carrying the finishReason), and errors
in Google's shape."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from google import genai
from google.genai import errors, types
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.conftest import PROXY_CLIENT_KEY, PROXY_GEMINI_KEY, ProxyFactory, wait_until_stored
from tests.native import assert_two_hits_saved, shown_and_exported
from tests.servers import FakeUpstream, Recorded
from tests.test_access_log import read_lines

# What the store does with these answers runs on both backends; the routing and key rules on SQLite.

MODEL = "gemini-2.0-flash"
USAGE = {"promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12}
_CALL = re.compile(r"^/(v1|v1beta)/models/([^/:]+):(\w+)$")


def google_error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "status": code}}, status_code=status)


def answer_chunks(number: int, model: str, finished: bool = True) -> list[dict[str, Any]]:
    """The chunks of a streamed answer "answer {number}": text in two parts, the finishReason and the
    whole usage in the last."""
    envelope = {"modelVersion": model, "responseId": f"resp-{number}"}
    first = {"content": {"parts": [{"text": "answer "}], "role": "model"}, "index": 0}
    last: dict[str, Any] = {"content": {"parts": [{"text": str(number)}], "role": "model"}, "index": 0}
    chunks = [{"candidates": [first], "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}, **envelope}]
    if finished:
        last["finishReason"] = "STOP"
    chunks.append({"candidates": [last], "usageMetadata": USAGE if finished else {"promptTokenCount": 9}, **envelope})
    return chunks


def whole_answer(number: int, model: str) -> dict[str, Any]:
    candidate = {
        "content": {"parts": [{"text": f"answer {number}"}], "role": "model"},
        "finishReason": "STOP",
        "index": 0,
    }
    return {"candidates": [candidate], "usageMetadata": USAGE, "modelVersion": model, "responseId": f"resp-{number}"}


class GeminiFake:
    """What the fake does with streams: `finished` False sends none with a finishReason; `broken` breaks
    the connection off after the first chunk."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.finished = True
        self.broken = False
        upstream.handler = self.answer

    async def answer(self, request: Request, recorded: Recorded) -> Response:
        query = parse_qs(recorded.query)
        if not recorded.header("x-goog-api-key") and "key" not in query:
            return google_error(403, "Method doesn't allow unregistered callers.", "PERMISSION_DENIED")
        call = _CALL.match(recorded.path)
        if call is None:
            return google_error(404, "Not found.", "NOT_FOUND")
        _version, model, method = call.groups()
        number = self.upstream.calls
        if method == "countTokens":
            return JSONResponse({"totalTokens": 5})
        body = recorded.json()
        if method == "embedContent":
            return JSONResponse({"embedding": {"values": [0.1 * number, 0.2]}})
        if method == "batchEmbedContents":
            return JSONResponse({"embeddings": [{"values": [0.1 * number, i]} for i, _ in enumerate(body["requests"])]})
        if method == "generateContent":
            return JSONResponse(whole_answer(number, model))
        if method == "streamGenerateContent" and query.get("alt") == ["sse"]:
            return self.stream(answer_chunks(number, model, self.finished))
        return google_error(400, f"Unknown method {method}.", "INVALID_ARGUMENT")

    def stream(self, chunks: list[dict[str, Any]]) -> StreamingResponse:
        async def events() -> Any:
            for chunk in chunks:
                yield b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"
                if self.broken:
                    raise RuntimeError("the upstream broke off")

        return StreamingResponse(events(), media_type="text/event-stream")


def client(base: str, api_version: str | None = None, key: str = "dummy") -> genai.Client:
    options = types.HttpOptions(base_url=f"{base}/gemini", api_version=api_version)
    return genai.Client(api_key=key, http_options=options)


def text_of(stream: Any) -> str:
    return "".join(chunk.text or "" for chunk in stream)


def status(response: Any) -> str:
    headers = response.sdk_http_response.headers
    return str(headers["x-cache-status"])


@pytest.fixture
def quiet_test_client() -> Iterator[None]:
    """httpx logs each URL it asks for, a client's `?key=` included: the tests' own client must not, or
    the run's log watch (conftest) would take the test's request for a leak of the proxy's."""
    logger = logging.getLogger("httpx")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


@pytest.fixture
def fake(upstream: FakeUpstream) -> GeminiFake:
    return GeminiFake(upstream)


@pytest.fixture
def gemini(start_proxy: ProxyFactory, upstream: FakeUpstream, fake: GeminiFake) -> str:
    return start_proxy(gemini_base_url=upstream.url, gemini_api_key=PROXY_GEMINI_KEY)


def test_a_generation_misses_then_hits_whatever_the_model_and_sampling(gemini: str, upstream: FakeUpstream) -> None:
    sdk = client(gemini)
    first = sdk.models.generate_content(model=MODEL, contents="Say hi")
    config = types.GenerateContentConfig(temperature=0.9, top_p=0.5, max_output_tokens=50)
    again = sdk.models.generate_content(model="gemini-2.5-flash", contents="Say hi", config=config)

    assert (status(first), status(again)) == ("MISS", "HIT")
    assert first.text == again.text == "answer 1"
    assert again.usage_metadata is not None and again.usage_metadata.total_token_count == 12
    assert upstream.calls == 1
    sent = upstream.requests[0]
    assert sent.path == f"/v1/models/{MODEL}:generateContent", "google-genai asks /v1/ by default"
    assert sent.header_values("x-goog-api-key") == [PROXY_GEMINI_KEY]


def test_v1beta_is_served_too(gemini: str, upstream: FakeUpstream) -> None:
    sdk = client(gemini, api_version="v1beta")
    sdk.models.generate_content(model=MODEL, contents="Say hi")
    again = sdk.models.generate_content(model=MODEL, contents="Say hi")
    assert status(again) == "HIT"
    assert upstream.requests[0].path == f"/v1beta/models/{MODEL}:generateContent"


def test_what_shapes_the_answer_is_part_of_the_key(gemini: str, upstream: FakeUpstream) -> None:
    sdk = client(gemini)
    sdk.models.generate_content(model=MODEL, contents="Say hi")
    variants = [
        types.GenerateContentConfig(system_instruction="Be brief."),
        types.GenerateContentConfig(response_mime_type="application/json"),
        types.GenerateContentConfig(candidate_count=2),
    ]
    answers = [sdk.models.generate_content(model=MODEL, contents="Say hi", config=config) for config in variants]
    assert [status(answer) for answer in answers] == ["MISS", "MISS", "MISS"]
    other = sdk.models.generate_content(model=MODEL, contents="Say bye")
    assert status(other) == "MISS"
    assert upstream.calls == 5


@pytest.mark.both_backends
def test_a_stream_answers_a_generation_and_a_generation_answers_a_stream(gemini: str, upstream: FakeUpstream) -> None:
    sdk = client(gemini)
    assert text_of(sdk.models.generate_content_stream(model=MODEL, contents="Say hi")) == "answer 1"
    whole = sdk.models.generate_content(model=MODEL, contents="Say hi")
    assert status(whole) == "HIT"
    assert whole.text == "answer 1"
    assert whole.candidates is not None and whole.candidates[0].finish_reason == types.FinishReason.STOP
    assert whole.usage_metadata is not None and whole.usage_metadata.candidates_token_count == 3
    assert upstream.requests[0].path == f"/v1/models/{MODEL}:streamGenerateContent"

    sdk.models.generate_content(model=MODEL, contents="Say bye")
    chunks = list(sdk.models.generate_content_stream(model=MODEL, contents="Say bye"))
    assert [status(chunk) for chunk in chunks] == ["HIT"]
    assert text_of(chunks) == "answer 2"
    assert chunks[-1].usage_metadata is not None and chunks[-1].usage_metadata.total_token_count == 12
    assert upstream.calls == 2

    replayed = list(sdk.models.generate_content_stream(model=MODEL, contents="Say hi"))
    assert text_of(replayed) == "answer 1" and len(replayed) == 2, "a recorded stream is replayed as recorded"


@pytest.mark.both_backends
def test_an_unfinished_or_broken_stream_is_not_stored(gemini: str, upstream: FakeUpstream, fake: GeminiFake) -> None:
    sdk = client(gemini)
    fake.finished = False
    assert text_of(sdk.models.generate_content_stream(model=MODEL, contents="Say hi")) == "answer 1"
    fake.finished, fake.broken = True, True
    with pytest.raises(Exception, match="incomplete chunked read"):  # the SDK's own copy of httpx raises it
        text_of(sdk.models.generate_content_stream(model=MODEL, contents="Say hi"))
    fake.broken = False
    again = sdk.models.generate_content(model=MODEL, contents="Say hi")
    assert status(again) == "MISS"
    assert upstream.calls == 3


def test_embeddings_are_keyed_on_the_model(gemini: str, upstream: FakeUpstream) -> None:
    sdk = client(gemini)
    first = sdk.models.embed_content(model="gemini-embedding-001", contents=["one", "two"])
    again = sdk.models.embed_content(model="gemini-embedding-001", contents=["one", "two"])
    other = sdk.models.embed_content(model="text-embedding-004", contents=["one", "two"])
    assert first.embeddings == again.embeddings
    assert first.embeddings is not None and len(first.embeddings) == 2
    assert [status(answer) for answer in (first, again, other)] == ["MISS", "HIT", "MISS"]
    assert upstream.requests[0].path == "/v1/models/gemini-embedding-001:batchEmbedContents"

    url = f"{gemini}/gemini/v1beta/models/gemini-embedding-001:embedContent"
    single = {"content": {"parts": [{"text": "one"}]}}
    answers = [httpx.post(url, json=single).headers["x-cache-status"] for _ in range(2)]
    assert answers == ["MISS", "HIT"]


def test_offline_the_cache_answers_and_nothing_goes_upstream(
    start_proxy: ProxyFactory, upstream: FakeUpstream, fake: GeminiFake
) -> None:
    database = {"cache_db": "offline.db", "gemini_base_url": upstream.url, "gemini_api_key": PROXY_GEMINI_KEY}
    online = start_proxy(**database)
    first = client(online)  # kept: a client that is collected closes its connections
    first.models.generate_content(model=MODEL, contents="Say hi")
    wait_until_stored(online, 1)
    sdk = client(start_proxy(**database, cache_offline=True))
    assert text_of(sdk.models.generate_content_stream(model=MODEL, contents="Say hi")) == "answer 1"
    with pytest.raises(errors.APIError) as raised:
        sdk.models.generate_content(model=MODEL, contents="Say bye")
    assert raised.value.code == 504 and raised.value.details["error"]["code"] == "not_cached"
    assert upstream.calls == 1


def test_other_calls_pass_through(gemini: str, upstream: FakeUpstream) -> None:
    sdk = client(gemini)
    counted = [sdk.models.count_tokens(model=MODEL, contents="Say hi") for _ in range(2)]
    assert [answer.total_tokens for answer in counted] == [5, 5]
    assert upstream.calls == 2
    assert upstream.requests[0].path == f"/v1/models/{MODEL}:countTokens"
    url = f"{gemini}/gemini/v1beta/models/{MODEL}:streamGenerateContent"
    unframed = httpx.post(url, json={"contents": [{"parts": [{"text": "hi"}]}]})
    assert unframed.headers["x-cache-status"] == "BYPASS", "a stream without alt=sse is a JSON array: not cached"


@pytest.mark.both_backends
@pytest.mark.usefixtures("quiet_test_client")
def test_a_key_in_the_query_is_forwarded_scopes_its_entries_and_is_never_kept_or_shown(
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    fake: GeminiFake,
    store_settings: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = start_proxy(gemini_base_url=upstream.url)
    url = f"{base}/gemini/v1beta/models/{MODEL}:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "Say hi"}]}]}
    first = httpx.post(f"{url}?key={PROXY_CLIENT_KEY}", json=body)
    again = httpx.post(f"{url}?key={PROXY_CLIENT_KEY}", json=body)
    other = httpx.post(f"{url}?key=sk-client-b", json=body)
    header = httpx.post(url, json=body, headers={"x-goog-api-key": PROXY_CLIENT_KEY})
    assert [answer.headers["x-cache-status"] for answer in (first, again, other, header)] == [
        "MISS",
        "HIT",
        "MISS",
        "MISS",
    ]
    assert parse_qs(upstream.requests[0].query) == {"key": [PROXY_CLIENT_KEY]}
    assert upstream.requests[0].header("x-goog-api-key") is None

    shown = shown_and_exported(base, store_settings, tmp_path)
    assert "answer 1" in shown[-1], "the export must hold the entry to mean anything"
    assert f"v1beta/models/{MODEL}:generateContent" in shown[-1]
    access = read_lines(capsys, f"/gemini/v1beta/models/{MODEL}:generateContent", 4)
    for text in [*shown, *access, first.text, str(first.headers)]:
        assert PROXY_CLIENT_KEY not in text


@pytest.mark.usefixtures("quiet_test_client")
def test_the_proxys_key_replaces_a_key_in_the_query(gemini: str, upstream: FakeUpstream) -> None:
    url = f"{gemini}/gemini/v1beta/models/{MODEL}:generateContent?key={PROXY_CLIENT_KEY}&alt=json"
    answer = httpx.post(url, json={"contents": [{"parts": [{"text": "hi"}]}]})
    assert answer.status_code == 200
    sent = upstream.requests[0]
    assert parse_qs(sent.query) == {"alt": ["json"]}
    assert sent.header_values("x-goog-api-key") == [PROXY_GEMINI_KEY]


def test_errors_of_the_proxy_reach_the_sdk_in_the_proxys_shape(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    base = start_proxy(gemini_base_url="http://127.0.0.1:9", gemini_api_key=PROXY_GEMINI_KEY)
    sdk = client(base)
    with pytest.raises(errors.APIError) as raised:
        sdk.models.generate_content(model=MODEL, contents="Say hi")
    assert raised.value.code == 502
    assert raised.value.details["error"]["code"] == "upstream_unreachable"
    assert "gemini" in str(raised.value.message)


@pytest.mark.both_backends
def test_savings_and_metrics_name_the_provider(gemini: str, upstream: FakeUpstream) -> None:
    sdk = client(gemini)
    for _ in range(3):
        sdk.models.generate_content(model=MODEL, contents="Say hi")
    assert_two_hits_saved(gemini, "gemini", "generateContent", MODEL, price_provider="google")
    entry = httpx.get(f"{gemini}/cache/entries").json()["entries"][0]
    assert entry["prompt"] == "Say hi"
