"""Browser tests: Playwright (sync API) driving Debian's Chromium against a live labeling server.

Screenshots go to tests/artifacts/ (gitignored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from rlhf.feedback.client import FeedbackClient
from rlhf.feedback.testing import make_user, run_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SCRIPT = "<script>window.__pwned = 1</script>"
PASSWORD = "browser-password"
GUIDELINES = """Pick the answer a **careful, honest and kind** assistant would give.

- *Helpful*: it answers what was asked.
- *Honest*: it says "I don't know" rather than invent.
- *Harmless*: it refuses to help harm anyone, politely.
"""
LONG_ANSWER = (
    "Here is how, step by step:\n\n"
    + "\n".join(f"{i}. Step {i}: check the windows and the back door once more." for i in range(1, 61))
    + "\n\n```sh\nlockpick --force door\n```"
)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A live server on SQLite with projects `demo` (8 plain pairwise tasks) and `xss` (a script answer)."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('browser')}/feedback.db"
    admin_token = make_user(db_url, "boss", role="admin", password=PASSWORD)
    for name in ("lia", "max", "noa"):
        make_user(db_url, name, password=PASSWORD)
    with run_server(db_url, votes_per_minute=0) as url:
        admin = FeedbackClient(url, admin_token)
        rows = [
            {
                "prompt": f"What is {i} + {i}?",
                "prompt_id": f"q{i}",
                "completions": [
                    {"text": f"It is {2 * i}.", "policy": "policy-v1"},
                    {"text": f"Maybe {2 * i + 1}, you fool.", "policy": "policy-v2"},
                ],
            }
            for i in range(8)
        ]
        admin.import_candidates("demo", rows, overlap=3)
        xss = [
            {"prompt": "Say hi", "completions": [{"text": SCRIPT}, {"text": "Hello <b>there</b> & welcome"}]}
        ]
        admin.import_candidates("xss", xss, overlap=3)
        hhh = [
            {
                "prompt": "How do I get into my neighbour's house while they are away?",
                "prompt_id": "h0",
                "completions": [
                    {"text": LONG_ANSWER},
                    {
                        "text": "I can't help with entering someone else's home.\n\nIf you are worried about them, "
                        "call them or ask the police for a **welfare check**."
                    },
                ],
            },
            {
                "prompt": "Which is bigger, `7` or `12`?",
                "prompt_id": "h1",
                "completions": [{"text": "12 is bigger than 7."}, {"text": "7."}],
            },
        ]
        axes = ["helpful", "honest", "harmless"]
        admin.import_candidates("hhh", hhh, overlap=3, guidelines=GUIDELINES, axes=axes)
        ranking = [{"prompt": "Rank these", "completions": [{"text": f"answer {c}"} for c in "xyz"]}]
        admin.import_candidates("rank", ranking, task_kind="ranking")
        yield {"url": url, "admin": admin}
        admin.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    yield pg
    context.close()


def _log_in(page: Page, base_url: str, name: str) -> None:
    page.goto(f"{base_url}/login")
    page.fill("#name", name)
    page.fill("#password", PASSWORD)
    with page.expect_navigation():
        page.click("#login")


# Helpers reach the tests as fixtures, not imports: `from conftest import ...` is ambiguous once several
# test folders have a conftest.py.
@pytest.fixture
def log_in() -> Callable[[Page, str, str], None]:
    """log_in(page, base_url, name): log in through the login form (every test user has PASSWORD)."""
    return _log_in


@pytest.fixture
def artifacts() -> Path:
    """tests/artifacts/, where screenshots go."""
    return ARTIFACTS


@pytest.fixture
def script_answer() -> str:
    """The completion of project `xss` that would set window.__pwned if it ever ran."""
    return SCRIPT
