from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cache.keys import KeyConfig, KeyMode
from cache.redis_backend import masked_url
from providers import BUILTIN_PROVIDERS, AuthStyle, Provider, normalize_base_url
from proxy.settings import Settings, describe_invalid_settings

BUILTIN_NAMES = [provider.name for provider in BUILTIN_PROVIDERS]
BUILTINS = {provider.name: provider for provider in BUILTIN_PROVIDERS}


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def invalid_settings_message() -> str:
    with pytest.raises(ValidationError) as caught:
        settings()
    return describe_invalid_settings(caught.value)


def set_extra_providers(monkeypatch: pytest.MonkeyPatch, value: dict[str, Any]) -> None:
    monkeypatch.setenv("EXTRA_PROVIDERS", json.dumps(value))


# defaults


def test_defaults() -> None:
    defaults = settings()
    assert defaults.host == "127.0.0.1"
    assert defaults.port == 8000
    assert defaults.workers == 1
    assert defaults.respond_with_cache is True
    assert defaults.store_cache is True
    assert defaults.cache_key_mode is KeyMode.MESSAGES
    assert defaults.cache_key_include == ()
    assert defaults.extra_providers == {}
    assert defaults.key_config() == KeyConfig()


def test_defaults_have_no_keys() -> None:
    providers = settings().providers()
    assert all(provider.api_key is None for provider in providers.values())
    assert all(provider.credential_headers() == [] for provider in providers.values())


def test_the_metrics_directory_of_worker_processes_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert settings().prometheus_multiproc_dir is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert settings().prometheus_multiproc_dir == tmp_path


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=9001\nCACHE_KEY_MODE=full\n")
    loaded = Settings()
    assert loaded.port == 9001
    assert loaded.cache_key_mode is KeyMode.FULL


# normalize_base_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("http://localhost:11434/v1", "http://localhost:11434", id="trailing-v1"),
        pytest.param("http://localhost:11434/v1/", "http://localhost:11434", id="trailing-v1-slash"),
        pytest.param("http://localhost:11434/", "http://localhost:11434", id="trailing-slash"),
        pytest.param("http://localhost:11434//", "http://localhost:11434", id="trailing-slashes"),
        pytest.param("  https://api.openai.com/v1  ", "https://api.openai.com", id="whitespace"),
        pytest.param("https://api.groq.com/openai/v1", "https://api.groq.com/openai", id="v1-under-path"),
        pytest.param("https://openrouter.ai/api", "https://openrouter.ai/api", id="other-path"),
        pytest.param("https://api.ai21.com/studio/", "https://api.ai21.com/studio", id="other-path-slash"),
        pytest.param("http://host/v1beta", "http://host/v1beta", id="v1beta-kept"),
        pytest.param("http://host/v10", "http://host/v10", id="v10-kept"),
        pytest.param("http://host/v1/openai", "http://host/v1/openai", id="inner-v1-kept"),
        pytest.param("http://host", "http://host", id="bare-host"),
    ],
)
def test_normalize_base_url(url: str, expected: str) -> None:
    assert normalize_base_url(url) == expected


def test_configured_base_url_is_normalized() -> None:
    configured = settings(openai_base_url="http://localhost:11434/v1")
    assert configured.providers()["openai"].base_url == "http://localhost:11434"


def test_configured_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROQ_BASE_URL", "http://localhost:9000/v1/")
    assert settings().providers()["groq"].base_url == "http://localhost:9000"


def test_moving_one_provider_leaves_the_others() -> None:
    providers = settings(openai_base_url="http://localhost:11434").providers()
    assert providers["anthropic"].base_url == "https://api.anthropic.com"


# builtin providers


@pytest.mark.parametrize(
    ("name", "base_url"),
    [
        pytest.param("openai", "https://api.openai.com", id="openai"),
        pytest.param("openrouter", "https://openrouter.ai/api", id="openrouter"),
        pytest.param("anthropic", "https://api.anthropic.com", id="anthropic"),
        pytest.param("groq", "https://api.groq.com/openai", id="groq"),
        pytest.param("mistral", "https://api.mistral.ai", id="mistral"),
        pytest.param("cohere", "https://api.cohere.com", id="cohere"),
        pytest.param("ai21", "https://api.ai21.com/studio", id="ai21"),
        pytest.param("gemini", "https://generativelanguage.googleapis.com", id="gemini"),
    ],
)
def test_builtin_default_base_url(name: str, base_url: str) -> None:
    provider = settings().providers()[name]
    assert provider.name == name
    assert provider.base_url == base_url


def test_providers_are_exactly_the_builtins_by_default() -> None:
    assert sorted(settings().providers()) == sorted(BUILTIN_NAMES)


def test_anthropic_uses_x_api_key_and_version_header() -> None:
    anthropic = settings(anthropic_api_key="sk-ant-1").providers()["anthropic"]
    assert anthropic.auth is AuthStyle.X_API_KEY
    assert dict(anthropic.default_headers)["anthropic-version"] == "2023-06-01"
    assert anthropic.credential_headers() == [("x-api-key", "sk-ant-1")]


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        pytest.param("https://name.openai.azure.com", "https://name.openai.azure.com", id="resource"),
        pytest.param("https://name.openai.azure.com/", "https://name.openai.azure.com", id="slash"),
        pytest.param("https://name.openai.azure.com/openai", "https://name.openai.azure.com", id="openai"),
        pytest.param("https://name.openai.azure.com/openai/v1/", "https://name.openai.azure.com", id="v1"),
    ],
)
def test_azure_takes_its_resource_endpoint_and_an_api_key_header(endpoint: str, expected: str) -> None:
    azure = settings(azure_openai_endpoint=endpoint, azure_openai_api_key="az-1").providers()["azure"]
    assert azure.base_url == expected
    assert azure.auth is AuthStyle.API_KEY
    assert azure.credential_headers() == [("api-key", "az-1")]


def test_azure_has_no_upstream_until_told_one() -> None:
    assert settings().providers()["azure"].base_url == ""


def test_gemini_takes_its_key_in_x_goog_api_key_and_tolerates_a_version_in_its_base_url() -> None:
    gemini = settings(gemini_base_url="http://localhost:9/v1beta/", gemini_api_key="g-1").providers()["gemini"]
    assert gemini.base_url == "http://localhost:9"
    assert gemini.auth is AuthStyle.GOOG_API_KEY
    assert gemini.credential_headers() == [("x-goog-api-key", "g-1")]
    assert gemini.query_credential == "key"


def test_bedrock_is_regional_and_signs_unless_it_holds_an_api_key() -> None:
    assert settings().providers()["bedrock"].base_url == ""
    regional = settings(aws_region="eu-west-3").providers()["bedrock"]
    assert regional.base_url == "https://bedrock-runtime.eu-west-3.amazonaws.com"
    assert regional.auth is AuthStyle.SIGV4
    assert regional.credential_headers() == []
    moved = settings(aws_region="eu-west-3", bedrock_base_url="http://localhost:9", aws_bearer_token_bedrock="b-1")
    bedrock = moved.providers()["bedrock"]
    assert bedrock.base_url == "http://localhost:9"
    assert bedrock.credential_headers() == [("authorization", "Bearer b-1")]


@pytest.mark.parametrize("region", ["useast1", "US-EAST-1", "us-east", "us-east-1/../x"])
def test_an_invalid_aws_region_stops_start_up(region: str) -> None:
    with pytest.raises(ValidationError, match="aws_region"):
        settings(aws_region=region)


@pytest.mark.parametrize(
    "name", [name for name in BUILTIN_NAMES if name not in ("anthropic", "azure", "gemini", "bedrock")]
)
def test_other_builtins_use_bearer(name: str) -> None:
    provider = settings(**{f"{name}_api_key": f"key-{name}"}).providers()[name]
    assert provider.auth is AuthStyle.BEARER
    assert provider.default_headers == ()
    assert provider.credential_headers() == [("authorization", f"Bearer key-{name}")]


def test_key_applies_only_to_its_provider() -> None:
    providers = settings(openai_api_key="sk-openai").providers()
    assert providers["openai"].api_key == "sk-openai"
    assert providers["openrouter"].api_key is None
    assert providers["openrouter"].credential_headers() == []


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISTRAL_API_KEY", "mk-1")
    assert settings().providers()["mistral"].credential_headers() == [("authorization", "Bearer mk-1")]


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_repr_never_shows_key(name: str) -> None:
    secret = f"CANARY-{name}-9f2c"
    configured = settings(**{BUILTINS[name].api_key_setting: secret})
    provider = configured.providers()[name]
    assert provider.api_key == secret
    assert secret not in repr(provider)
    assert secret not in repr(configured)
    assert secret not in str(configured)


def test_registry_is_not_changed_by_configuration() -> None:
    settings(openai_api_key="sk-x", openai_base_url="http://localhost:1").providers()
    openai = next(p for p in BUILTIN_PROVIDERS if p.name == "openai")
    assert openai == Provider("openai", "https://api.openai.com", stream_usage=True)


@pytest.mark.parametrize(
    ("value", "asked"),
    [
        pytest.param(None, {"openai", "openrouter", "groq", "azure"}, id="default"),
        pytest.param("none", set(), id="none"),
        pytest.param("mistral, local", {"mistral", "local"}, id="listed-with-an-extra-provider"),
    ],
)
def test_stream_usage_providers_choose_who_is_asked_for_usage(value: str | None, asked: set[str]) -> None:
    extra = {"extra_providers": {"local": {"base_url": "http://localhost:8080"}}}
    configured = settings(**extra, **({"stream_usage_providers": value} if value else {}))
    assert {name for name, provider in configured.providers().items() if provider.stream_usage} == asked


def test_stream_usage_providers_must_name_providers() -> None:
    with pytest.raises(ValidationError, match="names no provider 'nope'"):
        settings(stream_usage_providers="openai,nope")


# extra providers


def test_extra_provider_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTRA_PROVIDERS", '{"ollama": {"base_url": "http://localhost:11434/v1"}}')
    providers = settings().providers()
    ollama = providers["ollama"]
    assert ollama.name == "ollama"
    assert ollama.base_url == "http://localhost:11434"
    assert ollama.auth is AuthStyle.BEARER
    assert ollama.api_key is None
    assert ollama.credential_headers() == []
    assert set(BUILTIN_NAMES) < set(providers)


def test_extra_provider_with_key(monkeypatch: pytest.MonkeyPatch) -> None:
    set_extra_providers(monkeypatch, {"vllm": {"base_url": "http://gpu:8000", "api_key": "CANARY-vllm"}})
    configured = settings()
    vllm = configured.providers()["vllm"]
    assert vllm.credential_headers() == [("authorization", "Bearer CANARY-vllm")]
    assert "CANARY-vllm" not in repr(vllm)
    assert "CANARY-vllm" not in repr(configured)


def test_extra_provider_with_x_api_key_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    set_extra_providers(
        monkeypatch,
        {"claude-proxy": {"base_url": "https://gateway.example", "api_key": "k", "auth": "x-api-key"}},
    )
    provider = settings().providers()["claude-proxy"]
    assert provider.auth is AuthStyle.X_API_KEY
    assert provider.credential_headers() == [("x-api-key", "k")]


def test_several_extra_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    set_extra_providers(
        monkeypatch,
        {"local_a": {"base_url": "http://a:1"}, "local-b2": {"base_url": "https://b/root/"}},
    )
    providers = settings().providers()
    assert providers["local_a"].base_url == "http://a:1"
    assert providers["local-b2"].base_url == "https://b/root"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("Ollama", id="uppercase"),
        pytest.param("1ollama", id="leading-digit"),
        pytest.param("my.server", id="dot"),
        pytest.param("a" * 33, id="too-long"),
        pytest.param("v1", id="reserved-v1"),
        pytest.param("healthz", id="reserved-healthz"),
        pytest.param("cache", id="reserved-cache"),
        pytest.param("metrics", id="reserved-metrics"),
        pytest.param("dashboard", id="reserved-dashboard"),
        pytest.param("admin", id="reserved-admin"),
        *(pytest.param(name, id=f"builtin-{name}") for name in BUILTIN_NAMES),
    ],
)
def test_extra_provider_name_rejected(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    set_extra_providers(monkeypatch, {name: {"base_url": "http://localhost:1"}})
    assert "EXTRA_PROVIDERS" in invalid_settings_message()


def test_extra_provider_name_rejected_when_passed_directly() -> None:
    with pytest.raises(ValidationError):
        settings(extra_providers={"openai": {"base_url": "http://localhost:1"}})


@pytest.mark.parametrize(
    "base_url",
    [
        pytest.param("ftp://host", id="ftp"),
        pytest.param("localhost:11434", id="no-scheme"),
        pytest.param("http://", id="no-host"),
        pytest.param("file:///etc/passwd", id="file"),
    ],
)
def test_extra_provider_base_url_must_be_http(monkeypatch: pytest.MonkeyPatch, base_url: str) -> None:
    set_extra_providers(monkeypatch, {"ollama": {"base_url": base_url}})
    message = invalid_settings_message()
    assert "EXTRA_PROVIDERS" in message
    assert "base_url" in message


def test_extra_provider_auth_must_be_known(monkeypatch: pytest.MonkeyPatch) -> None:
    set_extra_providers(monkeypatch, {"ollama": {"base_url": "http://x", "auth": "basic"}})
    with pytest.raises(ValidationError):
        settings()


# builtin base URLs


@pytest.mark.parametrize(
    "base_url",
    [
        pytest.param("ftp://host", id="ftp"),
        pytest.param("api.openai.com", id="no-scheme"),
        pytest.param("https://", id="no-host"),
    ],
)
@pytest.mark.parametrize("setting", ["openai_base_url", "azure_openai_endpoint", "gemini_base_url", "bedrock_base_url"])
def test_builtin_base_url_must_be_http(base_url: str, setting: str) -> None:
    with pytest.raises(ValidationError, match=setting):
        settings(**{setting: base_url})


# cache key settings


def test_cache_key_include_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_KEY_INCLUDE", "model, temperature")
    assert settings().cache_key_include == ("model", "temperature")


def test_cache_key_include_skips_empty_items(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_KEY_INCLUDE", " model,, ,seed, ")
    assert settings().cache_key_include == ("model", "seed")


def test_key_config_follows_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_KEY_MODE", "full")
    monkeypatch.setenv("CACHE_KEY_INCLUDE", "model")
    assert settings().key_config() == KeyConfig(mode=KeyMode.FULL, include=("model",))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("false", False), ("0", False), ("no", False), ("true", True), ("1", True), ("yes", True)],
)
def test_boolean_settings_from_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("RESPOND_WITH_CACHE", value)
    monkeypatch.setenv("STORE_CACHE", value)
    loaded = settings()
    assert loaded.respond_with_cache is expected
    assert loaded.store_cache is expected


def test_empty_environment_value_means_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "")
    monkeypatch.setenv("OPENAI_BASE_URL", "")
    loaded = settings()
    assert loaded.port == 8000
    assert loaded.providers()["openai"].base_url == "https://api.openai.com"


# invalid settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        pytest.param("CACHE_KEY_MODE", "banana", id="key-mode"),
        pytest.param("RESPOND_WITH_CACHE", "maybe", id="respond-bool"),
        pytest.param("STORE_CACHE", "maybe", id="store-bool"),
        pytest.param("PORT", "99999", id="port-too-high"),
        pytest.param("PORT", "-1", id="port-negative"),
        pytest.param("WORKERS", "0", id="workers-zero"),
        pytest.param("UPSTREAM_TIMEOUT", "0", id="timeout-zero"),
        pytest.param("LOG_LEVEL", "loud", id="log-level"),
        pytest.param("ANTHROPIC_BASE_URL", "ftp://host", id="base-url"),
        pytest.param("CACHE_BACKEND", "memcached", id="backend"),
        pytest.param("REDIS_URL", "http://127.0.0.1:6379", id="redis-url-scheme"),
        pytest.param("REDIS_TIMEOUT", "0", id="redis-timeout-zero"),
        pytest.param("REDIS_KEY_PREFIX", "{tagged}", id="redis-prefix-hash-tag"),
        pytest.param("REDIS_CLUSTER", "maybe", id="redis-cluster-bool"),
    ],
)
def test_invalid_setting_is_described_in_one_line(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    message = invalid_settings_message()
    assert "\n" not in message
    assert variable in message


@pytest.mark.parametrize(
    "variable",
    ["CACHE_KEY_MODE", "RESPOND_WITH_CACHE", "PORT", "UPSTREAM_TIMEOUT", "LOG_LEVEL", "GROQ_BASE_URL"],
)
def test_invalid_value_is_not_echoed(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, "CANARY-s3cret")
    message = invalid_settings_message()
    assert variable in message
    assert "s3cret" not in message


def test_invalid_base_url_does_not_leak_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "ftp://user:s3cret@host")
    message = invalid_settings_message()
    assert "OPENAI_BASE_URL" in message
    assert "s3cret" not in message
    assert "\n" not in message


def test_an_invalid_redis_url_does_not_leak_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "http://user:s3cret@host:6379/0")
    message = invalid_settings_message()
    assert "REDIS_URL" in message and "s3cret" not in message


def test_a_cluster_needs_a_network_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "unix:///run/redis.sock")
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    message = invalid_settings_message()
    assert "REDIS_CLUSTER" in message and "\n" not in message


def test_the_redis_url_is_a_secret_in_every_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://app:s3cret@cache.internal:6380/2")
    settings = Settings()
    assert settings.redis_url.get_secret_value() == "rediss://app:s3cret@cache.internal:6380/2"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@10.0.0.5:6379/0", "redis://***@10.0.0.5:6379/0"),
        ("rediss://app:s3cret@cache.internal:6380/2", "rediss://app:***@cache.internal:6380/2"),
        ("redis://s3cret@host/0", "redis://***@host/0"),
        ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
        ("unix://:s3cret@/run/redis.sock?db=1", "unix://***@/run/redis.sock?db=1"),
    ],
)
def test_a_redis_url_is_shown_with_its_password_masked(url: str, shown: str) -> None:
    assert masked_url(url) == shown


def test_invalid_extra_provider_does_not_leak_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    set_extra_providers(monkeypatch, {"ollama": {"base_url": "ftp://user:s3cret@host", "api_key": "s3cret"}})
    message = invalid_settings_message()
    assert "EXTRA_PROVIDERS" in message
    assert "ollama" in message
    assert "s3cret" not in message


def test_several_invalid_settings_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "99999")
    monkeypatch.setenv("CACHE_KEY_MODE", "banana")
    message = invalid_settings_message()
    assert "\n" not in message
    assert "PORT" in message
    assert "CACHE_KEY_MODE" in message


def test_the_metrics_directory_comes_from_the_environment_never_from_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text(f"PROMETHEUS_MULTIPROC_DIR={tmp_path / 'dotenv'}\nPORT=8123\n")
    from_dotenv = Settings()
    assert (from_dotenv.port, from_dotenv.prometheus_multiproc_dir) == (8123, None)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "environment"))
    assert Settings().prometheus_multiproc_dir == tmp_path / "environment"


def test_the_aws_credentials_never_show_in_the_settings_repr() -> None:
    secrets = {
        "aws_access_key_id": "AKIA-CANARY-1",
        "aws_secret_access_key": "CANARY-2",
        "aws_session_token": "CANARY-3",
    }
    configured = settings(**secrets)
    for secret in secrets.values():
        assert secret not in repr(configured) and secret not in str(configured)
