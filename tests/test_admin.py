"""The admin API and the CLI's cache commands, on a real proxy and a real cache file."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from openai_proxy import create_app, main
from proxy.settings import Settings
from tests.conftest import FakeClock, ProxyFactory, as_environment
from tests.servers import FakeUpstream

pytestmark = pytest.mark.both_backends

BIN = Path(sys.executable).parent
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def record_traffic(base: str) -> None:
    """Two OpenAI entries (one in a namespace), one Anthropic entry; three hits, three misses."""
    for _ in range(3):
        httpx.post(f"{base}/v1/chat/completions", json=CHAT)
    httpx.post(f"{base}/v1/chat/completions", json=CHAT, headers={"x-cache-namespace": "suite-a"})
    httpx.post(f"{base}/anthropic/v1/messages", json=MESSAGE)
    httpx.post(f"{base}/anthropic/v1/messages", json=MESSAGE)
    httpx.get(f"{base}/cache/stats")  # answered once the writes before it are done


class TestStats:
    def test_counts_hits_misses_and_tokens_saved(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        record_traffic(base)
        stats = httpx.get(f"{base}/cache/stats").json()
        assert (stats["entries"], stats["hits"], stats["misses"]) == (3, 3, 3)
        assert stats["hit_ratio"] == 0.5
        assert stats["bytes"] > 0
        # chat completions report 9 prompt + 3 completion tokens, Anthropic 9 input + 3 output
        assert stats["tokens_saved"] == {"input": 27, "output": 9, "total": 36}
        tokens = ("hits", "input_tokens", "output_tokens")
        assert [stats["by_provider"]["openai"][name] for name in tokens] == [2, 18, 6]
        assert [stats["by_provider"]["anthropic"][name] for name in tokens] == [1, 9, 3]
        assert stats["by_provider"]["anthropic"]["hits_without_price"] == 1, "claude-test is no model anyone prices"
        assert stats["by_provider"]["openai"]["cost_usd"] > 0
        models = {(row["provider"], row["model"]): row["hits"] for row in stats["by_model"]}
        assert models == {("openai", "gpt-4o-mini"): 2, ("anthropic", "claude-test"): 1}

    def test_statistics_survive_a_restart(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: Path
    ) -> None:
        database = tmp_path / "stats.db"
        first = start_proxy(cache_db=database)
        record_traffic(first)
        start_proxy.stop(first)  # counts not flushed yet are written at shutdown
        stats = httpx.get(f"{start_proxy(cache_db=database)}/cache/stats").json()
        assert (stats["hits"], stats["misses"]) == (3, 3)


class TestEntries:
    def test_lists_pages_newest_first_without_bodies(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = start_proxy(clock=clock)
        for number in range(5):
            clock.advance(1)
            httpx.post(
                f"{base}/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": str(number)}]}
            )
        first = httpx.get(f"{base}/cache/entries", params={"limit": 2}).json()
        assert len(first["entries"]) == 2 and first["next_offset"] == 2
        assert first["entries"][0]["created_at"] > first["entries"][1]["created_at"]
        assert set(first["entries"][0]) == {
            "key", "provider", "endpoint", "model", "namespace", "size", "created_at", "last_hit_at", "hits", "prompt",
        }  # fmt: skip
        assert [entry["prompt"] for entry in first["entries"]] == ["4", "3"]
        last = httpx.get(f"{base}/cache/entries", params={"limit": 2, "offset": 4}).json()
        assert len(last["entries"]) == 1 and last["next_offset"] is None

    def test_never_shows_prompts_when_dashboard_show_prompts_is_false(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(dashboard_show_prompts=False)
        secret = "The launch code is 0451"
        httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": secret}]})
        (listed,) = httpx.get(f"{base}/cache/entries").json()["entries"]
        assert "prompt" not in listed and "0451" not in json.dumps(listed)

    def test_filters_by_namespace_and_provider(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        record_traffic(base)
        in_namespace = httpx.get(f"{base}/cache/entries", params={"namespace": "suite-a"}).json()["entries"]
        assert [entry["namespace"] for entry in in_namespace] == ["suite-a"]
        anthropic = httpx.get(f"{base}/cache/entries", params={"provider": "anthropic"}).json()["entries"]
        assert [(entry["endpoint"], entry["hits"]) for entry in anthropic] == [("v1/messages", 1)]

    def test_deletes_one_entry(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        key = httpx.post(f"{base}/v1/chat/completions", json=CHAT).headers["x-cache-key"]
        assert httpx.delete(f"{base}/cache/entries/{key}").json() == {"deleted": 1}
        gone = httpx.delete(f"{base}/cache/entries/{key}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "entry_not_found"
        assert httpx.post(f"{base}/v1/chat/completions", json=CHAT).headers["x-cache-status"] == "MISS"

    @pytest.mark.parametrize(
        ("params", "deleted", "left"),
        [
            pytest.param({}, 3, 0, id="everything"),
            pytest.param({"namespace": "suite-a"}, 1, 2, id="namespace"),
            pytest.param({"provider": "anthropic"}, 1, 2, id="provider"),
            pytest.param({"provider": "openai", "namespace": "suite-a"}, 1, 2, id="both"),
            pytest.param({"older_than": "1h"}, 0, 3, id="none-old-enough"),
        ],
    )
    def test_purges_what_matches(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, params: dict[str, str], deleted: int, left: int
    ) -> None:
        base = start_proxy()
        record_traffic(base)
        assert httpx.delete(f"{base}/cache", params=params).json() == {"deleted": deleted}
        assert httpx.get(f"{base}/cache/stats").json()["entries"] == left

    def test_purges_entries_older_than_an_age(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, clock: FakeClock
    ) -> None:
        base = start_proxy(clock=clock)
        httpx.post(f"{base}/v1/chat/completions", json=CHAT)
        clock.advance(8 * 86400)
        httpx.post(f"{base}/anthropic/v1/messages", json=MESSAGE)
        assert httpx.delete(f"{base}/cache", params={"older_than": "7d"}).json() == {"deleted": 1}
        assert httpx.post(f"{base}/anthropic/v1/messages", json=MESSAGE).headers["x-cache-status"] == "HIT"

    @pytest.mark.parametrize(
        ("method", "path", "params"),
        [
            pytest.param("DELETE", "/cache", {"older_than": "soon"}, id="bad-duration"),
            pytest.param("GET", "/cache/entries", {"limit": "0"}, id="limit-zero"),
            pytest.param("GET", "/cache/entries", {"limit": "lots"}, id="limit-text"),
            pytest.param("GET", "/cache/entries", {"offset": "-1"}, id="negative-offset"),
        ],
    )
    def test_bad_parameters_are_a_400(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, method: str, path: str, params: dict[str, str]
    ) -> None:
        response = httpx.request(method, f"{start_proxy()}{path}", params=params)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_parameter"


class TestRoutes:
    def test_a_trailing_slash_changes_nothing(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy()
        key = httpx.post(f"{base}/v1/chat/completions", json=CHAT).headers["x-cache-key"]
        assert httpx.get(f"{base}/cache/stats/").json() == httpx.get(f"{base}/cache/stats").json()
        assert httpx.delete(f"{base}/cache/entries/{key}/").json() == {"deleted": 1}

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            pytest.param("POST", "/cache/stats", id="wrong-method"),
            pytest.param("HEAD", "/cache/entries", id="head"),
            pytest.param("GET", "/cache", id="get-the-root"),
            pytest.param("DELETE", "/cache/entries/", id="no-key"),
            pytest.param("GET", "/cache/nothing", id="unknown-path"),
        ],
    )
    def test_any_other_path_or_method_is_the_admin_apis_404(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, method: str, path: str
    ) -> None:
        base = start_proxy()
        response = httpx.request(method, f"{base}{path}")
        assert response.status_code == 404
        if method != "HEAD":
            assert response.json()["error"]["message"].startswith("Unknown admin route.")

    def test_an_unknown_admin_route_is_refused_before_it_is_unknown(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream
    ) -> None:
        base = start_proxy(admin_api_key="admin-secret")
        assert httpx.post(f"{base}/cache/nothing").status_code == 401


class TestAdminAccess:
    def test_admin_key_is_required_when_set(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(admin_api_key="admin-secret")
        assert httpx.get(f"{base}/cache/stats").status_code == 401
        assert httpx.get(f"{base}/cache/stats", headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.delete(f"{base}/cache").status_code == 401
        assert httpx.get(f"{base}/cache/stats", headers={"authorization": "Bearer admin-secret"}).status_code == 200
        assert httpx.get(f"{base}/cache/stats", headers={"x-api-key": "admin-secret"}).status_code == 200

    def test_a_proxy_key_is_not_an_admin_key(self, start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
        base = start_proxy(admin_api_key="admin-secret", proxy_api_keys="team-key")
        assert httpx.get(f"{base}/cache/stats", headers={"x-api-key": "team-key"}).status_code == 401

    @pytest.mark.anyio
    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    @pytest.mark.parametrize(
        ("client", "headers", "expected"),
        [
            pytest.param("127.0.0.1", {}, 200, id="loopback"),
            pytest.param("::1", {}, 200, id="loopback-v6"),
            pytest.param("203.0.113.9", {}, 403, id="remote"),
            pytest.param("203.0.113.9", {"host": "127.0.0.1", "x-forwarded-for": "127.0.0.1"}, 403, id="forged"),
        ],
    )
    async def test_without_an_admin_key_only_loopback_clients_get_in(
        self, tmp_path: Path, client: str, headers: dict[str, str], expected: int, anyio_backend: str
    ) -> None:
        app = create_app(Settings(_env_file=None, cache_db=tmp_path / "c.db"))  # type: ignore[call-arg]
        transport = httpx.ASGITransport(app=app, client=(client, 40000))
        async with app.lifespan():
            async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as http:
                response = await http.get("/cache/stats", headers=headers)
        assert response.status_code == expected
        if expected == 403:
            assert response.json()["error"]["type"] == "permission_error"


def run_cli(*arguments: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`openai-proxy ARGUMENTS` through its real entry point, in this process (a new one costs a second)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main(list(arguments))
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
    return subprocess.CompletedProcess(list(arguments), code, stdout.getvalue(), stderr.getvalue())


class TestCli:
    def test_export_purge_import_round_trip_gives_hits_again(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, store_settings: dict[str, Any]
    ) -> None:
        database = tmp_path / "cli.db"
        env = {"CACHE_DB": str(database), **as_environment(store_settings)}
        record_traffic(start_proxy(cache_db=database))

        exported = run_cli("export", "fixtures.jsonl", cwd=tmp_path, env=env)
        assert exported.returncode == 0, exported.stderr
        assert "exported 3 entries" in exported.stderr
        lines = (tmp_path / "fixtures.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(line)["key"] for line in lines)

        purged = run_cli("purge", cwd=tmp_path, env=env)
        assert purged.returncode == 0 and "deleted 3 entries" in purged.stdout
        stats = json.loads(run_cli("stats", "--json", cwd=tmp_path, env=env).stdout)
        assert stats["entries"] == 0

        imported = run_cli("import", "fixtures.jsonl", cwd=tmp_path, env=env)
        assert imported.returncode == 0, imported.stderr
        offline = start_proxy(cache_db=database, cache_offline=True)
        assert httpx.post(f"{offline}/v1/chat/completions", json=CHAT).headers["x-cache-status"] == "HIT"
        assert httpx.post(f"{offline}/anthropic/v1/messages", json=MESSAGE).headers["x-cache-status"] == "HIT"
        assert upstream.calls == 3

    def test_import_reports_and_skips_malformed_lines(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, store_settings: dict[str, Any]
    ) -> None:
        database = tmp_path / "cli.db"
        env = {"CACHE_DB": str(database), **as_environment(store_settings)}
        record_traffic(start_proxy(cache_db=database))
        run_cli("export", "good.jsonl", cwd=tmp_path, env=env)
        good = (tmp_path / "good.jsonl").read_text().splitlines()
        broken = [good[0], "{not json", json.dumps({"key": "k", "status": "200"}), good[1], good[2][:50]]
        (tmp_path / "mixed.jsonl").write_text("\n".join(broken) + "\n")
        run_cli("purge", cwd=tmp_path, env=env)

        result = run_cli("import", "mixed.jsonl", cwd=tmp_path, env=env)
        assert result.returncode == 1
        for number in (2, 3, 5):
            assert f"mixed.jsonl:{number}: skipped" in result.stderr
        assert "imported 2 entries, skipped 3 malformed lines" in result.stderr
        stats = json.loads(run_cli("stats", "--json", cwd=tmp_path, env=env).stdout)
        assert stats["entries"] == 2

    def test_stats_prints_the_same_figures_as_the_api(
        self, start_proxy: ProxyFactory, upstream: FakeUpstream, tmp_path: Path, store_settings: dict[str, Any]
    ) -> None:
        database = tmp_path / "cli.db"
        env = {"CACHE_DB": str(database), **as_environment(store_settings)}
        base = start_proxy(cache_db=database)
        record_traffic(base)
        from_api: dict[str, Any] = httpx.get(f"{base}/cache/stats").json()
        from_cli = json.loads(run_cli("stats", "--json", cwd=tmp_path, env=env).stdout)
        assert from_cli == from_api
        human = run_cli("stats", cwd=tmp_path, env=env).stdout
        assert "hit ratio     50.0%" in human
        assert "tokens saved  36 (27 input, 9 output)" in human

    def test_bad_purge_age_is_a_clear_error(self, tmp_path: Path) -> None:
        result = run_cli("purge", "--older-than", "soon", cwd=tmp_path, env={"CACHE_DB": str(tmp_path / "c.db")})
        assert result.returncode == 2
        assert "not a duration" in result.stderr and "Traceback" not in result.stderr
