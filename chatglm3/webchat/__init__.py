"""The browser chat page served by `python -m chatglm3 serve` (issue 22; page and mount not written yet).

What is here: the settings the page's controls take, built from chatglm3/params.py so the page can
never drift from the API's defaults and limits (the server is meant to serve this as JSON), and the
Content-Security-Policy the page is to be served with.
"""
from __future__ import annotations

from chatglm3 import params

# Every asset from our own origin; no inline script or style, no plugins, no framing by other sites.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def page_settings() -> dict[str, dict[str, float | int]]:
    """Default, minimum and maximum of each sampling control, the same the API validates against."""
    return {
        "temperature": {"default": params.DEFAULT_TEMPERATURE, "min": 0,
                        "max": params.MAX_TEMPERATURE},
        "top_p": {"default": params.DEFAULT_TOP_P, "min": 0, "max": 1},
        "max_tokens": {"default": params.DEFAULT_MAX_TOKENS, "min": 1, "max": params.CONTEXT},
    }
