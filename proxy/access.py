"""Who may use the proxy and its admin API."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from starlette.requests import Request

from proxy.errors import ProxyError
from proxy.headers import Headers, scope_headers

_KEY_HEADERS = frozenset({"x-api-key", "api-key", "x-goog-api-key"})


def presented_keys(headers: Headers) -> list[str]:
    """The keys a client presents: `Authorization: Bearer KEY`, or KEY in a provider's own key header
    (`x-api-key`, Azure's `api-key`, Gemini's `x-goog-api-key`), so each official SDK can present one."""
    keys = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == "authorization" and value[:7].lower() == "bearer ":
            keys.append(value[7:].strip())
        elif lowered in _KEY_HEADERS:
            keys.append(value.strip())
    return keys


def presents_key(headers: Headers, accepted: Sequence[str]) -> bool:
    """Whether any presented key is one of `accepted`, compared in constant time."""
    found = False
    for presented in presented_keys(headers):
        for key in accepted:
            # Every pair is compared, so the time taken says nothing about which part matched.
            found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_key_required() -> ProxyError:
    """The answer to a request without one of PROXY_API_KEYS, when they are set."""
    return ProxyError(401, "A valid proxy API key is required (Authorization: Bearer or x-api-key).", "invalid_api_key")


class AdminAccess:
    """Who may use the admin API, /metrics and the dashboard."""

    def __init__(self, admin_key: str | None, proxy_keys: Sequence[str]) -> None:
        self.admin_key = admin_key
        self.proxy_keys = proxy_keys

    def authorize(self, request: Request) -> None:
        """ADMIN_API_KEY when set; otherwise only loopback clients (and their proxy key, if one is required)."""
        headers = scope_headers(request.scope)
        if self.admin_key is not None:
            if not presents_key(headers, [self.admin_key]):
                raise ProxyError(
                    401, "The admin API needs ADMIN_API_KEY (Authorization: Bearer or x-api-key).", "invalid_api_key"
                )
            return
        # The socket's peer address, never a header: a crafted Host or X-Forwarded-For changes nothing.
        if not is_loopback(request.client.host if request.client else None):
            raise ProxyError(
                403, "The admin API answers only loopback clients unless ADMIN_API_KEY is set.", "forbidden"
            )
        if self.proxy_keys and not presents_key(headers, self.proxy_keys):
            raise proxy_key_required()

    def authorize_page(self, request: Request) -> None:
        """The dashboard's static files hold no figures: with ADMIN_API_KEY set anyone may load them (the
        page then asks for the key); otherwise, like the admin API, only loopback clients."""
        if self.admin_key is None and not is_loopback(request.client.host if request.client else None):
            raise ProxyError(
                403, "The dashboard answers only loopback clients unless ADMIN_API_KEY is set.", "forbidden"
            )
