from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cache.keys import KeyConfig, KeyMode, cache_key, credential_scope, generation_endpoint, is_storable

HEX64 = re.compile(r"^[0-9a-f]{64}$")

CHAT = "v1/chat/completions"

CONVERSATION: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
    ],
}


def chat_key(body: dict[str, Any], config: KeyConfig | None = None, **kwargs: Any) -> str:
    return cache_key("openai", CHAT, body, config or KeyConfig(), **kwargs)


def with_fields(body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**copy.deepcopy(body), **fields}


# generation_endpoint


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("v1/chat/completions", "chat/completions", id="chat-completions"),
        pytest.param("v1/completions", "completions", id="completions"),
        pytest.param("v1/embeddings", "embeddings", id="embeddings"),
        pytest.param("v1/responses", "responses", id="responses"),
        pytest.param("v1/messages", "messages", id="anthropic-messages"),
        pytest.param("v1/chat", "chat", id="cohere-v1-chat"),
        pytest.param("v2/chat", "chat", id="cohere-v2-chat"),
        pytest.param("compatibility/v1/chat/completions", "chat/completions", id="cohere-compatibility"),
        pytest.param("openai/v1/chat/completions", "chat/completions", id="prefixed"),
        pytest.param("v1beta/chat/completions", "chat/completions", id="beta-version"),
        pytest.param("/v1/chat/completions/", "chat/completions", id="surrounding-slashes"),
    ],
)
def test_generation_endpoint_names_the_endpoint(path: str, expected: str) -> None:
    assert generation_endpoint(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("v1/models", id="models"),
        pytest.param("v1/threads/abc/messages", id="thread-messages"),
        pytest.param("v1/responses/resp_1", id="stored-response"),
        pytest.param("v1/messages/count_tokens", id="count-tokens"),
        pytest.param("chat/completions", id="unversioned"),
        pytest.param("", id="empty"),
    ],
)
def test_generation_endpoint_rejects_other_paths(path: str) -> None:
    assert generation_endpoint(path) is None


# cache_key: shape and purity


def test_key_is_64_lowercase_hex() -> None:
    assert HEX64.match(chat_key(CONVERSATION))


def test_key_is_deterministic() -> None:
    assert chat_key(CONVERSATION) == chat_key(copy.deepcopy(CONVERSATION))


@pytest.mark.parametrize("mode", list(KeyMode))
def test_key_does_not_mutate_body(mode: KeyMode) -> None:
    body = with_fields(
        CONVERSATION,
        system=[{"type": "text", "text": "be nice", "cache_control": {"type": "ephemeral"}}],
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        n=1,
        stream=True,
    )
    before = copy.deepcopy(body)
    chat_key(body, KeyConfig(mode=mode, include=("model",)))
    assert body == before


# cache_key: messages mode ignores sampling and transport


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"model": "gpt-4o"}, id="model"),
        pytest.param({"temperature": 0.2}, id="temperature"),
        pytest.param({"top_p": 0.5}, id="top_p"),
        pytest.param({"max_tokens": 10}, id="max_tokens"),
        pytest.param({"user": "alice"}, id="user"),
        pytest.param({"metadata": {"run": "7"}}, id="metadata"),
        pytest.param({"stream": True}, id="stream"),
        pytest.param({"stream_options": {"include_usage": True}}, id="stream_options"),
        pytest.param({"n": 1}, id="n-one"),
    ],
)
def test_messages_mode_ignores(fields: dict[str, Any]) -> None:
    assert chat_key(with_fields(CONVERSATION, **fields)) == chat_key(CONVERSATION)


def test_object_key_order_does_not_matter() -> None:
    reordered = {
        "messages": [{"content": m["content"], "role": m["role"]} for m in CONVERSATION["messages"]],
        "model": CONVERSATION["model"],
    }
    assert chat_key(reordered) == chat_key(CONVERSATION)


# cache_key: messages mode normalizes equivalent content


def user_says(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([{"type": "text", "text": "hi"}], id="text-part"),
        pytest.param([{"type": "input_text", "text": "hi"}], id="input_text-part"),
        pytest.param([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}], id="cache-control"),
    ],
)
def test_single_text_part_equals_plain_string(parts: list[dict[str, Any]]) -> None:
    assert chat_key(user_says(parts)) == chat_key(user_says("hi"))


def test_two_text_parts_differ_from_joined_string() -> None:
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    assert chat_key(user_says(parts)) != chat_key(user_says("hi"))


def test_cache_control_is_ignored_among_several_parts() -> None:
    plain = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    hinted = [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}},
    ]
    assert chat_key(user_says(hinted)) == chat_key(user_says(plain))


def anthropic_key(body: dict[str, Any]) -> str:
    return cache_key("anthropic", "v1/messages", body, KeyConfig())


ANTHROPIC: dict[str, Any] = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.mark.parametrize(
    "system",
    [
        pytest.param([{"type": "text", "text": "be brief"}], id="text-block"),
        pytest.param(
            [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
            id="cache-control-block",
        ),
    ],
)
def test_anthropic_system_block_equals_string(system: list[dict[str, Any]]) -> None:
    assert anthropic_key(with_fields(ANTHROPIC, system=system)) == anthropic_key(
        with_fields(ANTHROPIC, system="be brief")
    )


def test_anthropic_system_changes_key() -> None:
    brief = anthropic_key(with_fields(ANTHROPIC, system="be brief"))
    assert brief != anthropic_key(ANTHROPIC)
    assert brief != anthropic_key(with_fields(ANTHROPIC, system="be verbose"))


def test_responses_input_parts_equal_string_content() -> None:
    as_parts = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}
    as_string = {"input": [{"role": "user", "content": "hi"}]}
    assert cache_key("openai", "v1/responses", as_parts, KeyConfig()) == cache_key(
        "openai", "v1/responses", as_string, KeyConfig()
    )


# cache_key: messages mode keeps what changes the answer


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(
            {
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "hello"},
                ]
            },
            id="message-content",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "You are terse."}, {"role": "user", "content": "hi"}]},
            id="message-role",
        ),
        pytest.param({"messages": [{"role": "user", "content": "hi"}]}, id="dropped-message"),
        pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, id="tools"),
        pytest.param({"tool_choice": "required"}, id="tool_choice"),
        pytest.param({"response_format": {"type": "json_object"}}, id="response_format"),
        pytest.param({"n": 2}, id="n-two"),
        pytest.param({"prompt": "Say hi"}, id="prompt"),
        pytest.param({"input": "Say hi"}, id="input"),
        pytest.param({"instructions": "Be kind"}, id="instructions"),
    ],
)
def test_messages_mode_keeps(changed: dict[str, Any]) -> None:
    assert chat_key(with_fields(CONVERSATION, **changed)) != chat_key(CONVERSATION)


@pytest.mark.parametrize(
    ("field", "first", "second"),
    [
        pytest.param("tool_choice", "auto", "none", id="tool_choice"),
        pytest.param("response_format", {"type": "text"}, {"type": "json_object"}, id="response_format"),
        pytest.param("prompt", "a", "b", id="prompt"),
        pytest.param("input", "a", "b", id="input"),
        pytest.param("instructions", "a", "b", id="instructions"),
        pytest.param("n", 2, 3, id="n"),
    ],
)
def test_messages_mode_distinguishes_values(field: str, first: Any, second: Any) -> None:
    assert chat_key(with_fields(CONVERSATION, **{field: first})) != chat_key(
        with_fields(CONVERSATION, **{field: second})
    )


# cache_key: where the request goes and who asks


@pytest.mark.parametrize("mode", list(KeyMode))
def test_provider_changes_key(mode: KeyMode) -> None:
    config = KeyConfig(mode=mode)
    assert cache_key("openai", CHAT, CONVERSATION, config) != cache_key("groq", CHAT, CONVERSATION, config)


@pytest.mark.parametrize("mode", list(KeyMode))
def test_endpoint_changes_key(mode: KeyMode) -> None:
    config = KeyConfig(mode=mode)
    assert cache_key("openai", CHAT, CONVERSATION, config) != cache_key("openai", "v1/responses", CONVERSATION, config)


def test_mode_changes_key() -> None:
    assert chat_key(CONVERSATION, KeyConfig(mode=KeyMode.FULL)) != chat_key(CONVERSATION)


def test_scope_changes_key() -> None:
    assert chat_key(CONVERSATION, scope="a" * 64) != chat_key(CONVERSATION)
    assert chat_key(CONVERSATION, scope="a" * 64) != chat_key(CONVERSATION, scope="b" * 64)


def test_namespace_changes_key() -> None:
    assert chat_key(CONVERSATION, namespace="team-a") != chat_key(CONVERSATION)
    assert chat_key(CONVERSATION, namespace="team-a") != chat_key(CONVERSATION, namespace="team-b")


# cache_key: embeddings


EMBEDDING: dict[str, Any] = {"model": "text-embedding-3-small", "input": "hello"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("model", "text-embedding-3-large", id="model"),
        pytest.param("dimensions", 256, id="dimensions"),
        pytest.param("encoding_format", "base64", id="encoding_format"),
    ],
)
@pytest.mark.parametrize("endpoint", ["v1/embeddings", "v1/embeddings?api-version=1"])
def test_embeddings_key_includes_model_settings(endpoint: str, field: str, value: Any) -> None:
    changed = with_fields(EMBEDDING, **{field: value})
    assert cache_key("openai", endpoint, changed, KeyConfig()) != cache_key("openai", endpoint, EMBEDDING, KeyConfig())


def test_embeddings_key_ignores_user() -> None:
    changed = with_fields(EMBEDDING, user="alice")
    assert cache_key("openai", "v1/embeddings", changed, KeyConfig()) == cache_key(
        "openai", "v1/embeddings", EMBEDDING, KeyConfig()
    )


# cache_key: include and full mode


def test_include_makes_listed_fields_matter() -> None:
    config = KeyConfig(include=("model", "temperature"))
    base = with_fields(CONVERSATION, temperature=0.0)
    assert chat_key(with_fields(base, model="gpt-4o"), config) != chat_key(base, config)
    assert chat_key(with_fields(base, temperature=1.0), config) != chat_key(base, config)
    assert chat_key(with_fields(base, top_p=0.5), config) == chat_key(base, config)


def test_include_never_adds_transport_fields() -> None:
    config = KeyConfig(include=("stream", "stream_options"))
    streamed = with_fields(CONVERSATION, stream=True, stream_options={"include_usage": True})
    assert chat_key(streamed, config) == chat_key(CONVERSATION, config)


FULL = KeyConfig(mode=KeyMode.FULL)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"model": "gpt-4o"}, id="model"),
        pytest.param({"temperature": 0.2}, id="temperature"),
        pytest.param({"top_p": 0.5}, id="top_p"),
        pytest.param({"max_tokens": 10}, id="max_tokens"),
        pytest.param({"user": "alice"}, id="user"),
        pytest.param({"metadata": {"run": "7"}}, id="metadata"),
        pytest.param({"seed": 1}, id="seed"),
        pytest.param({"n": 1}, id="n-one"),
    ],
)
def test_full_mode_keeps_every_field(fields: dict[str, Any]) -> None:
    assert chat_key(with_fields(CONVERSATION, **fields), FULL) != chat_key(CONVERSATION, FULL)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"stream": True}, id="stream"),
        pytest.param({"stream_options": {"include_usage": True}}, id="stream_options"),
    ],
)
def test_full_mode_ignores_transport(fields: dict[str, Any]) -> None:
    assert chat_key(with_fields(CONVERSATION, **fields), FULL) == chat_key(CONVERSATION, FULL)


# credential_scope


def test_no_credentials_means_empty_scope() -> None:
    assert credential_scope([]) == ""
    assert credential_scope([("content-type", "application/json"), ("accept", "*/*")]) == ""


@pytest.mark.parametrize("name", ["authorization", "x-api-key", "api-key"])
def test_each_credential_header_gives_a_scope(name: str) -> None:
    assert HEX64.match(credential_scope([(name, "secret-value")]))


def test_same_credential_same_scope() -> None:
    headers = [("authorization", "Bearer sk-one")]
    assert credential_scope(headers) == credential_scope(list(headers))


def test_other_headers_do_not_change_scope() -> None:
    assert credential_scope([("authorization", "Bearer sk-one"), ("user-agent", "x")]) == credential_scope(
        [("authorization", "Bearer sk-one")]
    )


def test_different_credentials_different_scope() -> None:
    assert credential_scope([("authorization", "Bearer sk-one")]) != credential_scope(
        [("authorization", "Bearer sk-two")]
    )


def test_same_value_in_different_headers_different_scope() -> None:
    assert credential_scope([("x-api-key", "sk-one")]) != credential_scope([("api-key", "sk-one")])


def test_header_names_are_case_insensitive() -> None:
    assert credential_scope([("Authorization", "Bearer sk-one")]) == credential_scope(
        [("authorization", "Bearer sk-one")]
    )
    assert credential_scope([("X-API-Key", "sk-one")]) == credential_scope([("x-api-key", "sk-one")])


def test_header_order_does_not_matter() -> None:
    one = [("authorization", "Bearer sk-one"), ("x-api-key", "sk-two")]
    assert credential_scope(one) == credential_scope(list(reversed(one)))


def test_scope_is_full_sha256_without_the_credential() -> None:
    scope = credential_scope([("authorization", "Bearer sk-secret-CANARY")])
    assert HEX64.match(scope)
    assert len(scope) == len(hashlib.sha256().hexdigest())
    assert "sk-secret-CANARY" not in scope


# is_storable


JSON_HEADERS = [("content-type", "application/json")]
JSON_BODY = json.dumps({"id": "chatcmpl-1", "choices": []}).encode()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(JSON_HEADERS, id="json"),
        pytest.param([("Content-Type", "application/json; charset=utf-8")], id="json-charset"),
        pytest.param([("content-type", "application/vnd.x+json")], id="vendor-json"),
        pytest.param([*JSON_HEADERS, ("cache-control", "max-age=60")], id="max-age"),
        pytest.param([*JSON_HEADERS, ("x-request-id", "req_1")], id="other-header"),
    ],
)
def test_successful_json_is_storable(headers: list[tuple[str, str]]) -> None:
    assert is_storable(200, headers, JSON_BODY, "chat/completions")


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503, 304, 199])
def test_unsuccessful_status_is_not_storable(status: int) -> None:
    assert not is_storable(status, JSON_HEADERS, JSON_BODY, "chat/completions")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("content-type", "text/event-stream")], id="event-stream"),
        pytest.param([("content-type", "text/plain")], id="text"),
        pytest.param([], id="no-content-type"),
    ],
)
def test_non_json_content_type_is_not_storable(headers: list[tuple[str, str]]) -> None:
    assert not is_storable(200, headers, JSON_BODY, "chat/completions")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(JSON_BODY[:-3], id="truncated"),
        pytest.param(b"not json", id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(b"data: {}\n\n", id="sse-payload"),
    ],
)
def test_invalid_json_body_is_not_storable(body: bytes) -> None:
    assert not is_storable(200, JSON_HEADERS, body, "chat/completions")


@pytest.mark.parametrize("name", ["set-cookie", "Set-Cookie"])
def test_set_cookie_is_not_storable(name: str) -> None:
    assert not is_storable(200, [*JSON_HEADERS, (name, "session=abc")], JSON_BODY, "chat/completions")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("no-store", id="no-store"),
        pytest.param("private", id="private"),
        pytest.param("No-Store", id="no-store-mixed-case"),
        pytest.param("PRIVATE", id="private-upper"),
        pytest.param("max-age=60, no-store", id="no-store-among-others"),
        pytest.param("public,private ,max-age=0", id="private-among-others"),
        pytest.param('private="set-cookie"', id="private-with-argument"),
    ],
)
def test_cache_control_forbidding_storage_is_not_storable(value: str) -> None:
    for name in ("cache-control", "Cache-Control"):
        assert not is_storable(200, [*JSON_HEADERS, (name, value)], JSON_BODY, "chat/completions")


# Properties over generated conversations (hypothesis).

texts = st.text(max_size=30)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": texts}),
    min_size=1,
    max_size=4,
)
extras = st.dictionaries(
    st.sampled_from(["temperature", "max_tokens", "top_p", "user", "seed"]), st.integers(0, 5), max_size=3
)


def reordered(value: Any) -> Any:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {key: reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(item) for item in value]
    return value


@given(conversation=messages, fields=extras, mode=st.sampled_from(list(KeyMode)))
def test_property_key_order_never_matters(
    conversation: list[dict[str, str]], fields: dict[str, int], mode: KeyMode
) -> None:
    body = {"model": "m", "messages": conversation, **fields}
    config = KeyConfig(mode=mode)
    assert chat_key(body, config) == chat_key(reordered(body), config)


@given(conversation=messages, index=st.integers(0, 3), extra=st.text(min_size=1, max_size=5))
def test_property_any_change_of_content_changes_the_key(
    conversation: list[dict[str, str]], index: int, extra: str
) -> None:
    body = {"model": "m", "messages": conversation}
    changed = copy.deepcopy(body)
    changed["messages"][index % len(conversation)]["content"] += extra
    assert chat_key(body) != chat_key(changed)


@given(
    conversation=messages,
    change=st.sampled_from(["provider", "endpoint", "namespace", "scope"]),
    value=st.text(min_size=1, max_size=10),
)
def test_property_provider_endpoint_namespace_and_scope_each_change_the_key(
    conversation: list[dict[str, str]], change: str, value: str
) -> None:
    body = {"model": "m", "messages": conversation}
    base = {"provider": "openai", "endpoint": "v1/chat/completions", "namespace": "", "scope": ""}
    other = {**base, change: base[change] + value}

    def key(parts: dict[str, str]) -> str:
        return cache_key(
            parts["provider"], parts["endpoint"], body, KeyConfig(), scope=parts["scope"], namespace=parts["namespace"]
        )

    assert key(base) != key(other)


# Header values reach the proxy decoded as latin-1 (ASGI), so that is the alphabet of a credential.
HEADER_CHARACTERS = st.characters(codec="latin-1")


@given(prefix=st.text(HEADER_CHARACTERS, min_size=8, max_size=40), last=HEADER_CHARACTERS, other=HEADER_CHARACTERS)
def test_property_a_credential_enters_as_a_full_hash(prefix: str, last: str, other: str) -> None:
    assume(last != other)
    secret = f"sk-{prefix}{last}"
    scope = credential_scope([("authorization", f"Bearer {secret}")])
    near = credential_scope([("authorization", f"Bearer sk-{prefix}{other}")])
    assert re.fullmatch(r"[0-9a-f]{64}", scope)
    assert scope != near, "credentials sharing all but their last character are apart"
    key = chat_key({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, scope=scope)
    assert secret not in key and secret not in scope
