"""A streamed answer recorded as it passes: compressed in blocks, read whole or from any byte, by a flight's
followers whenever they join."""

from __future__ import annotations

import asyncio
import random
import tracemalloc

import pytest

import proxy.recorded as recorded_module
from proxy.coalesce import Flight
from proxy.recorded import BLOCK_BYTES, RecordedBody
from proxy.responses import Recording


def event(number: int) -> bytes:
    """A chat.completion.chunk event as OpenAI streams them."""
    return (
        b'data: {"id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1733400000,'
        b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":[{"index":0,'
        b'"delta":{"content":" token%d"},"logprobs":null,"finish_reason":null}]}\n\n' % number
    )


def test_the_whole_answer_and_every_suffix_read_back_as_added() -> None:
    rng = random.Random(7)
    chunks = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 900))) for _ in range(60)]
    chunks += [event(number) for number in range(80)]
    recorded = RecordedBody()
    for chunk in chunks:
        recorded.add(chunk)
    whole = b"".join(chunks)
    assert len(whole) > 5 * BLOCK_BYTES, "several blocks are compressed"

    assert recorded.size == len(whole)
    assert recorded.joined() == whole
    for offset in [0, 1, BLOCK_BYTES - 1, BLOCK_BYTES, *rng.sample(range(len(whole)), 200), len(whole)]:
        assert b"".join(recorded.since(offset)) == whole[offset:]


def test_a_reader_following_live_gets_each_chunk_as_the_object_added() -> None:
    recorded = RecordedBody()
    for number in range(200):  # past several block boundaries
        chunk = event(number)
        read_up_to = recorded.size
        recorded.add(chunk)
        assert recorded.since(read_up_to) == [chunk]
        assert recorded.since(read_up_to)[0] is chunk, "no copy, and no block decompressed to find it"


def test_a_stream_is_held_in_a_fraction_of_its_size() -> None:
    tracemalloc.start()
    try:
        recorded = RecordedBody()
        for number in range(300):
            recorded.add(event(number))  # each event dropped once added, as a relay does
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # What was made here or in the recording and is still held; not what other threads of this process (the
    # servers of other tests) allocated meanwhile.
    kept = snapshot.filter_traces(
        [tracemalloc.Filter(True, recorded_module.__file__), tracemalloc.Filter(True, __file__)]
    )
    held = sum(stat.size for stat in kept.statistics("filename"))
    assert held < recorded.size / 4, f"{held} bytes held for a {recorded.size}-byte stream"


def test_a_recording_past_its_limit_holds_nothing_and_says_so() -> None:
    recording = Recording(limit=3 * BLOCK_BYTES)
    for number in range(40):
        recording.add(event(number))
    assert recording.whole
    assert recording.body() == b"".join(event(number) for number in range(40))
    for number in range(40, 200):
        recording.add(event(number))
    assert not recording.whole
    assert recording.body() == b""


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_followers_joining_before_during_and_after_compression_each_read_the_whole_stream(
    anyio_backend: str,
) -> None:
    flight = Flight(streamed=True, with_usage=False)
    flight.started(200, [("content-type", "text/event-stream")])
    events = [event(number) for number in range(120)]

    async def follower() -> bytes:
        return b"".join([chunk async for chunk in flight.live_chunks()])

    followers = [asyncio.ensure_future(follower())]
    for number, chunk in enumerate(events):
        flight.publish(chunk)
        if number in (3, 40, 100):
            followers.append(asyncio.ensure_future(follower()))
        await asyncio.sleep(0)
    flight.finish(complete=True, stored=False)
    followers.append(asyncio.ensure_future(follower()))

    assert await asyncio.gather(*followers) == [b"".join(events)] * 5
    assert flight.recorded.joined() == b"".join(events)
