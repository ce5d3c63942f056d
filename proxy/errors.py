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

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers: dict[str, str] = {}


def error_body(status: int, message: str, code: str) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": _TYPES.get(status, "proxy_error"), "param": None, "code": code}}


def error_response(error: ProxyError) -> JSONResponse:
    body = error_body(error.status, error.message, error.code)
    return JSONResponse(body, status_code=error.status, headers=error.headers)
