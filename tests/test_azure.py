"""Azure OpenAI (`/azure/`) end to end through the openai SDK's AzureOpenAI client (deployment paths with
`api-version`) and its OpenAI client on Azure's v1 API, against a fake that answers as Azure does:
deployment paths, an `api-key` header, content filter results, and a 400 for `stream_options` on API
versions older than 2024-08-01."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tests.conftest import PROXY_AZURE_KEY, ProxyFactory
from tests.native import assert_two_hits_saved, shown_and_exported
from tests.servers import FakeUpstream, Recorded, chat_completion
from tests.test_access_log import read_lines

# What the store does with these answers runs on both backends; the routing and key rules on SQLite.

API_VERSION = "2024-10-21"
OLD_API_VERSION = "2024-06-01"  # before stream_options
MODEL = "gpt-4o-2024-08-06"  # what Azure names in its answers, whatever the deployment is called
EMBEDDING_MODEL = "text-embedding-3-small"
MESSAGES = [{"role": "user", "content": "Say hi"}]
CLIENT_SECRET = "sk-client-SECRET"  # a canary: conftest fails the test if it reaches a log line
SAFE = {"filtered": False, "severity": "safe"}
CONTENT_FILTER = {"hate": SAFE, "self_harm": SAFE, "sexual": SAFE, "violence": SAFE}
PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": CONTENT_FILTER}]
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
_DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")


def azure_completion(number: int) -> dict[str, Any]:
    completion = chat_completion(number, MODEL)
    completion["prompt_filter_results"] = PROMPT_FILTER
    completion["choices"][0]["content_filter_results"] = CONTENT_FILTER
    return completion


def azure_chunks(number: int, usage: bool, finished: bool = True) -> list[bytes]:
    """A chat stream as Azure sends it: prompt filter results first (in a chunk with no choices and an
    empty id), content filter results on each content chunk, usage only when asked for."""
    base = {"id": f"chatcmpl-{number}", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": MODEL}
    first = {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": PROMPT_FILTER}
    events: list[dict[str, Any]] = [first]
    deltas = [{"role": "assistant", "content": ""}, {"content": "answer "}, {"content": str(number)}]
    for delta in deltas:
        choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
        if delta.get("content"):
            choice["content_filter_results"] = CONTENT_FILTER
        events.append({**base, "choices": [choice]})
    if finished:
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]})
        if usage:
            events.append({**base, "choices": [], "usage": USAGE})
    chunks = [f"data: {json.dumps(event)}\n\n".encode() for event in events]
    return chunks + [b"data: [DONE]\n\n"] if finished else chunks


def azure_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def serve_as_azure(upstream: FakeUpstream, broken_streams: bool = False) -> None:
    async def answer(request: Request, recorded: Recorded) -> Response:
        deployment = _DEPLOYMENT_PATH.match(recorded.path)
        v1 = recorded.path.startswith("/openai/v1/")
        if deployment is None and not v1:
            return azure_error(404, "Resource not found", "404")
        version = (parse_qs(recorded.query).get("api-version") or [""])[0]
        if deployment is not None and not version:
            return azure_error(404, "Resource not found", "404")
        body = recorded.json()
        if recorded.path.endswith("/embeddings"):
            vector = [0.1 * upstream.calls, 0.2]
            data = [{"object": "embedding", "index": 0, "embedding": vector}]
            usage = {"prompt_tokens": 2, "total_tokens": 2}
            return JSONResponse({"object": "list", "data": data, "model": EMBEDDING_MODEL, "usage": usage})
        if "stream_options" in body and deployment is not None and version < "2024-08-01":
            return azure_error(400, "Unrecognized request argument supplied: stream_options")
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = azure_chunks(upstream.calls, usage, finished=not broken_streams)

            async def events() -> Any:
                for chunk in chunks:
                    yield chunk
                if broken_streams:
                    raise RuntimeError("the upstream broke off")

            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse(azure_completion(upstream.calls))

    upstream.handler = answer


def azure_client(base: str, api_version: str = API_VERSION, **auth: Any) -> openai.AzureOpenAI:
    credentials = auth or {"api_key": "dummy"}
    return openai.AzureOpenAI(azure_endpoint=f"{base}/azure", api_version=api_version, max_retries=0, **credentials)


@pytest.fixture
def azure(start_proxy: ProxyFactory, upstream: FakeUpstream) -> str:
    serve_as_azure(upstream)
    return start_proxy(azure_openai_endpoint=upstream.url, azure_openai_api_key=PROXY_AZURE_KEY)


def test_a_deployment_miss_then_hit_with_the_proxys_key(azure: str, upstream: FakeUpstream) -> None:
    client = azure_client(azure)
    first = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)
    again = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES, temperature=0.5)

    assert (first.headers["x-cache-status"], again.headers["x-cache-status"]) == ("MISS", "HIT")
    assert first.parse().model_dump() == again.parse().model_dump()
    assert again.parse().choices[0].message.content == "answer 1"
    assert upstream.calls == 1
    sent = upstream.requests[0]
    assert sent.path == "/openai/deployments/prod-4o/chat/completions"
    assert parse_qs(sent.query) == {"api-version": [API_VERSION]}
    assert sent.header_values("api-key") == [PROXY_AZURE_KEY]
    assert sent.header("authorization") is None


def test_the_deployment_plays_the_part_of_the_model(azure: str, upstream: FakeUpstream) -> None:
    """Like `model` elsewhere: left out of a chat's key, part of an embedding's."""
    client = azure_client(azure)
    client.chat.completions.create(model="prod-4o", messages=MESSAGES)
    other = client.chat.completions.with_raw_response.create(model="canary-4o", messages=MESSAGES)
    assert other.headers["x-cache-status"] == "HIT"

    client.embeddings.create(model="embed-small", input="hello")
    same = client.embeddings.with_raw_response.create(model="embed-small", input="hello")
    other_deployment = client.embeddings.with_raw_response.create(model="embed-large", input="hello")
    assert same.headers["x-cache-status"] == "HIT"
    assert other_deployment.headers["x-cache-status"] == "MISS"
    assert [request.path for request in upstream.requests] == [
        "/openai/deployments/prod-4o/chat/completions",
        "/openai/deployments/embed-small/embeddings",
        "/openai/deployments/embed-large/embeddings",
    ]


@pytest.mark.both_backends
def test_a_stream_answers_json_and_json_answers_a_stream_with_content_filters(
    azure: str, upstream: FakeUpstream
) -> None:
    client = azure_client(azure)
    streamed = client.chat.completions.create(model="prod-4o", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    as_json = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)

    assert text == "answer 1"
    assert as_json.headers["x-cache-status"] == "HIT"
    completion = json.loads(as_json.content)
    assert completion["choices"][0]["message"]["content"] == "answer 1"
    assert completion["usage"] == USAGE, "the proxy asked Azure for usage, so the stream can answer JSON"
    assert completion["prompt_filter_results"] == PROMPT_FILTER
    assert completion["choices"][0]["content_filter_results"] == CONTENT_FILTER
    assert upstream.requests[0].json()["stream_options"] == {"include_usage": True}

    question = [{"role": "user", "content": "Say bye"}]
    client.chat.completions.create(model="prod-4o", messages=question)
    replayed = client.chat.completions.with_raw_response.create(
        model="prod-4o", messages=question, stream=True, stream_options={"include_usage": True}
    )
    assert replayed.headers["x-cache-status"] == "HIT"
    chunks = list(replayed.parse())
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "answer 2"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    assert chunks[0].model_extra is not None and chunks[0].model_extra["prompt_filter_results"] == PROMPT_FILTER
    assert upstream.calls == 2


def test_an_api_version_without_stream_options_gets_the_clients_body(azure: str, upstream: FakeUpstream) -> None:
    """Azure answers 400 to `stream_options` before 2024-08-01: such a stream is forwarded as sent, and
    without usage it cannot answer a request for JSON, which goes upstream."""
    client = azure_client(azure, api_version=OLD_API_VERSION)
    streamed = client.chat.completions.create(model="prod-4o", messages=MESSAGES, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == "answer 1"
    assert "stream_options" not in upstream.requests[0].json()

    again = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES, stream=True)
    as_json = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)
    assert again.headers["x-cache-status"] == "HIT"
    assert as_json.headers["x-cache-status"] == "MISS"
    assert as_json.parse().choices[0].message.content == "answer 2"


def test_the_v1_api_through_the_openai_client(azure: str, upstream: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=f"{azure}/azure/openai/v1", api_key="sk-client-a", max_retries=0)
    first = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)
    again = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)
    assert (first.headers["x-cache-status"], again.headers["x-cache-status"]) == ("MISS", "HIT")
    sent = upstream.requests[0]
    assert sent.path == "/openai/v1/chat/completions"
    assert sent.header_values("api-key") == [PROXY_AZURE_KEY]
    assert sent.header("authorization") is None, "the client's bearer credential is replaced, not added to"


def test_entra_tokens_are_forwarded_and_keep_their_answers_apart(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    serve_as_azure(upstream)
    base = start_proxy(azure_openai_endpoint=upstream.url)
    token_a = azure_client(base, azure_ad_token="sk-client-a")
    token_b = azure_client(base, azure_ad_token="sk-client-b")
    token_a.chat.completions.create(model="prod-4o", messages=MESSAGES)
    again_a = token_a.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)
    other_b = token_b.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)

    assert again_a.headers["x-cache-status"] == "HIT"
    assert other_b.headers["x-cache-status"] == "MISS"
    assert [request.header("authorization") for request in upstream.requests] == [
        "Bearer sk-client-a",
        "Bearer sk-client-b",
    ]
    assert all(request.header("api-key") is None for request in upstream.requests)


@pytest.mark.both_backends
def test_an_unfinished_or_broken_stream_is_not_stored(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    serve_as_azure(upstream, broken_streams=True)
    base = start_proxy(azure_openai_endpoint=upstream.url, azure_openai_api_key=PROXY_AZURE_KEY)
    client = azure_client(base)
    for _ in range(2):
        with pytest.raises((httpx.HTTPError, openai.APIError)):
            for _chunk in client.chat.completions.create(model="prod-4o", messages=MESSAGES, stream=True):
                pass
    assert upstream.calls == 2, "the first, broken stream was not stored"
    assert httpx.get(f"{base}/cache/stats").json()["entries"] == 0


def test_without_an_endpoint_the_route_answers_an_error_naming_the_setting(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    client = azure_client(start_proxy())
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="prod-4o", messages=MESSAGES)
    assert raised.value.status_code == 503
    error = raised.value.response.json()["error"]
    assert error["code"] == "provider_not_configured"
    assert "AZURE_OPENAI_ENDPOINT" in error["message"]
    assert raised.value.response.headers["x-cache-status"] == "MISS"
    assert upstream.calls == 0


@pytest.mark.both_backends
def test_savings_and_metrics_name_the_provider_and_the_answers_model(azure: str, upstream: FakeUpstream) -> None:
    client = azure_client(azure)
    for _ in range(3):
        client.chat.completions.create(model="prod-4o", messages=MESSAGES)

    assert_two_hits_saved(azure, "azure", "chat/completions", MODEL, price_provider="azure")


@pytest.mark.both_backends
def test_a_client_credential_is_forwarded_but_never_stored_logged_or_shown(
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    store_settings: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    serve_as_azure(upstream)
    base = start_proxy(azure_openai_endpoint=upstream.url)
    client = azure_client(base, api_key=CLIENT_SECRET)
    client.chat.completions.create(model="prod-4o", messages=MESSAGES)
    again = client.chat.completions.with_raw_response.create(model="prod-4o", messages=MESSAGES)
    assert again.headers["x-cache-status"] == "HIT"
    assert upstream.requests[0].header_values("api-key") == [CLIENT_SECRET]

    shown = shown_and_exported(base, store_settings, tmp_path)
    assert "answer 1" in shown[-1], "the export must hold the entry to mean anything"
    access = read_lines(capsys, "/azure/openai/deployments/prod-4o/chat/completions", 2)
    for text in [*shown, *access]:
        assert CLIENT_SECRET not in text
