"""Rendering of the HTML pages: one Jinja2 environment with autoescape on, and the CSRF cookie."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse

from rlhf.feedback.security import CSRF_COOKIE, csrf_token, new_csrf_nonce

if TYPE_CHECKING:
    import markupsafe
    from starlette.templating import Jinja2Templates

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"

# Unicode's directional embeddings, overrides and isolates: in untrusted text they reorder what a reader
# sees ("gnp.exe" shown as "exe.png"); on the pages each is shown as its code point instead.
_BIDI_CONTROLS = {c: f"[U+{c:04X}]" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def neutralise_bidi(value: Any) -> Any:
    """Every value a template prints, before escaping: bidi control characters made visible. (Markup,
    a str subclass, is left alone: it is this app's own HTML.)"""
    if type(value) is str:
        return value.translate(_BIDI_CONTROLS)
    return value


_markdown: Any = None


def markdown(text: str) -> markupsafe.Markup:
    """Untrusted Markdown (answers, prompts, guidelines) as safe HTML: markdown-it-py with raw HTML off, so
    any HTML in the text is shown as text, and its link check (no javascript:, vbscript:, file: or data:
    links); the pages' Content-Security-Policy keeps images and scripts to this origin. Newlines are kept
    as line breaks (model output is mostly plain text). Imported on first use: only task pages need it."""
    global _markdown
    import markupsafe

    if _markdown is None:
        from markdown_it import MarkdownIt

        _markdown = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(
            ["table", "strikethrough"]
        )
        _markdown.core.ruler.push("dir_auto", _dir_auto)
    return markupsafe.Markup(_markdown.render(text.translate(_BIDI_CONTROLS)))


def _dir_auto(state: Any) -> None:
    """Every top-level block (paragraph, list, heading, ...) gets dir="auto": it reads in the direction of its
    first letter, so an Arabic or Hebrew answer runs right to left with its punctuation at its end, beside
    English blocks that stay left to right. Nested blocks follow theirs (a list item given its own dir would
    hide its text from its list's, leaving the list's markers on the wrong side). Code blocks stay as they are."""
    for token in state.tokens:
        if token.nesting == 1 and token.level == 0:
            token.attrSet("dir", "auto")


@cache
def templates() -> Jinja2Templates:
    """The page templates, loaded on the first page rendered: API-only traffic never imports Jinja2."""
    import jinja2
    from starlette.templating import Jinja2Templates

    # autoescape=True for every template, whatever its extension: completion text is untrusted model output.
    pages = Jinja2Templates(
        env=jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            finalize=neutralise_bidi,
        )
    )
    pages.env.filters["markdown"] = markdown
    return pages


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """Render a page with `csrf_token` in its context, setting this browser's CSRF cookie if it has none."""
    secret: str = request.app.state.secret
    settings = request.app.state.settings
    nonce = request.cookies.get(CSRF_COOKIE)
    fresh = not nonce
    if not nonce:
        nonce = new_csrf_nonce()
    ctx = {"csrf_token": csrf_token(secret, nonce), "user": None, "message": None, **(context or {})}
    response = templates().TemplateResponse(request, name, ctx, status_code=status_code, headers=headers)
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
