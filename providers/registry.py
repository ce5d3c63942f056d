from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum
from urllib.parse import parse_qs


class AuthStyle(Enum):
    """How a provider expects its API key."""

    BEARER = "bearer"  # Authorization: Bearer KEY
    X_API_KEY = "x-api-key"  # x-api-key: KEY (Anthropic)
    API_KEY = "api-key"  # api-key: KEY (Azure OpenAI)
    GOOG_API_KEY = "x-goog-api-key"  # x-goog-api-key: KEY (Gemini)
    # AWS Signature Version 4 with the proxy's AWS credentials (Bedrock); its `api_key`, a Bedrock API
    # key, is sent as Authorization: Bearer instead.
    SIGV4 = "sigv4"


@dataclass(frozen=True)
class Provider:
    """One upstream: the route prefix `/{name}/...` forwards to `{base_url}/...`.

    `base_url` is the root under which the client's own path (`v1/chat/completions`) is appended; ""
    when it has no public host and the proxy was not told one (`base_url_setting`).
    `api_key` is the proxy's own key for it; None means the client's credential is forwarded.
    """

    name: str
    base_url: str
    auth: AuthStyle = AuthStyle.BEARER
    api_key: str | None = field(default=None, repr=False)
    # Sent upstream only when the client did not send the header itself.
    default_headers: tuple[tuple[str, str], ...] = ()
    # Whether chat streams are forwarded with `stream_options.include_usage` (STREAM_USAGE_PROVIDERS), so
    # their recording can answer a non-streamed request too; some compatible servers reject the option.
    stream_usage: bool = False
    # The settings that configure it, when not `{NAME}_BASE_URL` and `{NAME}_API_KEY`.
    base_url_name: str = ""
    api_key_name: str = ""
    # What a configured base URL may end with out of SDK habit, dropped (clients send that part).
    base_url_suffixes: tuple[str, ...] = ("/v1",)
    # Where it is when the base URL setting is unset: a URL with `{region}`, for the AWS_REGION setting.
    regional_base_url: str = ""
    # A query parameter that carries a credential (Gemini's `key`): never stored or logged, replaced by
    # the proxy's key, or forwarded and scoping the entry like a credential header.
    query_credential: str | None = None
    # Entries name the model the answer names, not the request's (Azure: a deployment's name).
    model_from_answer: bool = False
    # Azure OpenAI: the first dated `api-version` whose deployment paths take `stream_options`.
    stream_usage_api_version: str | None = None

    @property
    def base_url_setting(self) -> str:
        return self.base_url_name or f"{self.name}_base_url"

    @property
    def api_key_setting(self) -> str:
        return self.api_key_name or f"{self.name}_api_key"

    def configured(
        self, *, base_url: str | None = None, api_key: str | None = None, stream_usage: bool | None = None
    ) -> Provider:
        return replace(
            self,
            base_url=normalize_base_url(base_url, self.base_url_suffixes) if base_url else self.base_url,
            api_key=api_key or self.api_key,
            stream_usage=self.stream_usage if stream_usage is None else stream_usage,
        )

    def asks_stream_usage(self, path: str, query: str) -> bool:
        """Whether a chat stream sent to `path?query` is forwarded asking for usage (`stream_usage`): on a
        dated API version of Azure's, only where that version takes the option (older ones answer 400)."""
        if not self.stream_usage:
            return False
        if self.stream_usage_api_version is None or not path.startswith("openai/deployments/"):
            return True
        versions = parse_qs(query).get("api-version") or [""]
        return versions[0][:10] >= self.stream_usage_api_version

    def credential_headers(self) -> list[tuple[str, str]]:
        if self.api_key is None:
            return []
        if self.auth is AuthStyle.X_API_KEY:
            return [("x-api-key", self.api_key)]
        if self.auth in (AuthStyle.API_KEY, AuthStyle.GOOG_API_KEY):
            return [(self.auth.value, self.api_key)]
        return [("authorization", f"Bearer {self.api_key}")]


BUILTIN_PROVIDERS: tuple[Provider, ...] = (
    Provider("openai", "https://api.openai.com", stream_usage=True),
    Provider("openrouter", "https://openrouter.ai/api", stream_usage=True),
    Provider(
        "anthropic",
        "https://api.anthropic.com",
        auth=AuthStyle.X_API_KEY,
        default_headers=(("anthropic-version", "2023-06-01"),),
    ),
    Provider("groq", "https://api.groq.com/openai", stream_usage=True),
    Provider("mistral", "https://api.mistral.ai"),
    Provider("cohere", "https://api.cohere.com"),
    Provider("ai21", "https://api.ai21.com/studio"),
    Provider(
        "gemini",
        "https://generativelanguage.googleapis.com",
        auth=AuthStyle.GOOG_API_KEY,
        base_url_suffixes=("/v1beta", "/v1"),
        query_credential="key",
    ),
    Provider(
        "bedrock",
        "",
        auth=AuthStyle.SIGV4,
        api_key_name="aws_bearer_token_bedrock",
        regional_base_url="https://bedrock-runtime.{region}.amazonaws.com",
    ),
    # Each Azure resource has a host of its own (https://NAME.openai.azure.com): there is no default.
    Provider(
        "azure",
        "",
        auth=AuthStyle.API_KEY,
        stream_usage=True,
        base_url_name="azure_openai_endpoint",
        api_key_name="azure_openai_api_key",
        base_url_suffixes=("/openai/v1", "/openai"),
        stream_usage_api_version="2024-08-01",
        model_from_answer=True,
    ),
)

PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def normalize_base_url(url: str, suffixes: tuple[str, ...] = ("/v1",)) -> str:
    """The provider root for a configured base URL.

    Clients append `v1/...` themselves, so a trailing `/v1` written out of SDK habit
    (`http://localhost:11434/v1`) is dropped, as is a trailing slash; `suffixes` are the ones to drop.
    """
    url = url.strip().rstrip("/")
    for suffix in suffixes:
        if url.endswith(suffix):
            return url.removesuffix(suffix)
    return url
