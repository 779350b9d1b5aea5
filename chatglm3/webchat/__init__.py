"""The browser chat page served by `python -m chatglm3 serve` at `/` (`--no-web` turns it off).

A small page of our own (static HTML, one stylesheet, two ES modules; no third-party code, no
CDN), rather than Gradio: it adds no runtime dependency to the server or the Cog image, ships as
package data of a few KB, and talks to the server's own OpenAI API (/v1/chat/completions,
streamed), so the page exercises exactly what every other client uses.

What is here: the routes the API app mounts (`routes()`), the settings the page's controls take,
built from chatglm3/params.py so the page can never drift from the API's defaults and limits,
and the Content-Security-Policy every page response carries.
"""
from __future__ import annotations

from importlib import resources

from chatglm3 import params

# Every asset from our own origin; no inline script or style, no plugins, no framing by other sites.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

# The page's files (chatglm3/webchat/static/) and their types: only these are served, so no
# request path ever reaches the file system.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files: always revalidated, so a server upgrade never leaves an old page cached.
    "Cache-Control": "no-cache",
}


# The sampling settings the page has controls for (app.js builds one per name).
PAGE_CONTROLS = ("temperature", "top_p", "max_tokens")


def page_settings() -> dict[str, dict[str, float | int]]:
    """Default, minimum and maximum of each control: params.FIELDS, what the API validates."""
    return {name: {"default": f.default, "min": f.low, "max": f.high}
            for name in PAGE_CONTROLS for f in [params.BY_NAME[name]]}


def asset_bytes(name: str) -> bytes:
    """One of the page's files, read from the installed package."""
    return resources.files(__package__).joinpath("static", name).read_bytes()


def routes(model_name: str, auth_required: bool) -> list:
    """The page's routes, public (the API calls the page makes carry the key): `GET /`,
    `GET /webchat/settings.json` and `GET /webchat/<asset>`. The files are read once, here."""
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    files = {name: (asset_bytes(name), kind) for name, kind in ASSETS.items()}
    settings = {**page_settings(), "model": model_name, "auth": auth_required}

    async def index(request: Request) -> Response:
        body, kind = files["index.html"]
        return Response(body, media_type=kind, headers=HEADERS)

    async def page_settings_json(request: Request) -> Response:
        return JSONResponse(settings, headers=HEADERS)

    async def asset(request: Request) -> Response:
        found = files.get(request.path_params["name"])
        if found is None:
            raise HTTPException(404)
        return Response(found[0], media_type=found[1], headers=HEADERS)

    return [Route("/", index, methods=["GET", "HEAD"]),
            Route("/webchat/settings.json", page_settings_json, methods=["GET", "HEAD"]),
            Route("/webchat/{name}", asset, methods=["GET", "HEAD"])]
