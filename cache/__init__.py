"""The cache: what is stored, under which key, and where."""

from cache.base import CacheBackend, CachedResponse, CacheError
from cache.health import CacheHealth, CacheState
from cache.keys import KeyConfig, KeyMode, cache_key, credential_scope, generation_endpoint
from cache.sqlite import SqliteBackend

__all__ = [
    "CacheBackend",
    "CacheError",
    "CacheHealth",
    "CacheState",
    "CachedResponse",
    "KeyConfig",
    "KeyMode",
    "SqliteBackend",
    "cache_key",
    "credential_scope",
    "generation_endpoint",
]
