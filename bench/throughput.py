"""Hit and miss throughput of the proxy on each cache backend, next to nginx `proxy_cache` as the
practical ceiling, and cross-instance coalescing on Redis.

    uv run python bench/throughput.py [--duration 10] [--runs 3] [--connections 32]
        [--backends sqlite,redis] [--scale 1000000] [--no-floor] [--no-nginx] [--no-streaming] [--no-coalescing]

Needs `wrk`, `nginx` and `redis-server` (Debian packages `wrk`, `nginx-light`, `redis-server`).
Method: the server under test is pinned to CPU 0 and `wrk -t1` to CPU 1; a zero-delay fake upstream
(nginx answering a fixed ~1 kB chat completion) shares CPU 1, and so does the benchmark's own
redis-server (started on a free port by `tests/redis_servers.py`, every thread pinned with
`taskset -a`), so the store never takes the proxy's core. Each figure is the median of `--runs` runs.

Rows, for each backend in `--backends` (`sqlite`, the default store, and `redis`):

- `openai-proxy HIT (<backend>)`: one prompt asked over and over, as users get it by default: the
  hot entry is answered from the proxy's memory tier (MEMORY_CACHE_BYTES, 16 MB by default).
- `openai-proxy HIT (<backend>, no memory tier)`: the same with MEMORY_CACHE_BYTES=0, so every hit
  is read from the store (the SQLite file, or Redis over loopback).
- `openai-proxy MISS (<backend>)`: a new prompt each request, default settings, zero-delay upstream.

Then `raw ASGI app (uvicorn floor), beside HIT (<backend>)` (unless `--no-floor`): bench/floor.py, a raw
ASGI app that reads the body and answers ANSWER, served by uvicorn with the proxy's own options (httptools,
uvloop, no access log, one worker), pinned and measured as the HIT rows are, its runs alternated with the
default HIT row's (floor, proxy, floor, proxy, ...), so a machine whose speed drifts over minutes moves both
alike. It is the most the proxy's server can do, so after the table come, for each backend's HIT row, hits /
floor in req/s (goal: 60% or more) and hit p99 / floor p99 (goal: within 2x), each as the median of the
alternated pairs' ratios and their range. The floor is also measured on uvicorn's own httptools protocol
(`raw ASGI app, uvicorn's own protocol`), which writes a response's head and body in two system calls where
the proxy's makes one, and hits / that floor is printed beside, for reference. Then `nginx proxy_cache` HIT
and MISS (unless `--no-nginx`). `--scale N` also measures hits on entries that are only in SQLite (not in
the memory tier) with N entries stored, against the same test with 1,000 entries, plus start-up time and
RSS. After the table come the streaming latency figures (`bench/stream_latency.py`, unless `--no-streaming`)
and the cross-instance coalescing result (`bench/coalescing.py`, unless `--no-coalescing`): 50 identical
requests at once split across two proxies that share one Redis, with the upstream requests they cost.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.coalescing import measure_coalescing  # noqa: E402
from bench.processes import (  # noqa: E402
    backend_env,
    free_port,
    rss_mb,
    start_floor,
    start_proxy,
    start_redis,
    stop,
    wait_for_proxy,
    wait_until_up,
)
from bench.stream_latency import measure_streaming  # noqa: E402
from cache.keys import KeyConfig, cache_key  # noqa: E402
from cache.sqlite import SqliteBackend  # noqa: E402

BACKENDS = ("sqlite", "redis")

ANSWER = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"'
    + ("Caching makes repeated prompts free and instant. " * 16)
    + '","refusal":null},"logprobs":null,"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":12,"completion_tokens":180,"total_tokens":192}}'
)
HIT_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"What does a cache do?"}]}'
FLOOR_ROW = "raw ASGI app (uvicorn floor)"
STOCK_FLOOR_ROW = "raw ASGI app, uvicorn's own protocol"
GOAL_HITS_OF_FLOOR = 0.60  # a HIT row's req/s at least this share of the floor's
GOAL_HIT_P99_OVER_FLOOR = 2.0  # a HIT row's p99 at most this many times the floor's

NGINX_COMMON = """
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx-{name}.pid;
error_log {dir}/nginx-{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-client_body;
    proxy_temp_path {dir}/{name}-proxy_temp;
    fastcgi_temp_path {dir}/{name}-fastcgi; uwsgi_temp_path {dir}/{name}-uwsgi; scgi_temp_path {dir}/{name}-scgi;
    {server}
}}
"""

UPSTREAM_SERVER = """
    server {{
        listen 127.0.0.1:{upstream};
        keepalive_requests 1000000;
        location / {{ default_type application/json; return 200 '{answer}'; }}
    }}
"""

REFERENCE_SERVER = """
    proxy_cache_path {dir}/nginx-cache levels=1:2 keys_zone=bench:64m max_size=2g inactive=1h;
    upstream fake {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{reference};
        keepalive_requests 1000000;
        client_body_buffer_size 64k;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_methods POST;
            proxy_cache_key "$request_uri|$request_body";
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
"""


def start_nginx(folder: Path, name: str, cpu: int, server: str) -> subprocess.Popen[bytes]:
    config = folder / f"nginx-{name}.conf"
    # As root, nginx's workers would otherwise drop to a user that cannot write the temporary folder.
    user = "user root;" if os.geteuid() == 0 else ""
    config.write_text(NGINX_COMMON.format(user=user, dir=folder, name=name, server=server))
    return subprocess.Popen(["taskset", "-c", str(cpu), "nginx", "-c", str(config)])


def stop_nginx(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)  # fast shutdown: a graceful one waits on idle keep-alive connections
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


HIT_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""

MISS_SCRIPT = """
counter = 0
math.randomseed(os.time())
local run = math.random(1, 1000000000)
request = function()
  counter = counter + 1
  local prompt = "miss " .. run .. " " .. counter
  local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"' .. prompt .. '"}]}'
  return wrk.format("POST", "/v1/chat/completions", {["Content-Type"] = "application/json"}, body)
end
"""

SPREAD_SCRIPT = """
math.randomseed(os.time())
request = function()
  local n = math.random(0, {count} - 1)
  local body = '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"prompt ' .. n .. '"}}]}}'
  return wrk.format("POST", "/v1/chat/completions", {{["Content-Type"] = "application/json"}}, body)
end
"""


@dataclass
class Figures:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def _milliseconds(text: str) -> float:
    value, unit = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}[unit]


def run_wrk(url: str, script: Path, duration: int, connections: int) -> Figures:
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s"]
    output = subprocess.run([*command, str(script), url], capture_output=True, text=True, check=True).stdout
    try:
        rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", output).group(1))  # type: ignore[union-attr]
        # Anchored: a "+/- Stdev" column such as "77.50%" or "99.99%" must not be taken for a percentile.
        p50 = _milliseconds(re.search(r"^\s*50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
        p99 = _milliseconds(re.search(r"^\s*99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    except (AttributeError, ValueError) as exc:
        raise SystemExit(f"cannot read wrk's output ({exc}):\n{output}") from exc
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    count = int(errors.group(1)) if errors else 0
    count += sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    return Figures(rate, p50, p99, count)


def median_of(runs: list[Figures]) -> Figures:
    ordered = sorted(runs, key=lambda figures: figures.requests_per_second)
    middle = ordered[len(ordered) // 2]
    return Figures(middle.requests_per_second, middle.p50_ms, middle.p99_ms, sum(f.errors for f in runs))


def measure(url: str, script: Path, args: argparse.Namespace) -> Figures:
    return median_of([run_wrk(url, script, args.duration, args.connections) for _ in range(args.runs)])


@dataclass
class Paired:
    """Runs of the proxy and the floor alternated: their medians and each pair's ratios (proxy / floor)."""

    proxy: Figures
    floor: Figures
    rate_ratios: list[float]
    p99_ratios: list[float]


def measure_paired(url: str, floor_url: str, script: Path, args: argparse.Namespace) -> Paired:
    proxy_runs, floor_runs = [], []
    for _ in range(args.runs):
        floor_runs.append(run_wrk(floor_url, script, args.duration, args.connections))
        proxy_runs.append(run_wrk(url, script, args.duration, args.connections))
    pairs = list(zip(proxy_runs, floor_runs, strict=True))
    return Paired(
        median_of(proxy_runs),
        median_of(floor_runs),
        [proxy.requests_per_second / floor.requests_per_second for proxy, floor in pairs],
        [proxy.p99_ms / floor.p99_ms for proxy, floor in pairs],
    )


def populate(database: Path, count: int) -> None:
    """`count` entries as the proxy would store them, written straight into the cache file."""
    import asyncio

    async def create_schema() -> None:
        backend = SqliteBackend(database)
        await backend.open()
        await backend.close()

    asyncio.run(create_schema())
    config = KeyConfig()
    body = ANSWER.encode()
    now = time.time()
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA synchronous=OFF")
        batch = []
        for number in range(count):
            request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"prompt {number}"}]}
            key = cache_key("openai", "v1/chat/completions", request, config)
            batch.append((key, "openai", "v1/chat/completions", "gpt-4o-mini", 200, "application/json", body, now,
                          "", None, 12, 180, len(body), 0, None, now))  # fmt: skip
            if len(batch) == 20_000:
                db.executemany("INSERT INTO entries (key, provider, endpoint, model, status, content_type, body,"
                               " created_at, namespace, ttl, input_tokens, output_tokens, size, hits, last_hit_at,"
                               " used_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)  # fmt: skip
                batch.clear()
        if batch:
            db.executemany("INSERT INTO entries (key, provider, endpoint, model, status, content_type, body,"
                           " created_at, namespace, ttl, input_tokens, output_tokens, size, hits, last_hit_at,"
                           " used_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)  # fmt: skip


def table(rows: list[tuple[str, Figures]]) -> str:
    lines = [f"{'server / test':<46} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"]
    for name, figures in rows:
        lines.append(
            f"{name:<46} {figures.requests_per_second:>9.0f} {figures.p50_ms:>8.2f} {figures.p99_ms:>8.2f}"
            f" {figures.errors:>7}"
        )
    return "\n".join(lines)


def warm_hit(url: str) -> None:
    """Ask HIT_BODY until it is answered from the cache (the first answer may be a MISS, stored after it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = httpx.post(url, content=HIT_BODY, headers={"content-type": "application/json"})
        response.raise_for_status()
        if response.headers.get("x-cache-status") == "HIT":
            return
        time.sleep(0.05)
    raise SystemExit(f"{url} does not answer HIT_BODY from its cache")


def backend_rows(
    backend: str,
    folder: Path,
    upstream: int,
    redis_url: str | None,
    args: argparse.Namespace,
    notes: list[str],
    floor_url: str | None,
) -> list[tuple[str, Figures]]:
    """HIT without and with the memory tier, then MISS, on one backend (a fresh store); with `floor_url`, the
    floor's runs alternated with the HIT row's, and the ratios in `notes`."""
    env = backend_env(backend, redis_url)
    database = folder / f"cache-{backend}.db"
    # First with no memory tier, while the store holds only the one entry, as for the default HIT.
    port = free_port()
    proxy = start_proxy(port, upstream, database, {**env, "MEMORY_CACHE_BYTES": "0"})
    try:
        wait_for_proxy(port, proxy, backend)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        warm_hit(url)
        no_memory = measure(url, folder / "hit.lua", args)
    finally:
        stop(proxy)
    port = free_port()
    proxy = start_proxy(port, upstream, database, env)
    try:
        wait_for_proxy(port, proxy, backend)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        warm_hit(url)
        paired = None
        if floor_url is None:
            hit = measure(url, folder / "hit.lua", args)
        else:
            paired = measure_paired(url, floor_url, folder / "hit.lua", args)
            hit = paired.proxy
        miss = measure(url, folder / "miss.lua", args)
        notes.append(f"openai-proxy ({backend}) RSS after the runs: {rss_mb(proxy.pid):.0f} MB")
    finally:
        stop(proxy)
    rows = [
        (f"openai-proxy HIT ({backend})", hit),
        (f"openai-proxy HIT ({backend}, no memory tier)", no_memory),
        (f"openai-proxy MISS ({backend})", miss),
    ]
    if paired is not None:
        rows.append((f"{FLOOR_ROW}, beside HIT ({backend})", paired.floor))
        notes.extend(floor_ratios(f"openai-proxy HIT ({backend})", paired))
    if args.compare_watching:
        port = free_port()
        proxy = start_proxy(port, upstream, database, {**env, "METRICS": "false", "ACCESS_LOG": "false"})
        try:
            wait_for_proxy(port, proxy, backend)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            warm_hit(url)
            rows.append(
                (f"openai-proxy HIT ({backend}, no metrics, no access log)", measure(url, folder / "hit.lua", args))
            )
            rows.append(
                (f"openai-proxy MISS ({backend}, no metrics, no access log)", measure(url, folder / "miss.lua", args))
            )
        finally:
            stop(proxy)
    return rows


def stock_floor_row(folder: Path, args: argparse.Namespace) -> tuple[str, Figures]:
    port = free_port()
    floor = start_floor(port, stock_protocol=True)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        wait_until_up(url, floor)
        return STOCK_FLOOR_ROW, measure(url, folder / "hit.lua", args)
    finally:
        stop(floor)


def floor_ratios(name: str, paired: Paired) -> list[str]:
    """A HIT row against the floor in alternated runs: its share of the floor's req/s, its p99 over the floor's
    (the median of the pairs' ratios, and their range)."""
    share, p99_ratio = statistics.median(paired.rate_ratios), statistics.median(paired.p99_ratios)
    goal_share = f"goal: {GOAL_HITS_OF_FLOOR:.0%} or more, {verdict(share >= GOAL_HITS_OF_FLOOR)}"
    goal_p99 = f"goal: within {GOAL_HIT_P99_OVER_FLOOR:.0f}x, {verdict(p99_ratio <= GOAL_HIT_P99_OVER_FLOOR)}"
    shares = ", ".join(f"{ratio:.0%}" for ratio in paired.rate_ratios)
    p99s = ", ".join(f"{ratio:.2f}x" for ratio in paired.p99_ratios)
    return [
        f"{name}: hits / floor {share:.0%} ({goal_share}; alternated pairs: {shares})",
        f"{name}: hit p99 / floor p99 {p99_ratio:.2f}x ({goal_p99}; alternated pairs: {p99s})",
    ]


def stock_ratios(rows: list[tuple[str, Figures]], backends: list[str]) -> list[str]:
    """Each backend's HIT row against the floor on uvicorn's own protocol, for reference."""
    measured = dict(rows)
    stock = measured[STOCK_FLOOR_ROW].requests_per_second
    return [
        f"openai-proxy HIT ({backend}): hits / uvicorn's own protocol's floor"
        f" {measured[f'openai-proxy HIT ({backend})'].requests_per_second / stock:.0%}"
        for backend in backends
    ]


def verdict(holds: bool) -> str:
    return "met" if holds else "NOT MET"


def parse_backends(text: str) -> list[str]:
    backends = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown or not backends:
        raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(BACKENDS)}; got {text!r}")
    return list(dict.fromkeys(backends))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is shown (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument(
        "--backends",
        type=parse_backends,
        default=list(BACKENDS),
        help="cache backends to measure, comma-separated (default sqlite,redis)",
    )
    parser.add_argument("--scale", type=int, default=0, help="also measure with this many entries stored")
    parser.add_argument("--no-floor", action="store_true", help="skip the raw ASGI app (uvicorn floor) rows")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx proxy_cache reference")
    parser.add_argument("--no-streaming", action="store_true", help="skip the streaming latency figures")
    parser.add_argument("--no-coalescing", action="store_true", help="skip the cross-instance coalescing test")
    parser.add_argument(
        "--compare-watching",
        action="store_true",
        help="also measure HIT and MISS with metrics and the access log off (METRICS=false ACCESS_LOG=false)",
    )
    args = parser.parse_args()
    needed = ["wrk", "nginx", "taskset"]
    if "redis" in args.backends or not args.no_coalescing:
        needed.append("redis-server")
    for tool in needed:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install wrk nginx-light util-linux redis-server")

    rows: list[tuple[str, Figures]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        upstream, reference = free_port(), free_port()
        (folder / "hit.lua").write_text(HIT_SCRIPT.format(body=HIT_BODY))
        (folder / "miss.lua").write_text(MISS_SCRIPT)
        fake = start_nginx(folder, "upstream", 1, UPSTREAM_SERVER.format(upstream=upstream, answer=ANSWER))
        try:
            wait_until_up(f"http://127.0.0.1:{upstream}/", fake)
            with ExitStack() as floor_running:
                floor_url = None
                if not args.no_floor:
                    floor_port = free_port()
                    floor = start_floor(floor_port)
                    floor_running.callback(stop, floor)
                    floor_url = f"http://127.0.0.1:{floor_port}/v1/chat/completions"
                    wait_until_up(floor_url, floor)
                for backend in args.backends:
                    if backend == "redis":
                        redis = start_redis()
                        try:
                            rows += backend_rows(backend, folder, upstream, redis.url, args, notes, floor_url)
                        finally:
                            redis.remove()
                    else:
                        rows += backend_rows(backend, folder, upstream, None, args, notes, floor_url)
            if not args.no_floor:
                rows.append(stock_floor_row(folder, args))
            if not args.no_nginx:
                server = REFERENCE_SERVER.format(dir=folder, upstream=upstream, reference=reference)
                nginx = start_nginx(folder, "reference", 0, server)
                try:
                    url = f"http://127.0.0.1:{reference}/v1/chat/completions"
                    wait_until_up(url, nginx)
                    httpx.post(url, content=HIT_BODY, headers={"content-type": "application/json"})
                    rows.append(("nginx proxy_cache HIT", measure(url, folder / "hit.lua", args)))
                    rows.append(("nginx proxy_cache MISS", measure(url, folder / "miss.lua", args)))
                finally:
                    stop_nginx(nginx)
            if args.scale:
                for count in (1000, args.scale):
                    rows.append(scale_row(folder, upstream, count, args, notes))
        finally:
            stop_nginx(fake)

    out = sys.stdout
    out.write(
        f"wrk -t1 -c{args.connections} -d{args.duration}s, median of {args.runs}; server on CPU 0;"
        " wrk, fake upstream and redis-server on CPU 1\n"
    )
    out.write(table(rows) + "\n")
    if not args.no_floor:
        for line in stock_ratios(rows, args.backends):
            out.write(line + "\n")
    for note in notes:
        out.write(note + "\n")
    out.flush()
    if not args.no_streaming:
        out.write("\n" + measure_streaming(runs=50, gap_ms=20) + "\n")
        out.flush()
    if not args.no_coalescing:
        out.write("\n" + measure_coalescing(count=50, delay=0.5) + "\n")


def scale_row(
    folder: Path, upstream: int, count: int, args: argparse.Namespace, notes: list[str]
) -> tuple[str, Figures]:
    database = folder / f"scale-{count}.db"
    started = time.monotonic()
    populate(database, count)
    notes.append(f"{count} entries written in {time.monotonic() - started:.0f} s ({database.stat().st_size >> 20} MB)")
    script = folder / f"spread-{count}.lua"
    script.write_text(SPREAD_SCRIPT.format(count=count))
    port = free_port()
    # A memory tier of one entry: every hit is read from SQLite.
    proxy = start_proxy(port, upstream, database, {"CACHE_BACKEND": "sqlite", "MEMORY_CACHE_BYTES": "1"})
    try:
        startup = wait_until_up(f"http://127.0.0.1:{port}/healthz", proxy)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        probe = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"prompt {count - 1}"}]}
        if httpx.post(url, json=probe).headers.get("x-cache-status") != "HIT":
            raise SystemExit("the entries written for the scale test are not hits: the key rules changed")
        figures = measure(url, script, args)
        notes.append(f"{count} entries: start-up {startup:.2f} s, RSS {rss_mb(proxy.pid):.0f} MB")
    finally:
        stop(proxy)
    return f"openai-proxy HIT from SQLite, {count} entries", figures


if __name__ == "__main__":
    main()
