"""The HTTP server under the app: uvicorn, with its own protocol errors answered in OpenAI's error shape."""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.errors import error_body


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, whose one answer of its own (a 400 for a request that is not valid
    HTTP/1.1, such as Content-Length beside Transfer-Encoding) is JSON like every other error."""

    def send_400_response(self, msg: str) -> None:
        body = orjson.dumps(error_body(400, "The request is not valid HTTP/1.1 and was not forwarded.", "invalid_http"))
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head.extend(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self.transport.close()
