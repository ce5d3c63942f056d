"""The server's transport: a response's head goes out with its body, in one write, and nothing is reordered
or lost. (Every end-to-end test runs through the same protocol; what they cannot see is the number of
writes, since loopback delivers two writes as fast as one.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import uvicorn

from proxy.server import HeadWithBody, HttpProtocol
from tests.processes import free_port

pytestmark = pytest.mark.anyio

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_a_head_and_its_body_are_one_write() -> None:
    recorder = Recorder()
    transport = HeadWithBody(recorder, asyncio.get_running_loop())

    transport.write(HEAD)
    transport.write(b"{}")
    await asyncio.sleep(0)

    assert recorder.writes == [HEAD + b"{}"]


async def test_a_head_without_a_body_yet_goes_out_on_the_next_turn_of_the_loop() -> None:
    recorder = Recorder()
    transport = HeadWithBody(recorder, asyncio.get_running_loop())

    transport.write(HEAD)
    assert recorder.writes == []
    await asyncio.sleep(0)
    assert recorder.writes == [HEAD]
    transport.write(b"data: 1\n\n")
    assert recorder.writes == [HEAD, b"data: 1\n\n"], "after the head, every write goes straight through"


async def test_closing_sends_a_held_head_first() -> None:
    recorder = Recorder()
    transport = HeadWithBody(recorder, asyncio.get_running_loop())

    transport.write(HEAD)
    transport.close()
    await asyncio.sleep(0)

    assert recorder.writes == [HEAD] and recorder.closed


async def test_other_writes_are_not_held() -> None:
    recorder = Recorder()
    transport = HeadWithBody(recorder, asyncio.get_running_loop())

    transport.write(b"0\r\n\r\n")

    assert recorder.writes == [b"0\r\n\r\n"]


async def test_the_app_is_told_both_ends_of_a_real_connection() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = json.dumps({"client": scope["client"], "server": scope["server"]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=HttpProtocol, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        answer = await reader.read()
        ends = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert ends == {"client": list(writer.get_extra_info("sockname")), "server": ["127.0.0.1", port]}
        writer.close()
    finally:
        server.should_exit = True
        await serving
