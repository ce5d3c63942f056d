"""Pure header rules for both directions of the proxy."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Scope

from cache.keys import CREDENTIAL_HEADERS
from providers import Provider

Headers = list[tuple[str, str]]

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed for the body actually sent: httpx frames the request and negotiates its own
# compression upstream; the body we relay back is always decoded.
_REQUEST_RECOMPUTED = frozenset({"host", "content-length", "accept-encoding"})
_RESPONSE_RECOMPUTED = frozenset({"content-length", "content-encoding", "date", "server"})


def scope_headers(scope: Scope) -> Headers:
    """The client's headers as sent, repeats kept."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]]


def connection_listed(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names a `Connection` header declares hop-by-hop."""
    names: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(names)


def upstream_request_headers(
    client_headers: Headers, provider: Provider, *, strip_client_credentials: bool = False
) -> Headers:
    """The headers to send upstream: the client's, cleaned, with the proxy's credential if it has one.

    The proxy's credential is added after every removal, so nothing the client lists in
    `Connection` can strip or replace it, and upstream receives exactly one credential.
    `strip_client_credentials` drops the client's even when the proxy has no key of its own
    (the client's is then a proxy access key, which must not travel upstream).
    """
    dropped = HOP_BY_HOP | _REQUEST_RECOMPUTED | connection_listed(client_headers)
    if provider.api_key is not None or strip_client_credentials:
        dropped |= frozenset(CREDENTIAL_HEADERS)
    headers = [(name, value) for name, value in client_headers if name.lower() not in dropped]
    headers.extend(provider.credential_headers())
    present = {name.lower() for name, _ in headers}
    headers.extend((name, value) for name, value in provider.default_headers if name not in present)
    return headers


def client_response_headers(upstream_headers: Headers) -> Headers:
    """The upstream response headers to relay to the client."""
    dropped = HOP_BY_HOP | _RESPONSE_RECOMPUTED | connection_listed(upstream_headers)
    return [(name, value) for name, value in upstream_headers if name.lower() not in dropped]


# What a client's own AWS Signature Version 4 consists of: bound to the host it was made for, useless
# anywhere else, and new on every request (so no part of a cache key either).
_AWS_SIGNATURE = frozenset({"x-amz-date", "x-amz-security-token", "x-amz-content-sha256"})


def without_aws_signature(headers: Headers) -> Headers:
    """The client's headers without its SigV4 signature (its `Authorization: AWS4-...` and `X-Amz-*`)."""
    return [
        (name, value)
        for name, value in headers
        if name.lower() not in _AWS_SIGNATURE and not (name.lower() == "authorization" and value.startswith("AWS4-"))
    ]
