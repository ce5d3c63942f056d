"""The two ways to start the proxy, as a user runs them: real processes, real ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cache import SqliteBackend
from openai_proxy import load_settings, main
from tests.processes import OPENAI_PROXY, UVICORN_FORM, environment, free_port, running, started
from tests.servers import FakeUpstream


@pytest.mark.parametrize("command", [OPENAI_PROXY, UVICORN_FORM], ids=["openai-proxy", "uvicorn"])
def test_starts_with_no_configuration_and_answers_healthz(command: list[str], tmp_path: Path) -> None:
    with running(command, tmp_path, environment()) as base:
        health = httpx.get(f"{base}/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert (tmp_path / "openai_proxy_cache.db").exists(), "the default cache lives in the working directory"


@pytest.mark.parametrize("command", [OPENAI_PROXY, UVICORN_FORM], ids=["openai-proxy", "uvicorn"])
def test_invalid_settings_stop_start_up_with_one_line(command: list[str], tmp_path: Path) -> None:
    invalid = {
        "CACHE_KEY_MODE": "banana",
        "OPENAI_BASE_URL": "ftp://u:s3cret@h",
        "REDIS_URL": "http://u:s3cret@h:6379/0",
    }
    result = subprocess.run(
        [*command, "--port", str(free_port())],
        cwd=tmp_path,
        env=environment(**invalid),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("openai-proxy:")]
    assert len(lines) == 1 and all(name in lines[0] for name in invalid)
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_settings_come_from_a_dotenv_file(tmp_path: Path, upstream: FakeUpstream) -> None:
    (tmp_path / ".env").write_text(f"OPENAI_BASE_URL={upstream.url}/v1\nOPENAI_API_KEY=sk-from-dotenv\n")
    with running(OPENAI_PROXY, tmp_path, environment()) as base:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(f"{base}/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert upstream.requests[0].header("authorization") == "Bearer sk-from-dotenv"


def test_help_names_the_flags_and_settings_and_shows_no_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:s3cret@cache.internal:6379/0")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-s3cret")
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--host", "--port", "--workers", "--log-level"):
        assert flag in shown
    for setting in ("OPENAI_API_KEY", "CACHE_DB", "CACHE_BACKEND", "REDIS_URL", "UPSTREAM_TIMEOUT", "EXTRA_PROVIDERS"):
        assert setting in shown
    assert "s3cret" not in shown


def test_kill_9_while_storing_leaves_only_whole_entries(tmp_path: Path, upstream: FakeUpstream) -> None:
    env = environment(OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-test", MEMORY_CACHE_BYTES="0")
    stop = threading.Event()
    stored_while_running = 0

    def client(number: int) -> None:
        request = 0
        while not stop.is_set():
            request += 1
            body = {
                "model": "m",
                "stream": number % 2 == 0,
                "messages": [{"role": "user", "content": f"{number}/{request}"}],
            }
            try:
                httpx.post(f"{base}/v1/chat/completions", json=body, timeout=5)
            except httpx.TransportError:
                return

    with started(OPENAI_PROXY, tmp_path, env) as (base, process):
        clients = [threading.Thread(target=client, args=(number,)) for number in range(4)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 10
        while stored_while_running < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
            stored_while_running = httpx.get(f"{base}/cache/stats").json()["entries"]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        stop.set()
        for thread in clients:
            thread.join(timeout=10)
    assert stored_while_running >= 30, "the proxy was killed while it was storing"

    with sqlite3.connect(tmp_path / "openai_proxy_cache.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT content_type, body FROM entries").fetchall()
    assert len(rows) >= stored_while_running
    for content_type, body in rows:
        if content_type.startswith("text/event-stream"):
            assert body.rstrip().endswith(b"data: [DONE]"), body[-80:]
        else:
            assert json.loads(body)["object"] == "chat.completion"

    async def reopen() -> bool:
        backend = SqliteBackend(tmp_path / "openai_proxy_cache.db")
        await backend.open()
        try:
            return await backend.verify()
        finally:
            await backend.close()

    assert asyncio.run(reopen()) is True
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_workers_share_a_metrics_directory_of_their_server_s_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `openai-proxy --workers N` gets a fresh directory for its workers' metrics, removed at exit,
    so their figures add up and two servers on one host never mix or wipe each other's."""
    seen: list[tuple[str, bool, str]] = []

    def run(app: str, **options: object) -> None:
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        seen.append((directory, Path(directory).is_dir(), app))
        assert load_settings().prometheus_multiproc_dir == Path(directory), "each worker's settings read it"

    monkeypatch.setattr("uvicorn.run", run)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    main(["--workers", "2"])
    main(["--workers", "2"])
    (first, existed, app), (second, _, _) = seen
    assert existed and app == "openai_proxy:app"
    assert first != second, "two servers, two directories"
    assert not Path(first).exists() and not Path(second).exists(), "removed when the server exits"


def test_the_server_raises_its_open_file_limit_so_thousands_of_streams_fit() -> None:
    script = (
        "import resource, openai_proxy\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "raised = openai_proxy.raise_open_file_limit()\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "assert raised == soft and (soft == hard or hard == resource.RLIM_INFINITY), (raised, soft, hard)\n"
        "assert soft > 4096, soft\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=environment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
