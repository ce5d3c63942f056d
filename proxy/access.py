"""Who may use the proxy and its admin API."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from proxy.headers import Headers


def presented_keys(headers: Headers) -> list[str]:
    """The keys a client presents: `Authorization: Bearer KEY` and `x-api-key: KEY`."""
    keys = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == "authorization" and value[:7].lower() == "bearer ":
            keys.append(value[7:].strip())
        elif lowered == "x-api-key":
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
