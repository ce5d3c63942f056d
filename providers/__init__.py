"""Upstream providers: where each route prefix forwards to and how it authenticates."""

from providers.registry import (
    BUILTIN_PROVIDERS,
    PROVIDER_NAME,
    RESERVED_NAMES,
    AuthStyle,
    Provider,
    normalize_base_url,
)

__all__ = [
    "BUILTIN_PROVIDERS",
    "PROVIDER_NAME",
    "RESERVED_NAMES",
    "AuthStyle",
    "Provider",
    "normalize_base_url",
]
