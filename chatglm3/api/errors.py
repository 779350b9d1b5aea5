"""The API's error answers: an HTTP status with OpenAI's error body, naming the field."""

from __future__ import annotations

import hmac
import json
from typing import Any

from ..text.messages import _json_type


class ApiError(Exception):
    """An error answer: HTTP status and OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (int, float, str)) else ""
    return f"{_json_type(value)} {text[:40]}".strip()


def check_api_key(header: str, key: str | None) -> None:
    """The Authorization header against the server's key (None: no key needed); compared in
    constant time. A 401 when missing or wrong."""
    if key is None:
        return
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "missing API key: send the header Authorization: Bearer KEY",
                       code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), key.encode("utf-8")):
        raise ApiError(401, "wrong API key", code="invalid_api_key")
