"""The dashboard's static files, read once and served with headers that keep the page to itself."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response

FOLDER = Path(__file__).parent
# path under /dashboard -> file, media type
FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
# Only its own script, style and API; no inline code, no other origin, not framed by another page.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


class DashboardPage:
    def __init__(self, folder: Path = FOLDER) -> None:
        self.files = {name: ((folder / file).read_bytes(), media_type) for name, (file, media_type) in FILES.items()}

    def response(self, name: str) -> Response | None:
        """The file at /dashboard/`name`, or None when there is none."""
        found = self.files.get(name.strip("/"))
        if found is None:
            return None
        body, media_type = found
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)
