"""The HTML pages through the app (the browser tests drive the same pages in Chromium)."""

from __future__ import annotations

import json
import re

from rlhf.feedback import users
from rlhf.feedback.db import Database
from rlhf.feedback.schemas import MAX_GUIDELINES_CHARS, MAX_NOTE_CHARS, MAX_TEXT_CHARS

SCRIPT = "<script>window.__pwned = 1</script>"


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def vote_form(page: str, choice: str) -> dict[str, str]:
    """The pairwise form on a task page, filled in with `choice`."""
    field = lambda name, pattern: re.search(rf'name="{name}" value="({pattern})"', page).group(1)  # noqa: E731
    return {"csrf_token": csrf_of(page), "task_id": field("task_id", r"\d+"), "choice": choice,
            "display_order": field("display_order", r"[\d,]+"), "idempotency_key": field("idempotency_key", '[^"]+')}  # fmt: skip


def log_in(client, db: Database, name: str, role: str = "labeler") -> None:
    with db.session() as s:
        users.create_user(s, name, role, f"{name}-password")
    page = client.get("/login")
    r = client.post(
        "/login", data={"name": name, "password": f"{name}-password", "csrf_token": csrf_of(page.text)}
    )
    assert r.status_code == 200, r.text


def import_script_project(api) -> None:
    rows = [
        {
            "prompt": "Say hi",
            "completions": [{"text": SCRIPT, "policy": "secret-policy-v7"}, {"text": "Hi & bye"}],
        }
    ]
    assert api.post("admin", "/api/projects/demo/import", json={"candidates": rows}).status_code == 201


def test_task_page_escapes_completions_and_hides_policies(api, db: Database, make_client) -> None:
    import_script_project(api)
    browser = make_client()
    assert browser.get("/label/demo", follow_redirects=False).headers["location"] == "/login?next=/label/demo"
    log_in(browser, db, "lia")
    page = browser.get("/label/demo")
    assert page.status_code == 200
    assert SCRIPT not in page.text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page.text
    assert "Hi &amp; bye" in page.text
    assert "secret-policy-v7" not in page.text and "policy" not in page.text.lower()
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_bidi_controls_in_answers_are_shown_not_obeyed(api, db: Database, make_client) -> None:
    rows = [
        {"prompt": "Name a file", "completions": [{"text": "photo\u202egnp.exe"}, {"text": "a\u2067b\u2069"}]}
    ]
    assert api.post("admin", "/api/projects/demo/import", json={"candidates": rows}).status_code == 201
    browser = make_client()
    log_in(browser, db, "lia")
    page = browser.get("/label/demo").text
    assert not any(c in page for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    assert "photo[U+202E]gnp.exe" in page and "a[U+2067]b[U+2069]" in page


def test_right_to_left_answers_read_right_to_left(api, db: Database, make_client) -> None:
    """Each Markdown block takes the direction of its own text: a Hebrew answer's paragraph and list read right
    to left (punctuation at their end), while English beside them stays left to right."""
    hebrew = "הבירה היא טוקיו.\n\n- פריט ראשון!\n- פריט שני"
    rows = [{"prompt": "שאלה?", "completions": [{"text": hebrew}, {"text": "It is Tokyo."}]}]
    assert api.post("admin", "/api/projects/demo/import", json={"candidates": rows}).status_code == 201
    browser = make_client()
    log_in(browser, db, "lia")
    page = browser.get("/label/demo").text
    for block in (
        "<p>שאלה?</p>",
        "<p>הבירה היא טוקיו.</p>",
        "<ul>",
        "<p>It is Tokyo.</p>",
    ):
        assert block.replace(">", ' dir="auto">', 1) in page
    assert "<li>פריט ראשון!</li>" in page  # an item follows its list


def test_vote_skip_and_undo_through_forms(api, db: Database, make_client) -> None:
    api.seed(n_prompts=3)
    browser = make_client()
    log_in(browser, db, "lia")
    page = browser.get("/label/demo").text
    form = {**vote_form(page, "B"), "time_ms": "1234", "note": "close call"}
    task_id, order = form["task_id"], form["display_order"]
    assert (
        browser.post("/label/demo/vote", data={**form, "csrf_token": ""}, follow_redirects=False).status_code
        == 403
    )
    r = browser.post("/label/demo/vote", data=form, follow_redirects=False)
    assert r.status_code == 303 and "voted=" in r.headers["location"]
    again = browser.post("/label/demo/vote", data=form, follow_redirects=False)  # double submit: same key
    assert again.headers["location"] == r.headers["location"]
    votes = api.get("admin", "/api/votes").json()
    assert len(votes) == 1
    v = votes[0]
    assert (v["choice"], v["note"], v["time_to_vote_ms"], v["source"]) == ("B", "close call", 1234, "web")
    assert v["display_order"] == [int(p) for p in order.split(",")]
    after = browser.get(r.headers["location"]).text
    assert "Done 1 / 3" in after and 'id="undo"' in after
    vote_id = re.search(r'name="vote_id" value="(\d+)"', after).group(1)
    undone = browser.post(
        "/label/demo/undo", data={"csrf_token": csrf_of(after), "vote_id": vote_id}, follow_redirects=False
    )
    assert undone.headers["location"].endswith("msg=undone")
    reopened = browser.get(undone.headers["location"]).text
    assert f'name="task_id" value="{task_id}"' in reopened and "Vote undone" in reopened
    skipped = browser.post(
        "/label/demo/skip", data={"csrf_token": csrf_of(reopened), "task_id": task_id}, follow_redirects=False
    )
    assert skipped.status_code == 303
    assert f'name="task_id" value="{task_id}"' not in browser.get("/label/demo").text


def test_an_ended_session_says_the_answer_was_lost_and_returns_to_the_task(
    api, db: Database, make_client
) -> None:
    api.seed(n_prompts=2)
    browser = make_client()
    log_in(browser, db, "lia")
    page = browser.get("/label/demo").text
    form = {
        "csrf_token": csrf_of(page),
        "task_id": re.search(r'name="task_id" value="(\d+)"', page).group(1),
        "choice": "A",
        "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', page).group(1),
    }
    with db.session() as s:
        users.end_sessions(s, users.get_user(s, "lia").id)  # ended elsewhere (log out on another device)
        s.commit()
    lost = browser.post("/label/demo/vote", data=form, follow_redirects=False)
    assert lost.status_code == 303 and lost.headers["location"] == "/login?next=/label/demo&lost=1"
    assert api.get("admin", "/api/votes").json() == []
    login = browser.get(lost.headers["location"]).text
    assert "what you last sent was not saved" in login and 'name="next" value="/label/demo"' in login
    back = browser.post("/login", data={"name": "lia", "password": "lia-password", "csrf_token": csrf_of(login),
                                        "next": "/label/demo"}, follow_redirects=False)  # fmt: skip
    assert back.status_code == 303 and back.headers["location"] == "/label/demo"
    # the browser keeps the cookie past the session's end (it dropped it at that end, and with it the only sign
    # that a form sent after it came from an ended session: the answer was lost unsaid)
    max_age = int(re.search(r"Max-Age=(\d+)", back.headers["set-cookie"], re.IGNORECASE).group(1))
    assert max_age > browser.app.state.settings.session_max_age_s
    assert browser.get("/label/demo").status_code == 200
    # never another site, whatever `next` says
    for elsewhere in ("//evil.example/label", "https://evil.example", "/label/../x", "/labelx"):
        assert elsewhere not in browser.get("/login", params={"next": elsewhere}).text
        r = browser.post("/login", data={"name": "lia", "password": "lia-password",
                                         "csrf_token": csrf_of(login), "next": elsewhere}, follow_redirects=False)  # fmt: skip
        assert r.headers["location"] == "/label"
    fresh = make_client()  # never logged in: a plain login
    assert fresh.get("/label/demo", follow_redirects=False).headers["location"] == "/login?next=/label/demo"


def test_admin_pages(api, db: Database, make_client) -> None:
    api.seed(n_prompts=2, overlap=2)
    for name in ("ann", "bob"):
        assert api.vote(name, 1, choice="A", time_to_vote_ms=2000).status_code == 201
    labeler = make_client()
    log_in(labeler, db, "lia")
    assert labeler.get("/admin").status_code == 403
    admin = make_client()
    log_in(admin, db, "boss", role="admin")
    index = admin.get("/admin").text
    assert 'href="/admin/projects/demo"' in index
    page = admin.get("/admin/projects/demo").text
    assert 'data-labeler="ann"' in page and "100.0%" in page and "2.0 s" in page
    assert 'href="/api/projects/demo/export?format=pairs"' in page
    assert (
        admin.get("/api/projects/demo/export?format=votes").status_code == 200
    )  # export links work by cookie
    r = admin.post(
        "/admin/projects/demo/settings",
        data={"csrf_token": csrf_of(page), "overlap": "3", "gold_rate": "0.25"},
    )
    assert r.status_code == 200
    assert api.get("admin", "/api/projects/demo").json()["overlap"] == 3
    settings = {"overlap": "3", "gold_rate": "0.25", "axes": "helpful, honest", "guidelines": "Be **fair**"}
    assert (
        admin.post(
            "/admin/projects/demo/settings", data={"csrf_token": csrf_of(page), **settings}
        ).status_code
        == 200
    )
    assert api.get("admin", "/api/projects/demo").json()["axes"] == ["helpful", "honest"]
    for axes, said in (
        ("a,b,c,d,e,f,g,h,i,j", "10 axes: at most 8"),
        ("x" * 100, "a name of a-z and _ that starts with a letter"),
    ):
        # refused on a page, as the API refuses them (the form kept the first 8, or wiped every axis)
        refused = admin.post("/admin/projects/demo/settings", data={"csrf_token": csrf_of(page), **settings,
                                                                     "axes": axes})  # fmt: skip
        assert refused.status_code == 422 and said in refused.text and "<html" in refused.text.lower()
    assert api.get("admin", "/api/projects/demo").json()["axes"] == ["helpful", "honest"]
    task = api.next("cat")
    assert api.vote("cat", task["id"], choice="B", axes={"helpful": "B", "honest": "A"}).status_code == 201
    page = admin.get("/admin/projects/demo").text
    assert 'id="votes-chart"' in page and "3 votes" in page  # one bar: today's three votes
    assert (
        'data-axis="helpful"' in page and "100.0%" in page.split('data-axis="helpful"')[1].split("</tr>")[0]
    )
    assert "0.0%" in page.split('data-axis="honest"')[1].split("</tr>")[0]
    assert 'data-policy="policy-v0"' in page and 'data-policy="policy-v1"' in page  # the leaderboard
    assert "Be **fair**" in page  # the guidelines in the settings form
    r = admin.post(
        "/admin/users/ann/disabled",
        data={"csrf_token": csrf_of(page), "disabled": "true", "back": "/admin/projects/demo"},
        follow_redirects=False,
    )
    assert r.headers["location"] == "/admin/projects/demo"
    # this server process forgets ann's cached token at once; another process within auth_cache_s,
    # but its vote path re-reads the disabled flag in the vote's transaction
    assert admin.post("/api/tasks/next", headers=api.team["ann"]).status_code == 403
    assert api.vote("ann", 2).status_code == 403


def test_ranking_and_rating_forms(api, db: Database, make_client) -> None:
    api.seed(n_prompts=1, k=3, task_kind="ranking")
    api.seed(name="rate", n_prompts=1, k=1, task_kind="rating")
    browser = make_client()
    log_in(browser, db, "lia")
    page = browser.get("/label/demo").text
    positions = [int(p) for p in re.findall(r'class="answer" data-position="(\d)"', page)]
    assert sorted(positions) == [0, 1, 2] and 'name="rank_0"' in page
    form = {
        "csrf_token": csrf_of(page),
        "task_id": re.search(r'name="task_id" value="(\d+)"', page).group(1),
        "display_order": ",".join(map(str, positions)),
        "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', page).group(1),
    }
    bad = browser.post("/label/demo/vote", data={**form, "display_order": "x,y", "rank_0": "1"})
    assert bad.status_code == 422
    # ranks of positions the task does not have are refused, not shifted onto the answers it has
    for made_up in (
        {"rank_0": "2", "rank_5": "3", "rank_9": "1"},
        {"rank_-1": "2", "rank_1": "3", "rank_2": "1"},
    ):
        assert browser.post("/label/demo/vote", data={**form, **made_up}).status_code == 422
    assert api.get("admin", "/api/votes").json() == []
    r = browser.post(
        "/label/demo/vote", data={**form, "rank_0": "2", "rank_1": "3", "rank_2": "1"}, follow_redirects=False
    )
    assert r.status_code == 303
    page = browser.get("/label/rate").text
    assert 'id="rating-7"' in page
    rating_form = {
        "csrf_token": csrf_of(page),
        "task_id": re.search(r'name="task_id" value="(\d+)"', page).group(1),
        "idempotency_key": re.search(r'name="idempotency_key" value="([^"]+)"', page).group(1),
        "rating": "6",
    }
    # the form of one project does not take another project's task
    assert browser.post("/label/demo/vote", data=rating_form, follow_redirects=False).status_code == 404
    for off_scale in ("0", "8", "9", "5.5", "x"):  # the form's scale is 1..7, as its buttons
        r = browser.post(
            "/label/rate/vote", data={**rating_form, "rating": off_scale}, follow_redirects=False
        )
        assert r.status_code == 422, off_scale
    assert browser.post("/label/rate/vote", data=rating_form, follow_redirects=False).status_code == 303
    votes = {v["task_id"]: v for v in api.get("admin", "/api/votes").json()}
    assert [v["ranking"] for v in votes.values() if v["ranking"]] == [[2, 3, 1]]
    assert [v["rating"] for v in votes.values() if v["rating"] is not None] == [6.0]


def test_skip_can_be_undone_and_errors_are_pages(api, db: Database, make_client) -> None:
    api.seed(n_prompts=2)
    browser = make_client()
    log_in(browser, db, "lia")
    page = browser.get("/label/demo").text
    task_id = re.search(r'name="task_id" value="(\d+)"', page).group(1)
    skipped = browser.post("/label/demo/skip", data={"csrf_token": csrf_of(page), "task_id": task_id})
    assert "Undo skip" in skipped.text and f'name="task_id" value="{task_id}"' in skipped.text
    back = browser.post("/label/demo/unskip", data={"csrf_token": csrf_of(skipped.text), "task_id": task_id})
    assert "Skip undone" in back.text
    assert re.search(r'name="task_id" value="(\d+)"', back.text).group(1) == task_id  # the task is back
    missing = browser.get("/label/no-such-project")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "no project named" in missing.text and "Back to your projects" in missing.text
    forbidden = browser.get("/admin")
    assert forbidden.status_code == 403 and "Not allowed" in forbidden.text
    assert browser.get("/api/projects/none", headers=api.team["admin"]).json()["detail"]  # the API stays JSON


def test_task_page_hint_names_only_the_projects_axis_keys(api, db: Database, make_client) -> None:
    api.seed(n_prompts=1, axes=["helpful", "honest"])
    browser = make_client()
    log_in(browser, db, "lia")
    page = browser.get("/label/demo").text
    assert "<kbd>q</kbd>" in page and "<kbd>e</kbd>" in page and "<kbd>r</kbd>" not in page
    hint = re.search(r'<p class="hint">Keys: (.*?)</p>', page).group(1)
    assert "q / e then 1, = or 2 judge an axis" in hint  # not the keys of axes the project lacks


def test_a_projects_page_offers_and_takes_only_its_own_vote_and_skip(api, db: Database, make_client) -> None:
    """A link or form naming another project's vote or task neither shows an undo button here nor acts."""
    api.seed(n_prompts=2)
    api.seed(name="other", n_prompts=2)
    browser = make_client()
    log_in(browser, db, "lia")
    form = vote_form(browser.get("/label/other").text, "A")
    task_id = form["task_id"]
    voted = browser.post("/label/other/vote", data=form, follow_redirects=False).headers["location"]
    vote_id = voted.rsplit("voted=", 1)[1]
    assert 'id="undo"' in browser.get(voted).text  # on its own project's page
    here = browser.get(f"/label/demo?voted={vote_id}&skipped={task_id}").text
    assert 'id="undo"' not in here and "Undo skip" not in here
    other_task = re.search(r'name="task_id" value="(\d+)"', browser.get("/label/other").text).group(1)
    for action in ("skip", "unskip"):
        r = browser.post(f"/label/demo/{action}", data={"csrf_token": csrf_of(here), "task_id": other_task})
        assert r.status_code == 404, action
    assert re.search(r'name="task_id" value="(\d+)"', browser.get("/label/other").text).group(1) == other_task


def send_json(api, as_: str, method: str, path: str, body: dict) -> object:
    """`body` as Python's json.dumps writes it (ensure_ascii: every non-ASCII character escaped, an emoji as
    a surrogate pair of 12 bytes), the largest a client's JSON of these characters gets."""
    headers = {**api.team[as_], "Content-Type": "application/json"}
    return api.client.request(method, path, content=json.dumps(body), headers=headers)


def test_the_longest_better_answer_and_note_the_page_takes_are_recorded(
    api, db: Database, make_client
) -> None:
    """The task page's text boxes take MAX_TEXT_CHARS and MAX_NOTE_CHARS characters (UTF-16 units, as
    maxlength counts them); at the default body limit, the form with both full of 3-byte characters (9 bytes
    each, percent-encoded) is a vote, not a 413 page that loses them; the API takes the same texts as JSON."""
    api.seed(n_prompts=2)
    browser = make_client()
    log_in(browser, db, "lia")
    page = browser.get("/label/demo").text
    assert f'maxlength="{MAX_TEXT_CHARS}"' in page and f'maxlength="{MAX_NOTE_CHARS}"' in page
    rewrite, note = "你" * (MAX_TEXT_CHARS - 1) + "\n", "好" * MAX_NOTE_CHARS  # browsers send CRLF line ends
    form = {**vote_form(page, "A"), "rewrite": rewrite.replace("\n", "\r\n"), "note": note}
    r = browser.post("/label/demo/vote", data=form, follow_redirects=False)
    assert r.status_code == 303 and "voted=" in r.headers["location"]
    (stored,) = browser.get("/api/votes").json()  # by the session cookie
    assert stored["rewrite"] == rewrite.strip() and stored["note"] == note
    body = {"task_id": api.next("ann")["id"], "choice": "B", "idempotency_key": "long-json-rewrite"}
    body |= {"rewrite": "😀" * MAX_TEXT_CHARS, "note": "😀" * MAX_NOTE_CHARS}
    sent = send_json(api, "ann", "POST", "/api/votes", body)
    assert sent.status_code == 201 and sent.json()["rewrite"] == "😀" * MAX_TEXT_CHARS
    # one character more is refused for its length (422), the limit named, not for the body's size
    body |= {"rewrite": "😀" * (MAX_TEXT_CHARS + 1), "idempotency_key": "long-json-rewrite-2"}
    refused = send_json(api, "bob", "POST", "/api/votes", body)
    assert refused.status_code == 422 and f"at most {MAX_TEXT_CHARS} characters" in refused.text


def test_too_long_form_fields_name_their_limit(api, db: Database, make_client) -> None:
    api.seed(n_prompts=1)
    admin = make_client()
    log_in(admin, db, "boss", role="admin")
    page = admin.get("/admin/projects/demo").text
    assert f'maxlength="{MAX_GUIDELINES_CHARS}"' in page
    settings = {"csrf_token": csrf_of(page), "overlap": "1", "gold_rate": "0"}
    too_long = admin.post("/admin/projects/demo/settings", data={**settings, "guidelines": "g" * 20_001})
    assert too_long.status_code == 422 and f"at most {MAX_GUIDELINES_CHARS}" in too_long.text
    # as long as the textarea takes, in 3-byte characters and with line breaks (sent as CRLF): taken
    guidelines = ("规则\n" * (MAX_GUIDELINES_CHARS // 3))[:-1]
    sent = {**settings, "guidelines": guidelines.replace("\n", "\r\n")}
    assert admin.post("/admin/projects/demo/settings", data=sent).status_code == 200
    assert api.get("admin", "/api/projects/demo").json()["guidelines"] == guidelines
    # the API takes the same guidelines as JSON with every character escaped
    patched = send_json(
        api, "admin", "PATCH", "/api/projects/demo", {"guidelines": "规" * MAX_GUIDELINES_CHARS}
    )
    assert patched.status_code == 200
    # the login form's fields, over their limits, say them too
    login = admin.post("/login", data={"csrf_token": csrf_of(page), "name": "n" * 65, "password": "p" * 257})
    assert login.status_code == 422
    assert "name: String should have at most 64 characters" in login.text
    assert "password: String should have at most 256 characters" in login.text


def test_pages_declare_an_icon_that_is_served(make_client) -> None:
    browser = make_client()
    login = browser.get("/login").text
    icon = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', login).group(1)
    for path in (icon, "/favicon.ico"):  # the declared one, and where browsers look without one
        r = browser.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
        assert r.text.startswith("<svg")
