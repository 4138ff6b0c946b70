"""Rendering of the HTML pages: one Jinja2 environment with autoescape on, and the CSRF cookie."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse

from rlhf.feedback.security import CSRF_COOKIE, csrf_token, new_csrf_nonce

if TYPE_CHECKING:
    from starlette.templating import Jinja2Templates

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"


@cache
def templates() -> Jinja2Templates:
    """The page templates, loaded on the first page rendered: API-only traffic never imports Jinja2."""
    import jinja2
    from starlette.templating import Jinja2Templates

    # autoescape=True for every template, whatever its extension: completion text is untrusted model output.
    return Jinja2Templates(
        env=jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=jinja2.StrictUndefined
        )
    )


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, status_code: int = 200
) -> HTMLResponse:
    """Render a page with `csrf_token` in its context, setting this browser's CSRF cookie if it has none."""
    secret: str = request.app.state.secret
    settings = request.app.state.settings
    nonce = request.cookies.get(CSRF_COOKIE)
    fresh = not nonce
    if not nonce:
        nonce = new_csrf_nonce()
    ctx = {"csrf_token": csrf_token(secret, nonce), "user": None, "message": None, **(context or {})}
    response = templates().TemplateResponse(request, name, ctx, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    # Defence in depth behind autoescaping: no inline script, nothing from other origins, no framing.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if fresh:
        response.set_cookie(
            CSRF_COOKIE, nonce, httponly=True, samesite="lax", secure=settings.cookie_secure, path="/"
        )
    return response
