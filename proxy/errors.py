"""Errors the proxy itself answers with, in OpenAI's error shape."""

from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    502: "upstream_error",
    503: "cache_unavailable",
    504: "upstream_timeout",
}


class ProxyError(Exception):
    """A request the proxy answers itself, with `status` and a message safe to show the client."""

    def __init__(self, status: int, message: str, code: str, error_type: str | None = None) -> None:
        """`error_type`: the body's `type` when the status's usual one does not fit."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.error_type = error_type
        self.headers: dict[str, str] = {}


def error_body(status: int, message: str, code: str, error_type: str | None = None) -> dict[str, dict[str, str | None]]:
    kind = error_type or _TYPES.get(status, "proxy_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(error: ProxyError) -> JSONResponse:
    body = error_body(error.status, error.message, error.code, error.error_type)
    return JSONResponse(body, status_code=error.status, headers=error.headers)
