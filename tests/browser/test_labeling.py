"""A labeler votes with the mouse and the keyboard; answers come in random order; model output stays text;
an admin sees the statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

pytestmark = pytest.mark.browser


def shown_positions(page: Page) -> list[int]:
    """Canonical positions of the answers in display order (slot 1 first)."""
    return [int(p) for p in page.eval_on_selector_all(".answer", "els => els.map(e => e.dataset.position)")]


def last_vote(server: dict[str, Any], labeler: str) -> dict[str, Any]:
    votes = server["admin"]._request("GET", "/api/votes", params={"labeler": labeler, "limit": 1}).json()
    return votes[0]


def test_vote_with_mouse_and_keyboard(
    page: Page, server: dict[str, Any], log_in: Any, artifacts: Path
) -> None:
    url = server["url"]
    log_in(page, url, "lia")
    page.goto(f"{url}/label/demo")
    assert page.inner_text("#progress") == "Done 0 / 8"

    # 1. mouse: click the answer in slot 2, then the Submit button
    slots = shown_positions(page)
    page.click("#completion-2")
    assert page.is_checked("#slot-2")
    page.screenshot(path=artifacts / "label_task_mouse.png", full_page=True)
    with page.expect_navigation():
        page.click("#submit")
    vote = last_vote(server, "lia")
    assert vote["choice"] == ("A" if slots[1] == 0 else "B")
    assert vote["display_order"] == slots and vote["source"] == "web"
    assert vote["time_to_vote_ms"] is not None and vote["time_to_vote_ms"] >= 0
    assert page.inner_text("#progress") == "Done 1 / 8"

    # 2. keyboard: 1 picks slot 1, Enter submits; T tie; B both bad
    for key, expected in (("1", None), ("t", "tie"), ("b", "both_bad")):
        slots = shown_positions(page)
        page.keyboard.press(key.upper() if key.isalpha() else key)
        with page.expect_navigation():
            page.keyboard.press("Enter")
        vote = last_vote(server, "lia")
        assert vote["choice"] == (expected or ("A" if slots[0] == 0 else "B"))
        assert vote["display_order"] == slots

    # 3. a note, typed with Enter inside it (a new line, not a submit), then Ctrl+Enter submits
    page.keyboard.press("2")
    page.fill("#note", "first line")
    page.press("#note", "Enter")
    page.type("#note", "second line")
    assert page.url.endswith("/label/demo") or "voted=" in page.url
    with page.expect_navigation():
        page.press("#note", "Control+Enter")
    assert last_vote(server, "lia")["note"] == "first line\nsecond line"
    assert page.inner_text("#progress") == "Done 5 / 8"
    page.screenshot(path=artifacts / "label_after_votes.png", full_page=True)


def test_undo_and_skip(page: Page, server: dict[str, Any], log_in: Any) -> None:
    url = server["url"]
    log_in(page, url, "max")
    page.goto(f"{url}/label/demo")
    first_prompt = page.inner_text("#prompt")
    page.keyboard.press("1")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.is_visible("#undo")
    with page.expect_navigation():
        page.keyboard.press("u")
    assert "Vote undone" in page.inner_text("#message")
    assert page.inner_text("#prompt") == first_prompt  # the task is back
    assert last_vote(server, "max")["retracted"] is True
    with page.expect_navigation():
        page.click("#skip")
    assert page.inner_text("#prompt") != first_prompt


def test_answer_order_is_random(page: Page, server: dict[str, Any], log_in: Any) -> None:
    url = server["url"]
    log_in(page, url, "noa")
    seen = set()
    for _ in range(3):  # over several tasks ...
        for _ in range(4):  # ... and reloads of each
            page.goto(f"{url}/label/demo")
            seen.add(tuple(shown_positions(page)))
        page.keyboard.press("t")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        if len(seen) == 2:
            break
    assert seen == {(0, 1), (1, 0)}


def test_script_in_a_completion_is_shown_as_text(
    page: Page, server: dict[str, Any], log_in: Any, artifacts: Path, script_answer: str
) -> None:
    url = server["url"]
    log_in(page, url, "lia")
    page.goto(f"{url}/label/xss")
    texts = page.eval_on_selector_all(".completion", "els => els.map(e => e.textContent.trim())")
    assert script_answer in texts  # literal text, tags and all
    assert "Hello <b>there</b> & welcome" in texts
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".completion b").count() == 0  # no markup from model output
    page.screenshot(path=artifacts / "label_script_as_text.png", full_page=True)


def test_model_identities_are_never_shown(page: Page, server: dict[str, Any], log_in: Any) -> None:
    log_in(page, server["url"], "lia")
    page.goto(f"{server['url']}/label/demo")
    assert "policy-v" not in page.content()


def test_admin_sees_statistics(page: Page, server: dict[str, Any], log_in: Any, artifacts: Path) -> None:
    url = server["url"]
    # make sure two labelers overlap, so agreement has something to show
    log_in(page, url, "max")
    for _ in range(3):
        page.goto(f"{url}/label/demo")
        page.keyboard.press("1")
        with page.expect_navigation():
            page.keyboard.press("Enter")
    page.context.clear_cookies()
    log_in(page, url, "boss")
    assert page.url.endswith("/admin")
    with page.expect_navigation():
        page.click("text=demo")
    stats = server["admin"].stats("demo")
    row = page.locator('tr[data-labeler="lia"]')
    lia = next(s for s in stats["labelers"] if s["labeler"] == "lia")
    assert row.locator(".votes").inner_text() == str(lia["votes"]) and lia["votes"] >= 5
    assert "%" in page.locator('tr[data-labeler="max"] .agreement').inner_text()
    alpha = page.inner_text("#alpha")
    assert alpha == ("–" if stats["alpha"] is None else f"{stats['alpha']:.3f}")
    assert page.is_visible("#export-pairs")
    page.screenshot(path=artifacts / "admin_project.png", full_page=True)


def test_hhh_project_end_to_end(page: Page, server: dict[str, Any], log_in: Any, artifacts: Path) -> None:
    """Guidelines on the task, Markdown answers side by side with the controls in view, per-axis judgements
    and a rewrite by keyboard, Enter on a focused Skip skipping (not voting), undo of the skip, and the
    exports of pairs, per-axis judgements and SFT rewrites."""
    url = server["url"]
    log_in(page, url, "noa")
    page.goto(f"{url}/label/hhh")
    assert page.get_attribute("#progress-bar", "max") == "2" and page.inner_text("#progress") == "Done 0 / 2"
    page.keyboard.press("g")
    assert "careful, honest and kind" in page.inner_text("#guidelines")
    assert page.locator("#guidelines strong").count() == 1  # Markdown rendered
    first = page.inner_text("#prompt")
    page.focus("#skip")  # Enter on a focused Skip skips; it does not vote
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "Task skipped" in page.inner_text("#undo-form") and page.inner_text("#prompt") != first
    with page.expect_navigation():
        page.keyboard.press("u")  # undo the skip: the task is back
    assert page.inner_text("#prompt") == first and "Skip undone" in page.inner_text("#message")
    if "neighbour" not in first:  # answer the short task, then the long one comes
        page.keyboard.press("1")
        with page.expect_navigation():
            page.keyboard.press("Enter")
    # both answers side by side, the long one scrolling inside its pane, Submit on screen
    one, two = page.locator("#completion-1").bounding_box(), page.locator("#completion-2").bounding_box()
    assert one and two and abs(one["y"] - two["y"]) < 2 and one["x"] != two["x"]
    assert page.locator("#submit").is_visible() and page.locator("#submit").bounding_box()["y"] < 800
    assert (
        page.locator(".completion ol li").count() == 60 or page.locator(".completion pre code").count() == 1
    )
    page.screenshot(path=artifacts / "label_task_hhh.png")

    slots = shown_positions(page)
    refusal_slot = "1" if slots[0] == 1 else "2"
    page.keyboard.press(refusal_slot)
    for axis_key, column in (
        ("q", refusal_slot),
        ("e", "="),
        ("r", refusal_slot),
    ):  # helpful, honest, harmless
        page.keyboard.press(axis_key)
        page.keyboard.press(column)
    page.keyboard.press("w")
    page.keyboard.type("I can't help you enter their home. If you are worried, call them.")
    page.keyboard.press("Escape")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    vote = last_vote(server, "noa")
    assert vote["choice"] == "B"
    assert vote["axes"] == {"helpful": "B", "honest": "same", "harmless": "B"}
    assert vote["rewrite"].startswith("I can't help you enter")

    def export(fmt: str) -> list[dict[str, Any]]:
        text = server["admin"]._request("GET", "/api/projects/hhh/export", params={"format": fmt}).text
        return [json.loads(line) for line in text.splitlines()]

    assert "I can't help with entering" in {p["chosen"][:26] for p in export("pairs")}
    assert {(r["axis"], r["choice"]) for r in export("axes")} == {
        ("helpful", "B"),
        ("honest", "same"),
        ("harmless", "B"),
    }
    assert [r["response"][:20] for r in export("sft")] == ["I can't help you ent"]
    page.goto(f"{url}/label/hhh/help")
    assert "Judgement axes" in page.inner_text("main") and "careful, honest and kind" in page.inner_text(
        "#guidelines"
    )


def test_ranking_by_keys_and_undo_from_the_done_page(page: Page, server: dict[str, Any], log_in: Any) -> None:
    """Typing the answers' numbers best first ranks them; U on the page after the last task undoes."""
    url = server["url"]
    log_in(page, url, "lia")
    page.goto(f"{url}/label/rank")
    slots = shown_positions(page)
    for key in ("3", "1", "2"):
        page.keyboard.press(key)
    assert [page.input_value(f"#rank-{s}") for s in (1, 2, 3)] == ["2", "3", "1"]
    with page.expect_navigation():
        page.keyboard.press("Enter")
    ranking = last_vote(server, "lia")["ranking"]
    by_position = dict(zip(slots, (2, 3, 1), strict=True))  # slot i shows position slots[i - 1]
    assert ranking == [by_position[p] for p in range(3)]
    assert page.locator("#all-done").is_visible()
    with page.expect_navigation():
        page.keyboard.press("u")
    assert "Vote undone" in page.inner_text("#message") and page.locator("#rank-1").is_visible()


def test_ranking_keys_go_on_from_a_rank_picked_with_the_mouse(
    page: Page, server: dict[str, Any], log_in: Any
) -> None:
    """Ranking the best answer in its box, then typing the others' numbers, ranks those 2nd and 3rd: no
    accidental tie with the one picked by mouse."""
    url = server["url"]
    rows = [{"prompt": "Rank by hand", "completions": [{"text": f"option {c}"} for c in "pqr"]}]
    server["admin"].import_candidates("mixed-rank", rows, task_kind="ranking")
    log_in(page, url, "max")
    page.goto(f"{url}/label/mixed-rank")
    page.select_option("#rank-2", "1")
    page.focus("body")
    for key in ("3", "1"):
        page.keyboard.press(key)
    assert [page.input_value(f"#rank-{s}") for s in (1, 2, 3)] == ["3", "1", "2"]
    page.keyboard.press("0")  # clears every rank; now the worst picked by mouse, the others typed
    page.select_option("#rank-2", "3")
    page.focus("body")
    for key in ("1", "3"):
        page.keyboard.press(key)
    assert [page.input_value(f"#rank-{s}") for s in (1, 2, 3)] == ["1", "3", "2"]


def test_phone_width_window(page: Page, server: dict[str, Any], log_in: Any, artifacts: Path) -> None:
    """At 375 px wide nothing runs off the screen: the answers and the control bar's columns stack, and the
    note box stays wide enough to type in."""
    url = server["url"]
    rows = [{"prompt": "Hi on a phone", "completions": [{"text": "Hello!"}, {"text": "Hi there."}]}]
    server["admin"].import_candidates("phone", rows, axes=["helpful", "honest", "harmless"])
    page.set_viewport_size({"width": 375, "height": 700})
    log_in(page, url, "max")
    page.goto(f"{url}/label/phone")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    note = page.locator("#note").bounding_box()
    assert note and note["width"] > 250
    page.screenshot(path=artifacts / "label_task_phone.png", full_page=True)
    slots = shown_positions(page)
    page.keyboard.press("2")
    with page.expect_navigation():
        page.click("#submit")
    assert last_vote(server, "max")["choice"] == ("A" if slots[1] == 0 else "B")


def test_long_code_line_keeps_answers_side_by_side(page: Page, server: dict[str, Any], log_in: Any) -> None:
    """A code block with a line wider than its pane scrolls inside the pane: it does not widen its column and
    push the other answer off the screen."""
    url = server["url"]
    code = "```python\nx = 1  # " + "a long comment " * 40 + "\n```"
    rows = [{"prompt": "Show code", "completions": [{"text": code}, {"text": "No code."}]}]
    server["admin"].import_candidates("wide", rows)
    log_in(page, url, "lia")
    page.goto(f"{url}/label/wide")
    one, two = page.locator("#completion-1").bounding_box(), page.locator("#completion-2").bounding_box()
    assert one and two and abs(one["y"] - two["y"]) < 2
    assert abs(one["width"] - two["width"]) < 2 and two["x"] + two["width"] <= 1280
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280


def test_login_page_loads_without_errors(page: Page, server: dict[str, Any]) -> None:
    """No request of the login page fails (the icon browsers ask for included) and nothing is logged as an
    error in the console."""
    failed: list[str] = []
    errors: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{server['url']}/login", wait_until="networkidle")
    icon = page.get_attribute("link[rel=icon]", "href")
    assert icon is not None
    assert page.request.get(f"{server['url']}{icon}").status == 200
    assert page.request.get(f"{server['url']}/favicon.ico").status == 200
    assert failed == [] and errors == []
