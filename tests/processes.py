"""The proxy as a user runs it: real processes on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
OPENAI_PROXY = [str(BIN / "openai-proxy")]
UVICORN_FORM = [sys.executable, "-m", "uvicorn", "openai_proxy:app"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(**values: str) -> dict[str, str]:
    """This process's environment with `values`. Processes started for the tests write bytecode even where
    the machine says not to (PYTHONDONTWRITEBYTECODE): otherwise every one of them compiles every module it
    imports again, 1.5 s of each start-up."""
    inherited = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    return {**inherited, **values}


@contextmanager
def running(command: list[str], cwd: Path, env: dict[str, str]) -> Iterator[str]:
    with started(command, cwd, env) as (base, _):
        yield base


@contextmanager
def started(command: list[str], cwd: Path, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with started_together([command], cwd, [env]) as [one]:
        yield one


@contextmanager
def started_together(
    commands: list[list[str]], cwd: Path, envs: list[dict[str, str]]
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """Start several proxies at once (each takes a second or two to import) and wait until all answer."""
    launched: list[tuple[str, subprocess.Popen[bytes]]] = []
    logs: list[Path] = []
    try:
        for command, env in zip(commands, envs, strict=True):
            port = free_port()
            # Output goes to a file: a pipe nobody reads fills up with access log lines and stalls the proxy.
            output = cwd / f"proxy-{port}.log"
            with output.open("wb") as log:
                process = subprocess.Popen(
                    [*command, "--host", "127.0.0.1", "--port", str(port)],
                    cwd=cwd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            launched.append((f"http://127.0.0.1:{port}", process))
            logs.append(output)
        deadline = time.monotonic() + 20
        for (base, process), output in zip(launched, logs, strict=True):
            while True:
                try:
                    httpx.get(f"{base}/healthz", timeout=0.5)
                    break
                except httpx.TransportError:
                    assert process.poll() is None, output.read_text(errors="replace")
                    assert time.monotonic() < deadline, "the proxy did not start"
                    time.sleep(0.1)
        yield launched
    finally:
        for _, process in launched:
            if process.poll() is None:
                process.terminate()
        for _, process in launched:
            process.wait(timeout=10)
