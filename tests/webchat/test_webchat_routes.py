"""The chat page's routes, in-process (no model, no browser): what `GET /`, the assets and the
settings answer, with which headers; `--no-web` leaves them out; the page's files ship as package
data; and the page's scripts never turn text into markup."""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from pathlib import Path

import pytest

from chatglm3 import webchat
from chatglm3.api.app import ServerConfig, create_app

from conftest import ROOT

STATIC = ROOT / "chatglm3" / "webchat" / "static"


class NoEngine:
    """The app's engine, never called here: the page's routes need none of it."""
    tokenizer = None
    max_batch = 1


def get(app, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    """One request through the ASGI app (Starlette's test client needs httpx, not installed)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"host", b"127.0.0.1")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, body


@pytest.fixture(scope="module")
def app():
    return create_app(NoEngine(), ServerConfig(model_name="my-glm", api_key="k"))


def test_the_page_is_served_with_its_policy(app) -> None:
    status, headers, body = get(app, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"] == webchat.CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"
    assert body == (STATIC / "index.html").read_bytes()
    # Every script and stylesheet the page names is ours (a path on this server), none inline.
    html = body.decode()
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith("/webchat/") for r in refs), refs
    assert "<script>" not in html and "style=" not in html


@pytest.mark.parametrize("name, kind", sorted(webchat.ASSETS.items()))
def test_each_asset_with_its_type(app, name: str, kind: str) -> None:
    status, headers, body = get(app, f"/webchat/{name}")
    assert status == 200 and headers["content-type"] == kind
    assert headers["x-content-type-options"] == "nosniff"
    assert body == (STATIC / name).read_bytes()


def test_the_assets_are_the_static_folder() -> None:
    assert sorted(webchat.ASSETS) == sorted(p.name for p in STATIC.iterdir())


@pytest.mark.parametrize("path", ["/webchat/nothing.js", "/webchat/..%2f__init__.py",
                                  "/webchat/../__init__.py", "/webchat/static/app.js"])
def test_no_other_file_is_served(app, path: str) -> None:
    status, _, body = get(app, path)
    assert status == 404, body


def test_settings_are_the_apis_limits_with_model_and_auth(app) -> None:
    status, headers, body = get(app, "/webchat/settings.json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {**webchat.page_settings(), "model": "my-glm", "auth": True}
    open_app = create_app(NoEngine(), ServerConfig())
    assert json.loads(get(open_app, "/webchat/settings.json")[2])["auth"] is False


def test_the_page_needs_no_key_but_the_api_does(app) -> None:
    assert get(app, "/")[0] == 200
    assert get(app, "/v1/models")[0] == 401


def test_no_web_serves_no_page() -> None:
    app = create_app(NoEngine(), ServerConfig(web=False))
    for path in ("/", "/webchat/app.js", "/webchat/settings.json"):
        assert get(app, path)[0] == 404, path


def test_the_files_ship_as_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "chatglm3.webchat" in config["packages"]
    assert config["package-data"]["chatglm3.webchat"] == ["static/*"]
    for name in webchat.ASSETS:  # read the way the server reads them
        assert webchat.asset_bytes(name) == (STATIC / name).read_bytes()


@pytest.mark.parametrize("name", ["app.js", "markdown.js"])
def test_the_scripts_never_make_markup_from_text(name: str) -> None:
    """Model output is untrusted: no API that parses a string as HTML or code (the browser
    test shows hostile text staying text; this keeps any such call out of the code)."""
    source = (STATIC / name).read_text()
    code = re.sub(r"//[^\n]*", "", source)  # comments may name them
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "DOMParser", "createContextualFragment", "srcdoc",
                 "setAttribute(\"on", "setTimeout(\"", "import("):
        assert sink not in code, f"{name} uses {sink}"


def test_the_page_is_small() -> None:
    """Shipped in the Cog image: a few KB, no third-party code."""
    total = sum(p.stat().st_size for p in STATIC.iterdir())
    assert total < 40_000, total
