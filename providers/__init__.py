"""Upstream providers: where each route prefix forwards to and how it authenticates."""

from providers.registry import (
    BUILTIN_PROVIDERS,
    PROVIDER_NAME,
    AuthStyle,
    Provider,
    normalize_base_url,
)

__all__ = [
    "BUILTIN_PROVIDERS",
    "PROVIDER_NAME",
    "AuthStyle",
    "Provider",
    "normalize_base_url",
]
