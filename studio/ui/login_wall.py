"""With --auth, nothing but the login page answers a visitor who has not logged in.

Gradio checks the login on its data routes (config, info, queue, upload, file, call, run), but
not on a dozen others (heartbeat, cancel, reset, stream, startup-events, app_id, token, user),
and gradio 6 embeds the description of every endpoint in the login page itself: names,
parameters and defaults, which here include absolute server paths, dataset and run names. This
ASGI middleware answers 401 on every route except the login page and the static files it needs,
and blanks that description in the login page. Without --auth it does nothing.
"""

from __future__ import annotations

import re

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from studio import _compat
# What the login page loads before anyone is logged in: gradio's own static files; and
# startup-events, which launch() itself calls without a login (it only starts the queue, once).
OPEN_PATHS = {"/", "/login", "/login/", "/favicon.ico", "/theme.css", "/gradio_api/theme.css", "/robots.txt",
              "/manifest.json", "/gradio_api/startup-events"}
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
# index.html: <script>window.gradio_api_info = {...};</script>; the JSON escapes "<", so the
# first ";</script>" ends it.
_API_INFO = re.compile(rb"(<script>window\.gradio_api_info = ).*?(;</script>)", re.S)


def _gradio_app(scope):
    return _compat.gradio_app(scope)


def logged_in(app, scope) -> bool:
    return _compat.gradio_logged_in(app, HTTPConnection(scope).cookies)


class LoginWall:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        gapp = _gradio_app(scope) if scope["type"] in ("http", "websocket") else None
        if gapp is None or (gapp.auth is None and gapp.auth_dependency is None) or logged_in(gapp, scope):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == "/" and scope.get("method") == "GET":
            return await self.app(scope, receive, _without_api_info(send))
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await JSONResponse({"detail": {"error": "Not authenticated"}}, status_code=401)(scope, receive, send)


def _without_api_info(send):
    """Buffer the login page (tens of kB) and blank window.gradio_api_info in it."""
    start, chunks = None, []

    async def wrapped(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = _API_INFO.sub(rb"\1{}\2", b"".join(chunks))
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped
