"""All configuration, read from the environment and `.env`. Nothing else reads the environment."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from cache.keys import KeyConfig, KeyMode
from cache.prices import parse_price_overrides
from providers import BUILTIN_PROVIDERS, PROVIDER_NAME, AuthStyle, Provider
from proxy.routes import RESERVED_NAMES

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def _check_base_url(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        url = httpx.URL(value.strip())
    except httpx.InvalidURL as exc:
        raise ValueError("must be an http:// or https:// URL") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL")
    return value.strip()


class ExtraProvider(BaseModel):
    """An OpenAI-compatible server added by configuration (EXTRA_PROVIDERS)."""

    base_url: str
    api_key: SecretStr | None = None
    auth: AuthStyle = AuthStyle.BEARER

    _base_url_is_http = field_validator("base_url")(_check_base_url)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    log_level: LogLevel = "info"
    access_log: bool = True
    log_format: Literal["text", "json"] = "text"

    openai_api_key: SecretStr | None = None
    anthropic_api_key: SecretStr | None = None
    openrouter_api_key: SecretStr | None = None
    groq_api_key: SecretStr | None = None
    mistral_api_key: SecretStr | None = None
    cohere_api_key: SecretStr | None = None
    ai21_api_key: SecretStr | None = None
    azure_openai_api_key: SecretStr | None = None
    gemini_api_key: SecretStr | None = None
    # Bedrock: the proxy's AWS credentials (else botocore's chain: AWS_PROFILE, files, roles), or its
    # Bedrock API key.
    aws_region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    aws_profile: str | None = None
    aws_bearer_token_bedrock: SecretStr | None = None

    openai_base_url: str | None = None
    anthropic_base_url: str | None = None
    openrouter_base_url: str | None = None
    groq_base_url: str | None = None
    mistral_base_url: str | None = None
    cohere_base_url: str | None = None
    ai21_base_url: str | None = None
    azure_openai_endpoint: str | None = None
    gemini_base_url: str | None = None
    bedrock_base_url: str | None = None
    extra_providers: dict[str, ExtraProvider] = Field(default_factory=dict)
    # Providers whose chat streams are forwarded asking for usage; `none` for no provider.
    stream_usage_providers: Annotated[tuple[str, ...], NoDecode] = tuple(
        provider.name for provider in BUILTIN_PROVIDERS if provider.stream_usage
    )

    respond_with_cache: bool = True
    store_cache: bool = True
    override_model: str | None = None
    cache_backend: Literal["sqlite", "redis"] = "sqlite"
    cache_db: Path = Path("openai_proxy_cache.db")
    # A credential when it holds a password: SecretStr keeps it out of reprs and messages.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_cluster: bool = False
    redis_key_prefix: str = Field(default="openai-proxy", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    redis_timeout: float = Field(default=0.5, gt=0)
    cache_busy_timeout: float = Field(default=5.0, ge=0)
    cache_key_mode: KeyMode = KeyMode.MESSAGES
    cache_key_include: Annotated[tuple[str, ...], NoDecode] = ()
    upstream_timeout: float = Field(default=600.0, gt=0)
    upstream_total_timeout: float = Field(default=1800.0, ge=0)
    upstream_max_connections: int = Field(default=0, ge=0)
    max_request_bytes: Annotated[int, NoDecode] = Field(default=8 * 1024 * 1024, gt=0)
    max_cache_entry_bytes: Annotated[int, NoDecode] = Field(default=16 * 1024 * 1024, gt=0)

    cache_ttl: float = Field(default=0, ge=0)
    cache_max_bytes: Annotated[int, NoDecode] = Field(default=0, ge=0)
    cache_max_entries: int = Field(default=0, ge=0)
    memory_cache_bytes: Annotated[int, NoDecode] = Field(default=16 * 1024 * 1024, ge=0)
    # Answers waiting to be stored, at most (bodies and the rest of each entry): past it, skipped.
    store_backlog_bytes: Annotated[int, NoDecode] = Field(default=64 * 1024 * 1024, gt=0)
    cache_offline: bool = False
    cache_lock_timeout: float = Field(default=120.0, ge=0)
    cache_stale_if_error: bool = False
    proxy_api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    admin_api_key: SecretStr | None = None
    metrics: bool = True
    metrics_public: bool = False
    # Model names that are metric labels although the price table does not know them (local models).
    metrics_models: Annotated[tuple[str, ...], NoDecode] = ()
    # prometheus_client's own setting: `openai-proxy --workers N` sets it for its workers. Read from the
    # environment only (see `settings_customise_sources`).
    prometheus_multiproc_dir: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # prometheus_client decides from the real environment, when it is imported, whether to write
        # multiprocess files; a directory named only in .env would be read by no one.
        return init_settings, env_settings, _WithoutMultiprocessDirectory(dotenv_settings), file_secret_settings

    dashboard_show_prompts: bool = True
    # Prices for models the price table does not know: JSON, or the path of a JSON file (cache/prices.py).
    price_overrides: str | None = None

    @field_validator(
        "openai_base_url",
        "anthropic_base_url",
        "openrouter_base_url",
        "groq_base_url",
        "mistral_base_url",
        "cohere_base_url",
        "ai21_base_url",
        "azure_openai_endpoint",
        "gemini_base_url",
        "bedrock_base_url",
    )
    @classmethod
    def _base_urls_are_http(cls, value: str | None) -> str | None:
        return _check_base_url(value)

    @field_validator("price_overrides")
    @classmethod
    def _price_overrides_parse(cls, value: str | None) -> str | None:
        if value is not None:
            parse_price_overrides(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_form(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value().strip()
        scheme, _, rest = url.partition("://")
        if scheme not in ("redis", "rediss", "unix") or not rest:
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return SecretStr(url)

    @model_validator(mode="after")
    def _cluster_needs_a_host(self) -> Settings:
        if self.redis_cluster and self.redis_url.get_secret_value().startswith("unix://"):
            raise ValueError("REDIS_CLUSTER=true needs a redis:// or rediss:// REDIS_URL (a cluster node's address)")
        return self

    @field_validator("cache_key_include", "proxy_api_keys", "metrics_models", "stream_usage_providers", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _stream_usage_names_providers(self) -> Settings:
        if self.stream_usage_providers == ("none",):
            self.stream_usage_providers = ()
        known = {provider.name for provider in BUILTIN_PROVIDERS} | set(self.extra_providers)
        unknown = [name for name in self.stream_usage_providers if name not in known]
        if unknown:
            raise ValueError(f"STREAM_USAGE_PROVIDERS names no provider {unknown[0]!r} (or write none)")
        return self

    @field_validator(
        "cache_max_bytes",
        "memory_cache_bytes",
        "max_request_bytes",
        "max_cache_entry_bytes",
        "store_backlog_bytes",
        mode="before",
    )
    @classmethod
    def _byte_size(cls, value: Any) -> Any:
        return parse_byte_size(value) if isinstance(value, str) else value

    @field_validator("extra_providers")
    @classmethod
    def _extra_provider_names(cls, value: dict[str, ExtraProvider]) -> dict[str, ExtraProvider]:
        builtin = {provider.name for provider in BUILTIN_PROVIDERS}
        for name in value:
            if not PROVIDER_NAME.match(name):
                raise ValueError(f"provider name {name!r} must be lowercase letters, digits, '-' or '_'")
            if name in RESERVED_NAMES or name in builtin:
                raise ValueError(f"provider name {name!r} is taken (set {name.upper()}_BASE_URL to move it)")
        return value

    def providers(self) -> dict[str, Provider]:
        """Every route prefix the proxy serves, with base URLs and keys applied."""
        providers: dict[str, Provider] = {}
        for provider in BUILTIN_PROVIDERS:
            base_url: str | None = getattr(self, provider.base_url_setting)
            if base_url is None and provider.regional_base_url and self.aws_region:
                base_url = provider.regional_base_url.format(region=self.aws_region)
            key: SecretStr | None = getattr(self, provider.api_key_setting)
            providers[provider.name] = provider.configured(
                base_url=base_url,
                api_key=key.get_secret_value() if key else None,
                stream_usage=provider.name in self.stream_usage_providers,
            )
        for name, extra in self.extra_providers.items():
            providers[name] = Provider(name, extra.base_url, auth=extra.auth).configured(
                base_url=extra.base_url,
                api_key=extra.api_key.get_secret_value() if extra.api_key else None,
                stream_usage=name in self.stream_usage_providers,
            )
        return providers

    def key_config(self) -> KeyConfig:
        return KeyConfig(mode=self.cache_key_mode, include=self.cache_key_include)


class _WithoutMultiprocessDirectory(PydanticBaseSettingsSource):
    def __init__(self, source: PydanticBaseSettingsSource) -> None:
        super().__init__(source.settings_cls)
        self._source = source

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        values = self._source()
        values.pop("prometheus_multiproc_dir", None)
        return values


_BYTE_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?$")
_BYTE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_byte_size(text: str) -> int:
    """Bytes in `1048576`, `512KB`, `100MB`, `2GiB` (units are powers of 1024)."""
    match = _BYTE_SIZE.match(text.strip().lower())
    if not match:
        raise ValueError("must be a number of bytes, optionally with KB, MB, GB or TB")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])


def describe_invalid_settings(exc: ValidationError) -> str:
    """One line naming each invalid setting, never echoing its value (it may be a secret)."""
    problems = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error["loc"][:1]).upper() or "settings"
        detail = ".".join(str(part) for part in error["loc"][1:])
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{name}{f' ({detail})' if detail else ''}: {message}")
    return "invalid setting " + "; ".join(problems)
