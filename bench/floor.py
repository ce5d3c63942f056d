"""The server's floor: a raw ASGI app (no framework) that reads the request body and answers the fixed
~1 kB chat completion of bench/throughput.py (ANSWER), served by uvicorn exactly as the proxy is served.

    uv run python -m bench.floor [--host 127.0.0.1] [--port 8000] [--stock-protocol] [--relay-to URL]

Whatever the method and path, every request gets that answer. With `--relay-to`, every request is relayed
instead: its body is POSTed to URL + its path through aiohttp's connection pool (no limit), as the proxy's
upstream requests are, and the answer's status, content type and body chunks are passed on as they arrive,
as the proxy passes them: a chunk is written to the client's connection from aiohttp's own wake-up for it,
with no task woken per chunk (the server's `DirectBody`), and reading stops while the client's buffer is
full. The floor of a relay on this server and client, which bench/sustained.py's `streams` and
bench/fixed_rate.py measure beside the proxy. The uvicorn options are the proxy's own
(`openai_proxy.main`, one worker): httptools through the proxy's protocol class, the event loop uvicorn
picks for the proxy (uvloop), no access log, no server header, no proxy headers; and the process gets the
proxy's garbage-collector tuning. So the proxy differs from this server only by its app: what a proxied
request costs above this floor is the proxy's own work. With `--stock-protocol` it is served with uvicorn's
own httptools protocol instead, which writes a response's head and body in two system calls where the
proxy's protocol makes one: the floor uvicorn alone sets, for reference. bench/throughput.py measures it as
a peer of the proxy's rows; `bench.processes.start_floor` starts it pinned to CPU 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import ANSWER  # noqa: E402
from openai_proxy import tune_garbage_collection  # noqa: E402
from proxy.server import DirectBody, HttpProtocol, direct_body  # noqa: E402

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = ANSWER.encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: Message, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
    elif scope["type"] == "http":
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})


def relay_app(upstream: str) -> Callable[[Message, Receive, Send], Awaitable[None]]:
    """An app that relays every request to `upstream` (see the module's doc)."""
    sessions: list[aiohttp.ClientSession] = []

    async def relay(scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            for session in sessions:
                await session.close()
            return
        body = await read_body(receive)
        if not sessions:
            sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        headers = {"content-type": "application/json"}
        async with sessions[0].post(upstream + scope["path"], data=body, headers=headers) as answer:
            content_type = answer.headers.get("content-type", "").encode("latin-1")
            await send(
                {"type": "http.response.start", "status": answer.status, "headers": [(b"content-type", content_type)]}
            )
            direct = direct_body(scope)
            if direct is not None:
                await push(answer.content, direct)
            else:
                async for chunk in answer.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return relay


async def push(content: aiohttp.StreamReader, direct: DirectBody) -> None:
    """Every chunk of `content` written to `direct` from aiohttp's wake-up for it (as its `readany` waits),
    until the end or an error."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def pump(ready: asyncio.Future[None] | None = None) -> None:
        if ready is not None and not ready.cancelled():
            ready.exception()  # an error is raised by `read_nowait` below
        try:
            while chunk := content.read_nowait(-1):
                direct.write(chunk)
                if direct.paused:
                    direct.when_writable(pump)
                    return
        except aiohttp.ClientError as exc:
            finished.set_exception(exc)
            return
        if content.is_eof():
            finished.set_result(None)
            return
        ready = content._waiter = loop.create_future()
        ready.add_done_callback(pump)

    pump()
    await finished


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def serve_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--stock-protocol",
        action="store_true",
        help="serve with uvicorn's own httptools protocol, not the proxy's (which writes a response's head"
        " with its body): the floor as uvicorn alone sets it",
    )
    parser.add_argument("--relay-to", metavar="URL", help="relay every request to URL instead of answering it")
    args = parser.parse_args()
    tune_garbage_collection()
    uvicorn.run(
        relay_app(args.relay_to.rstrip("/")) if args.relay_to else app,
        host=args.host,
        port=args.port,
        log_level="warning",
        server_header=False,
        access_log=False,
        proxy_headers=False,
        http="httptools" if args.stock_protocol else HttpProtocol,
    )


if __name__ == "__main__":
    main()
