"""AWS Bedrock Runtime (`/bedrock/`) end to end through boto3's bedrock-runtime client, against a fake that
answers as Bedrock does (Converse JSON, ConverseStream and InvokeModelWithResponseStream as binary event
stream frames with a padding field) and accepts a request only when it is SigV4-signed with the proxy's
access key id, checking the signature with botocore, or carries a Bedrock API key."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from urllib3.exceptions import ProtocolError

from cache.bedrock import encode_frame
from tests.conftest import PROXY_CLIENT_KEY, ProxyFactory
from tests.native import assert_two_hits_saved
from tests.servers import FakeUpstream, Recorded, anthropic_message

# What the store does with these answers runs on both backends; the routing and key rules on SQLite.

REGION = "us-east-1"
PROXY_KEY_ID = "AKIAPROXYEXAMPLE0001"
PROXY_SECRET = "aws-proxy-secret-CANARY-2a7d"
PROXY_SESSION_TOKEN = "aws-proxy-token-CANARY-81c0"
CLIENT_KEY_ID = "AKIACLIENTEXAMPLE002"
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
MESSAGES = [{"role": "user", "content": [{"text": "Say hi"}]}]
USAGE = {"inputTokens": 9, "outputTokens": 3, "totalTokens": 12}
PADDING = {"p": "abcdefghijklmnopqrstuvwxyzABCDEFGH"}  # Bedrock pads each event's payload
_CALL = re.compile(r"^/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/\d{8}/([^/]+)/bedrock/aws4_request,"
    r" SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$"
)


def signature_problem(request: Request, recorded: Recorded) -> str | None:
    """None when the request carries a valid SigV4 signature by the proxy's key, else what is wrong."""
    match = _AUTHORIZATION.match(recorded.header("authorization") or "")
    if match is None:
        return "not signed"
    key_id, region, signed_headers, signature = match.groups()
    if key_id != PROXY_KEY_ID:
        return f"signed with {key_id}, not the proxy's key"
    if recorded.header("x-amz-security-token") != PROXY_SESSION_TOKEN:
        return "without the proxy's session token"
    path = request.scope["raw_path"].decode()
    url = f"http://{recorded.header('host')}{path}" + (f"?{recorded.query}" if recorded.query else "")
    headers = {name: recorded.header(name) or "" for name in signed_headers.split(";")}
    signed = AWSRequest(method=recorded.method, url=url, data=recorded.body, headers=headers)
    signed.context["timestamp"] = recorded.header("x-amz-date")
    signer = SigV4Auth(Credentials(PROXY_KEY_ID, PROXY_SECRET, PROXY_SESSION_TOKEN), "bedrock", region)
    expected = signer.signature(signer.string_to_sign(signed, signer.canonical_request(signed)), signed)
    return None if hmac.compare_digest(expected, signature) else "the signature does not match"


def converse_answer(number: int) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": f"answer {number}"}]}},
        "stopReason": "end_turn",
        "usage": USAGE,
        "metrics": {"latencyMs": 120},
    }


def converse_events(number: int, finished: bool) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
    for text in ("answer ", str(number)):
        events.append(("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}}))
    events.append(("contentBlockStop", {"contentBlockIndex": 0}))
    if finished:
        events.append(("messageStop", {"stopReason": "end_turn"}))
        events.append(("metadata", {"usage": USAGE, "metrics": {"latencyMs": 120}}))
    return events


class BedrockFake:
    """`finished` False ends streams before messageStop; `broken` breaks them off after the first frame."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.finished = True
        self.broken = False
        self.frame_delay = 0.0
        self.damaged = False  # one frame's checksum does not hold
        upstream.handler = self.answer

    async def answer(self, request: Request, recorded: Recorded) -> Response:
        authorization = recorded.header("authorization") or ""
        if not authorization.startswith("Bearer "):
            problem = signature_problem(request, recorded)
            if problem is not None:
                return JSONResponse(
                    {"message": f"The request signature is not valid: {problem}."},
                    status_code=403,
                    headers={"x-amzn-errortype": "InvalidSignatureException"},
                )
        call = _CALL.match(request.scope["raw_path"].decode())
        if call is None:
            return JSONResponse({"message": "Unknown operation"}, status_code=404)
        model, method = call.groups()
        number = self.upstream.calls
        if method == "converse":
            return JSONResponse(converse_answer(number))
        if method == "converse-stream":
            return self.stream(converse_events(number, self.finished))
        if method == "invoke":
            return JSONResponse(anthropic_message(number, "claude-3-haiku-20240307"))
        chunk = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": f"answer {number}"}}
        return self.stream([("chunk", {"bytes": base64.b64encode(json.dumps(chunk).encode()).decode()})])

    def stream(self, events: list[tuple[str, dict[str, Any]]]) -> StreamingResponse:
        async def frames() -> Any:
            for event, payload in events:
                frame = encode_frame(event, {**payload, **PADDING})
                if self.damaged and event == "contentBlockDelta":
                    frame = frame[:-5] + bytes([frame[-5] ^ 0xFF]) + frame[-4:]
                yield frame
                if self.broken:
                    raise RuntimeError("the upstream broke off")
                await asyncio.sleep(self.frame_delay)

        return StreamingResponse(frames(), media_type="application/vnd.amazon.eventstream")


def bedrock(base: str, **credentials: Any) -> Any:
    keys = credentials or {"aws_access_key_id": CLIENT_KEY_ID, "aws_secret_access_key": "client-secret"}
    return boto3.client(
        "bedrock-runtime",
        endpoint_url=f"{base}/bedrock",
        region_name=REGION,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
        **keys,
    )


def status(response: dict[str, Any]) -> str:
    return str(response["ResponseMetadata"]["HTTPHeaders"]["x-cache-status"])


def streamed_text(response: dict[str, Any]) -> str:
    events = list(response["stream"])
    return "".join(event["contentBlockDelta"]["delta"]["text"] for event in events if "contentBlockDelta" in event)


@pytest.fixture
def fake(upstream: FakeUpstream) -> BedrockFake:
    return BedrockFake(upstream)


@pytest.fixture
def signed(start_proxy: ProxyFactory, upstream: FakeUpstream, fake: BedrockFake) -> str:
    return start_proxy(
        bedrock_base_url=upstream.url,
        aws_region=REGION,
        aws_access_key_id=PROXY_KEY_ID,
        aws_secret_access_key=PROXY_SECRET,
        aws_session_token=PROXY_SESSION_TOKEN,
    )


def test_converse_misses_then_hits_signed_by_the_proxy(signed: str, upstream: FakeUpstream) -> None:
    client = bedrock(signed)
    first = client.converse(modelId=MODEL, messages=MESSAGES)
    again = client.converse(
        modelId="anthropic.claude-3-5-sonnet-20240620-v1:0",
        messages=MESSAGES,
        inferenceConfig={"temperature": 0.9, "maxTokens": 50},
    )
    assert (status(first), status(again)) == ("MISS", "HIT")
    assert first["ResponseMetadata"]["HTTPStatusCode"] == 200, "the fake checked the proxy's signature"
    assert again["output"] == first["output"]
    assert again["output"]["message"]["content"][0]["text"] == "answer 1"
    assert again["usage"] == USAGE
    assert upstream.calls == 1
    sent = upstream.requests[0]
    assert sent.path == f"/model/{MODEL}/converse"
    assert CLIENT_KEY_ID not in str(sent.headers)


def test_what_is_the_conversation_is_part_of_the_key(signed: str, upstream: FakeUpstream) -> None:
    client = bedrock(signed)
    client.converse(modelId=MODEL, messages=MESSAGES)
    variants = [
        {"system": [{"text": "Be brief."}]},
        {"toolConfig": {"tools": [{"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object"}}}}]}},
        {"additionalModelRequestFields": {"top_k": 5}},
    ]
    answers = [client.converse(modelId=MODEL, messages=MESSAGES, **variant) for variant in variants]
    assert [status(answer) for answer in answers] == ["MISS", "MISS", "MISS"]


@pytest.mark.both_backends
def test_a_converse_stream_is_replayed_and_answers_json_and_the_other_way_round(
    signed: str, upstream: FakeUpstream
) -> None:
    client = bedrock(signed)
    assert streamed_text(client.converse_stream(modelId=MODEL, messages=MESSAGES)) == "answer 1"
    replayed = client.converse_stream(modelId=MODEL, messages=MESSAGES)
    assert status(replayed) == "HIT"
    events = list(replayed["stream"])
    assert events[-1]["metadata"]["usage"] == USAGE and events[-2]["messageStop"]["stopReason"] == "end_turn"
    whole = client.converse(modelId=MODEL, messages=MESSAGES)
    assert status(whole) == "HIT"
    assert whole["output"]["message"]["content"] == [{"text": "answer 1"}]
    assert (whole["stopReason"], whole["usage"], whole["metrics"]) == ("end_turn", USAGE, {"latencyMs": 120})
    assert upstream.requests[0].path == f"/model/{MODEL}/converse-stream"

    question = [{"role": "user", "content": [{"text": "Say bye"}]}]
    client.converse(modelId=MODEL, messages=question)
    converted = client.converse_stream(modelId=MODEL, messages=question)
    assert status(converted) == "HIT"
    assert streamed_text(converted) == "answer 2"
    assert upstream.calls == 2


@pytest.mark.both_backends
def test_an_unfinished_or_broken_stream_is_not_stored(signed: str, upstream: FakeUpstream, fake: BedrockFake) -> None:
    client = bedrock(signed)
    fake.finished = False
    assert streamed_text(client.converse_stream(modelId=MODEL, messages=MESSAGES)) == "answer 1"
    fake.finished, fake.broken = True, True
    with pytest.raises(ProtocolError):  # the proxy cut the response off, as the upstream did
        streamed_text(client.converse_stream(modelId=MODEL, messages=MESSAGES))
    fake.broken = False
    assert status(client.converse(modelId=MODEL, messages=MESSAGES)) == "MISS"
    assert upstream.calls == 3


def test_a_stream_with_a_damaged_frame_is_relayed_but_not_stored(
    signed: str, upstream: FakeUpstream, fake: BedrockFake
) -> None:
    fake.damaged = True
    url = f"{signed}/bedrock/model/{MODEL}/converse-stream"
    relayed = [httpx.post(url, json={"messages": MESSAGES}) for _ in range(2)]
    assert [answer.status_code for answer in relayed] == [200, 200]
    assert [answer.headers["x-cache-status"] for answer in relayed] == ["MISS", "MISS"]
    assert upstream.calls == 2
    assert httpx.get(f"{signed}/cache/stats").json()["entries"] == 0


@pytest.mark.both_backends
def test_identical_streams_at_once_make_one_upstream_request_and_stream_live(
    signed: str, upstream: FakeUpstream, fake: BedrockFake
) -> None:
    fake.frame_delay = 0.05
    client = bedrock(signed)

    def one() -> tuple[str, str, str]:
        response = client.converse_stream(modelId=MODEL, messages=MESSAGES)
        headers = response["ResponseMetadata"]["HTTPHeaders"]
        return headers["x-cache-status"], headers.get("x-cache-coalesced", "false"), streamed_text(response)

    with ThreadPoolExecutor(6) as pool:
        answers = sorted(pool.map(lambda _: one(), range(6)))
    assert answers == [("HIT", "true", "answer 1")] * 5 + [("MISS", "false", "answer 1")]
    assert upstream.calls == 1


def test_invoke_is_keyed_on_the_whole_body_and_the_model(signed: str, upstream: FakeUpstream) -> None:
    client = bedrock(signed)
    body = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
    }

    def invoke(model: str, **changes: Any) -> dict[str, Any]:
        response = client.invoke_model(modelId=model, body=json.dumps({**body, **changes}))
        response["answer"] = json.loads(response["body"].read())
        return response

    first, again = invoke(MODEL), invoke(MODEL)
    assert (status(first), status(again)) == ("MISS", "HIT")
    assert again["answer"] == first["answer"]
    assert status(invoke(MODEL, temperature=0.5)) == "MISS", "a model-specific body is keyed whole"
    assert status(invoke("anthropic.claude-3-5-sonnet-20240620-v1:0")) == "MISS"

    streamed = client.invoke_model_with_response_stream(modelId=MODEL, body=json.dumps(body))
    chunks = [json.loads(event["chunk"]["bytes"]) for event in streamed["body"]]
    again_streamed = client.invoke_model_with_response_stream(modelId=MODEL, body=json.dumps(body))
    assert status(streamed) == "MISS", "a stream of Invoke's is kept apart from its JSON"
    assert status(again_streamed) == "HIT"
    assert [json.loads(event["chunk"]["bytes"]) for event in again_streamed["body"]] == chunks


def test_a_bedrock_api_key_is_forwarded_when_the_proxy_has_no_credentials_and_scopes_entries(
    start_proxy: ProxyFactory, upstream: FakeUpstream, fake: BedrockFake
) -> None:
    base = start_proxy(bedrock_base_url=upstream.url, aws_region=REGION)
    converse = {"messages": MESSAGES}
    url = f"{base}/bedrock/model/{MODEL}/converse"
    first = httpx.post(url, json=converse, headers={"authorization": f"Bearer {PROXY_CLIENT_KEY}"})
    again = httpx.post(url, json=converse, headers={"authorization": f"Bearer {PROXY_CLIENT_KEY}"})
    other = httpx.post(url, json=converse, headers={"authorization": "Bearer sk-client-b"})
    assert [answer.headers["x-cache-status"] for answer in (first, again, other)] == ["MISS", "HIT", "MISS"]
    assert upstream.requests[0].header("authorization") == f"Bearer {PROXY_CLIENT_KEY}"

    with pytest.raises(ClientError) as raised:
        bedrock(base).converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "new"}]}])
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert upstream.calls == 2, "a client's own signature is never forwarded"


def test_the_proxys_error_names_what_to_set(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    unsigned = httpx.post(f"{start_proxy(aws_region=REGION)}/bedrock/model/{MODEL}/converse", json={"messages": []})
    assert unsigned.status_code == 503
    error = unsigned.json()["error"]
    assert error["code"] == "provider_not_configured" and "AWS_ACCESS_KEY_ID" in error["message"]
    nowhere = httpx.post(f"{start_proxy()}/bedrock/model/{MODEL}/converse", json={"messages": []})
    assert nowhere.status_code == 503 and "AWS_REGION" in nowhere.json()["error"]["message"]
    assert upstream.calls == 0


@pytest.mark.both_backends
def test_savings_and_metrics_name_the_provider(signed: str, upstream: FakeUpstream) -> None:
    client = bedrock(signed)
    for _ in range(3):
        client.converse(modelId=MODEL, messages=MESSAGES)
    assert_two_hits_saved(signed, "bedrock", "converse", MODEL, price_provider="aws")
    assert httpx.get(f"{signed}/cache/entries").json()["entries"][0]["prompt"] == "Say hi"
