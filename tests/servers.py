"""Real servers on loopback for the tests: the proxy itself and a fake upstream the tests control."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp


class PromptServer(uvicorn.Server):
    """uvicorn's server, but it begins to shut down as soon as it is told, not at its next 0.1 s tick:
    hundreds of tests each stop a server, and the ticks added up to a minute of the suite."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit = asyncio.Event()

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # each pass stands for a second of uvicorn's ticks
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)

    def exit_now(self) -> None:
        self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._exit.set)


class ServerThread:
    """Serves an ASGI app with uvicorn on a free loopback port, in a thread of its own."""

    def __init__(
        self, app: ASGIApp, http: type[asyncio.Protocol] | Literal["auto"] = "auto", keep_alive: int = 600
    ) -> None:
        """`keep_alive`: seconds an idle connection stays open. By default for the whole run: the tests'
        clients keep theirs 5 s, as uvicorn's default does, and one reusing a connection just as the server
        closes it sees a failure that belongs to the timing, not to the code under test."""
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", http=http, timeout_keep_alive=keep_alive
        )
        self.server = PromptServer(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, wait: bool = True) -> None:
        """Shut the server down; without `wait`, it finishes shutting down while the next test runs."""
        self.server.exit_now()
        if wait:
            self.thread.join(timeout=10)


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[Request, Recorded], Awaitable[Response]]


def chat_completion(number: int, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion",
        "created": 1_700_000_000 + number,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"answer {number}", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }


def anthropic_message(number: int, model: str) -> dict[str, Any]:
    return {
        "id": f"msg_{number}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": f"answer {number}"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 3},
    }


WEATHER_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
WEATHER_ARGUMENTS = ['{"city"', ': "Par', 'is"}']


def chat_chunks(number: int, model: str, *, tools: bool = False, usage: bool = False) -> list[bytes]:
    """A realistic chat.completion.chunk stream: role, text (or tool-call) deltas, finish, usage, [DONE]."""
    base: dict[str, Any] = {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000 + number,
        "model": model,
        "system_fingerprint": "fp_test",
    }
    if usage:
        base["usage"] = None
    if tools:
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None}]
        deltas.append({"tool_calls": [{"index": 0, **WEATHER_CALL}]})
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": part}}]} for part in WEATHER_ARGUMENTS]
        finish = "tool_calls"
    else:
        deltas = [
            {"role": "assistant", "content": "", "refusal": None},
            {"content": "answer "},
            {"content": str(number)},
        ]
        finish = "stop"
    choice = {"index": 0, "logprobs": None, "finish_reason": None}
    events = [{**base, "choices": [{**choice, "delta": delta}]} for delta in deltas]
    events.append({**base, "choices": [{**choice, "delta": {}, "finish_reason": finish}]})
    if usage:
        events.append(
            {**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
        )
    return [f"data: {json.dumps(event)}\n\n".encode() for event in events] + [b"data: [DONE]\n\n"]


def chat_tool_completion(number: int, model: str) -> dict[str, Any]:
    completion = chat_completion(number, model)
    arguments = "".join(WEATHER_ARGUMENTS)
    call = {**WEATHER_CALL, "function": {"name": "get_weather", "arguments": arguments}}
    completion["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [call],
    }
    completion["choices"][0]["finish_reason"] = "tool_calls"
    return completion


def anthropic_events(number: int, model: str, *, tools: bool = False) -> list[bytes]:
    """A realistic Anthropic message stream, with a text block and optionally a tool_use block."""
    start = {**anthropic_message(number, model), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": 9, "output_tokens": 1}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    events += [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "answer "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": str(number)}},
        {"type": "content_block_stop", "index": 0},
    ]
    if tools:
        block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
        events.append({"type": "content_block_start", "index": 1, "content_block": block})
        events += [
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": part},
            }
            for part in WEATHER_ARGUMENTS
        ]
        events.append({"type": "content_block_stop", "index": 1})
    stop = "tool_use" if tools else "end_turn"
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": 3},
        }
    )
    events.append({"type": "message_stop"})
    return [f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in events]


@dataclass
class FakeUpstream:
    """A provider stand-in. Answers chat completions, Anthropic messages, embeddings and model lists
    with a fresh number each call (so a HIT is told from a MISS), or whatever `handler` returns."""

    requests: list[Recorded] = field(default_factory=list)
    handler: Handler | None = None
    chunk_delay: float = 0.0
    calls: int = 0
    url: str = ""
    sent_at: list[float] = field(default_factory=list)

    def reset(self) -> None:
        """Forget every request and go back to the default answers."""
        self.requests, self.handler, self.chunk_delay, self.calls, self.sent_at = [], None, 0.0, 0, []

    def answer_slowly(self, delay: float, first_fails: bool = False) -> None:
        """Answer each request with a chat completion after `delay`; with `first_fails`, the first one
        with a 529 (overloaded) after `delay`, and the others at once."""

        async def answer(request: Request, recorded: Recorded) -> Response:
            if not first_fails or self.calls == 1:
                await asyncio.sleep(delay)
            if first_fails and self.calls == 1:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=529)
            return JSONResponse(chat_completion(self.calls, "m"))

        self.handler = answer

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._serve, methods=["GET", "POST", "PUT", "DELETE"])])

    async def _serve(self, request: Request) -> Response:
        recorded = Recorded(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            body=await request.body(),
        )
        self.requests.append(recorded)
        self.calls += 1
        if self.handler is not None:
            return await self.handler(request, recorded)
        try:
            return self._default(recorded)
        except (AttributeError, TypeError):
            # What a real provider does with a body of the wrong shape.
            return JSONResponse({"error": {"message": "Invalid request body"}}, status_code=400)

    def _default(self, recorded: Recorded) -> Response:
        number = self.calls
        path = recorded.path
        if path.endswith("/models"):
            return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})
        if not path.endswith(("/chat/completions", "/completions", "/messages", "/embeddings")):
            return JSONResponse({"echo": path, "number": number})
        try:
            body = recorded.json()
        except (ValueError, RecursionError):
            return JSONResponse({"error": {"message": "We could not parse the JSON body"}}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": {"message": "The body must be a JSON object"}}, status_code=400)
        model = body.get("model", "unknown")
        tools = bool(body.get("tools"))
        if path.endswith("/chat/completions"):
            if body.get("stream"):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return self.stream(chat_chunks(number, model, tools=tools, usage=usage))
            return JSONResponse(chat_tool_completion(number, model) if tools else chat_completion(number, model))
        if path.endswith("/messages"):
            if body.get("stream"):
                return self.stream(anthropic_events(number, model, tools=tools))
            message = anthropic_message(number, model)
            if tools:
                message["content"].append(
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                )
                message["stop_reason"] = "tool_use"
            return JSONResponse(message)
        if path.endswith("/completions") and body.get("stream"):
            text = {
                "id": f"cmpl-{number}",
                "object": "text_completion",
                "choices": [{"text": f"answer {number}"}],
            }
            return self.stream([f"data: {json.dumps(text)}\n\n".encode(), b"data: [DONE]\n\n"])
        if path.endswith("/embeddings"):
            vector = [0.1 * number, 0.2, 0.3]
            return JSONResponse(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                    "model": model,
                    "usage": {"prompt_tokens": 2, "total_tokens": 2},
                }
            )
        return JSONResponse({"echo": path, "number": number})

    def stream(self, chunks: list[bytes]) -> StreamingResponse:
        """Streams `chunks`, waiting `chunk_delay` after each; `sent_at` gets each chunk's send time."""
        self.sent_at = []

        async def paced() -> Any:
            for chunk in chunks:
                self.sent_at.append(time.perf_counter())
                yield chunk
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)

        return StreamingResponse(paced(), media_type="text/event-stream")


def gzip_json(value: Any, **headers: str) -> Response:
    body = gzip.compress(json.dumps(value).encode())
    return Response(body, headers={"content-type": "application/json", "content-encoding": "gzip", **headers})


class SocketServer:
    """An upstream on a loopback port that speaks raw HTTP/1.1, for behaviour uvicorn cannot be made to
    show. Each connection is handed to `serve` in a thread of its own; `connections` counts them."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def serve(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            self.serve(connection)
