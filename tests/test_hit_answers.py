"""The answers kept for the latest hits: reused only for the very entry and shape they were made for, and
bounded by the bytes they keep alive."""

from __future__ import annotations

import dataclasses

import orjson

from cache.base import CachedResponse
from cache.replay import replay
from proxy.hit_answers import HitAnswers, HitShape
from proxy.server import header_lines


def entry(content: str = "kept", created_at: float = 100.0) -> CachedResponse:
    message = {"role": "assistant", "content": content}
    completion = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    body = orjson.dumps(completion)
    return CachedResponse(200, "application/json", body, created_at, "openai", "v1/chat/completions")


def shape(key: str = "k1", wants_stream: bool = False) -> HitShape:
    return (key, "chat/completions", wants_stream, False)


def test_an_answer_is_the_replay_with_the_cache_headers_and_the_age() -> None:
    stored = entry()
    answer = HitAnswers().answer(shape(wants_stream=True), stored)
    assert answer is not None
    response = answer.response(age=7)
    replayed = replay(stored, "chat/completions", True, False)
    assert replayed is not None
    assert response.body == replayed.body
    assert response.raw_headers == [
        (b"content-type", b"text/event-stream"),
        (b"age", b"7"),
        (b"x-cache-status", b"HIT"),
        (b"x-cache-key", b"k1"),
        (b"content-length", b"%d" % len(replayed.body)),
    ]


def test_an_answer_carries_its_headers_as_the_server_writes_them_unless_the_server_would_refuse_one() -> None:
    answers = HitAnswers()
    for age in (0, 7, 123456):
        response = answers.answer(shape(), entry()).response(age)  # type: ignore[union-attr]
        assert response.head is not None
        assert response.head == header_lines(response.raw_headers)
        assert b"age: %d\r\n" % age in response.head
    injected = dataclasses.replace(entry(), content_type="application/json\r\nset-cookie: stolen=1")
    response = answers.answer(shape("k2"), injected).response(0)  # type: ignore[union-attr]
    assert response.head is None, "the server checks these headers itself, and refuses to write them at once"


def test_an_answer_is_reused_only_for_the_same_entry_and_shape() -> None:
    answers = HitAnswers()
    stored = entry()
    first = answers.answer(shape(), stored)
    assert answers.answer(shape(), stored) is first
    assert answers.answer(shape(), dataclasses.replace(stored)) is first, "a copy read again from the store"
    assert answers.answer(shape(wants_stream=True), stored) is not first
    replaced = entry("replaced", created_at=200.0)  # a refresh
    again = answers.answer(shape(), replaced)
    assert again is not None and again is not first and b"replaced" in again.body


def test_an_entry_that_cannot_answer_the_shape_gives_none_and_is_not_kept() -> None:
    answers = HitAnswers()
    broken = CachedResponse(200, "application/json", b"not json", 1.0, "openai", "v1/chat/completions")
    assert answers.answer(shape(wants_stream=True), broken) is None
    assert len(answers) == 0


def test_answers_stay_within_their_bytes_and_the_oldest_go_first() -> None:
    answers = HitAnswers(max_bytes=64 * 1024)
    for index in range(200):
        assert answers.answer(shape(f"k{index}"), entry("x" * 1000)) is not None
        assert answers.bytes <= answers.max_bytes
    assert 0 < len(answers) < 200
    kept_first = answers.answer(shape("k199"), entry())
    assert kept_first is not None
    assert answers.bytes <= answers.max_bytes


def test_a_converted_answer_counts_the_entry_it_keeps_alive_too() -> None:
    answers = HitAnswers()
    stored = entry("y" * 2000)
    answers.answer(shape(), stored)
    plain = answers.bytes
    answers.answer(shape("k2", wants_stream=True), stored)
    assert answers.bytes - plain > len(stored.body) + 2000


def test_an_answer_too_large_for_its_share_is_made_but_not_kept() -> None:
    answers = HitAnswers(max_bytes=64 * 1024)
    answer = answers.answer(shape(), entry("z" * 20_000))
    assert answer is not None and len(answer.body) > 20_000
    assert len(answers) == 0 and answers.bytes == 0


def test_the_hits_of_one_second_share_one_response_and_another_age_gets_its_own() -> None:
    answer = HitAnswers().answer(shape(), entry())
    assert answer is not None
    first = answer.response(3)
    assert answer.response(3) is first, "made once for every hit of that age"
    older = answer.response(4)
    assert older is not first
    assert older.head is not None and b"age: 4\r\n" in older.head
    assert (b"age", b"4") in older.raw_headers
    again = answer.response(3)
    assert again.head == first.head and again.raw_headers == first.raw_headers and again.body == first.body
    assert first.head is not None and b"age: 3\r\n" in first.head, "a response once made never changes"


def test_an_answer_is_written_at_once_only_when_the_server_would_write_it_itself() -> None:
    answers = HitAnswers()
    plain = answers.answer(shape("plain"), entry())
    assert plain is not None and plain.written_at_once
    refused_header = dataclasses.replace(entry(), content_type="application/json\r\nset-cookie: stolen=1")
    unprintable = dataclasses.replace(entry(), content_type="application/json\x7f")
    no_body = dataclasses.replace(entry(), status=204)
    unknown_status = dataclasses.replace(entry(), status=799)
    for number, odd in enumerate((refused_header, unprintable, no_body, unknown_status)):
        answer = answers.answer(shape(f"odd-{number}"), odd)
        assert answer is not None
        assert not answer.written_at_once, odd
