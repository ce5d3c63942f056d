from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum


class AuthStyle(Enum):
    """How a provider expects its API key."""

    BEARER = "bearer"  # Authorization: Bearer KEY
    X_API_KEY = "x-api-key"  # x-api-key: KEY (Anthropic)


@dataclass(frozen=True)
class Provider:
    """One upstream: the route prefix `/{name}/...` forwards to `{base_url}/...`.

    `base_url` is the root under which the client's own path (`v1/chat/completions`) is appended.
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

    def configured(
        self, *, base_url: str | None = None, api_key: str | None = None, stream_usage: bool | None = None
    ) -> Provider:
        return replace(
            self,
            base_url=normalize_base_url(base_url) if base_url else self.base_url,
            api_key=api_key or self.api_key,
            stream_usage=self.stream_usage if stream_usage is None else stream_usage,
        )

    def credential_headers(self) -> list[tuple[str, str]]:
        if self.api_key is None:
            return []
        if self.auth is AuthStyle.X_API_KEY:
            return [("x-api-key", self.api_key)]
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
)

PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def normalize_base_url(url: str) -> str:
    """The provider root for a configured base URL.

    Clients append `v1/...` themselves, so a trailing `/v1` written out of SDK habit
    (`http://localhost:11434/v1`) is dropped, as is a trailing slash.
    """
    url = url.strip().rstrip("/")
    return url.removesuffix("/v1")
