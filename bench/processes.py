"""What the benchmarks share: free loopback ports, starting and stopping the servers they run (the proxy
pinned to CPU 0, a redis-server of their own pinned to CPU 1), and reading a server's memory."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.redis_servers import RedisServer

REDIS_KEY_PREFIX = "openai-proxy-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a server as Ctrl-C would (its shutdown runs), or kill it if it takes over 20 s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_up(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"{url} exited with status {process.returncode}")
        try:
            httpx.get(url, timeout=0.5)
            return time.monotonic() - started
        except httpx.TransportError:
            time.sleep(0.02)
    raise SystemExit(f"{url} did not come up")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the workers), in MB."""
    total = 0
    pids = [
        pid,
        *(int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()),
    ]
    for each in pids:
        status = Path(f"/proc/{each}/status").read_text()
        total += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    return total / 1024


def start_proxy(
    port: int, upstream: int, database: Path, extra: dict[str, str], errors_to: Path | None = None
) -> subprocess.Popen[bytes]:
    """The proxy on CPU 0, its cache file `database`; its log goes to `errors_to` when given."""
    env = {
        **os.environ,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream}",
        "OPENAI_API_KEY": "sk-bench",
        "CACHE_DB": str(database),
        "LOG_LEVEL": "warning",
        **extra,
    }
    command = ["taskset", "-c", "0", sys.executable, "-c", "import openai_proxy; openai_proxy.main()"]
    # The access log (on by default) goes to a file, as it would in production, not to this terminal.
    with ExitStack() as files:
        access_log = files.enter_context(open(database.with_name(f"access-{port}.log"), "ab"))
        error_log = files.enter_context(open(errors_to, "ab")) if errors_to is not None else None
        return subprocess.Popen([*command, "--port", str(port)], env=env, stdout=access_log, stderr=error_log)


def backend_env(backend: str, redis_url: str | None) -> dict[str, str]:
    if backend == "redis":
        assert redis_url is not None
        return {"CACHE_BACKEND": "redis", "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": REDIS_KEY_PREFIX}
    return {"CACHE_BACKEND": "sqlite"}


def wait_for_proxy(port: int, proxy: subprocess.Popen[bytes], backend: str) -> float:
    """Until the proxy answers, checking that it runs on `backend` and its store is usable; the time taken."""
    startup = wait_until_up(f"http://127.0.0.1:{port}/healthz", proxy)
    health = httpx.get(f"http://127.0.0.1:{port}/healthz").json()
    cache = health.get("cache", {})
    if cache.get("backend") != backend or not cache.get("ok"):
        raise SystemExit(f"the proxy should run on a usable {backend} cache: {health}")
    return startup


def start_redis() -> RedisServer:
    """A redis-server of our own on a free port, every thread of it pinned to CPU 1."""
    redis = RedisServer().start()
    try:
        subprocess.run(["taskset", "-a", "-p", "-c", "1", str(redis.pid)], check=True, capture_output=True)
    except BaseException:
        redis.remove()
        raise
    return redis


def start_floor(port: int, stock_protocol: bool = False, relay_to: str | None = None) -> subprocess.Popen[bytes]:
    """The server's floor (bench/floor.py: uvicorn as the proxy runs it, with a raw ASGI app) on CPU 0;
    with `stock_protocol`, on uvicorn's own httptools protocol rather than the proxy's; with `relay_to`, a
    relay to that URL."""
    root = Path(__file__).resolve().parent.parent
    command = ["taskset", "-c", "0", sys.executable, "-m", "bench.floor", "--port", str(port)]
    command += ["--stock-protocol"] if stock_protocol else []
    command += ["--relay-to", relay_to] if relay_to else []
    return subprocess.Popen(command, cwd=root)


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) used so far by a process and its children (the workers), in seconds."""
    ticks = 0
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for each in [pid, *(int(p) for p in children)]:
        fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")
