"""rlhf/feedback/security.py and the access rules: roles, hashes, CSRF, size limits."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from rlhf.feedback import users
from rlhf.feedback.db import Database
from rlhf.feedback.errors import Conflict
from rlhf.feedback.models import ApiToken, User
from rlhf.feedback.schemas import MAX_VOTE_BYTES
from rlhf.feedback.security import make_session_cookie, read_session_cookie


def test_no_token_is_401_and_bad_token_is_401(client) -> None:
    assert client.get("/api/me").status_code == 401
    assert client.get("/api/me", headers={"Authorization": "Bearer rlhf_nope"}).status_code == 401


def test_labeler_sees_only_their_own_votes(api) -> None:
    api.seed(n_prompts=2, overlap=2)
    ann_task = api.next("ann")
    ann_vote = api.vote("ann", ann_task["id"], note="ann's note").json()
    bob_task = api.next("bob")
    bob_vote = api.vote("bob", bob_task["id"]).json()
    assert api.get("bob", f"/api/votes/{ann_vote['id']}").status_code == 404
    assert api.get("ann", f"/api/votes/{ann_vote['id']}").json()["note"] == "ann's note"
    for query in ({}, {"labeler": "ann"}, {"project": "demo"}):
        listed = api.get("bob", "/api/votes", params=query).json()
        assert [v["id"] for v in listed] == [bob_vote["id"]]
        assert {v["labeler"] for v in listed} == {"bob"}
    assert len(api.get("admin", "/api/votes").json()) == 2


def test_labeler_cannot_use_admin_endpoints(api) -> None:
    api.seed(n_prompts=1)
    for path in ("/api/projects/demo/stats", "/api/projects/demo/export", "/api/users", "/api/projects/demo"):
        assert api.get("ann", path).status_code == 403, path
    assert api.post("ann", "/api/projects/demo/import", json={"candidates": []}).status_code == 403
    assert api.post("ann", "/api/users/bob/tokens", json={}).status_code == 403
    assert (
        api.client.patch("/api/users/bob", json={"disabled": True}, headers=api.team["ann"]).status_code
        == 403
    )


def test_passwords_are_argon2_and_tokens_hashed(db: Database, team) -> None:
    with db.session() as s:
        users.create_user(s, "dan", "labeler", "correct horse")
        token = users.create_token(s, "dan")
        dan = s.scalar(select(User).where(User.name == "dan"))
        stored = list(s.scalars(select(ApiToken.token_hash)))
        assert dan.password_hash.startswith("$argon2id$")
        assert "correct horse" not in dan.password_hash
        assert token not in stored and len(stored) == 5
        assert users.authenticate(s, "dan", "correct horse").name == "dan"
        assert users.authenticate(s, "dan", "wrong") is None
        users.update_user(s, "dan", disabled=True)
        assert users.authenticate(s, "dan", "correct horse") is None


def test_session_cookie_is_signed() -> None:
    cookie = make_session_cookie("s3cret", 7, 60, generation=3)
    assert read_session_cookie("s3cret", cookie) == (7, 3)
    assert read_session_cookie("other", cookie) is None
    data, mac = cookie.split(".")
    forged = make_session_cookie("s3cret", 8, 60).split(".")[0] + "." + mac
    assert read_session_cookie("s3cret", forged) is None
    assert read_session_cookie("s3cret", make_session_cookie("s3cret", 7, -1)) is None  # expired


def login(client, name: str, password: str, csrf: bool = True):
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    data = {"name": name, "password": password, **({"csrf_token": token} if csrf else {})}
    return client.post("/login", data=data, follow_redirects=False)


def test_csrf_token_required_on_form_posts(client, db: Database) -> None:
    with db.session() as s:
        users.create_user(s, "eve", "labeler", "eve-password")
    assert login(client, "eve", "eve-password", csrf=False).status_code == 403
    ok = login(client, "eve", "eve-password")
    assert ok.status_code == 303 and ok.headers["location"] == "/label"
    set_cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    # logged in by cookie: forms without the token, and a token for another browser's nonce, are refused
    assert client.post("/logout", data={}, follow_redirects=False).status_code == 403
    assert client.post("/logout", data={"csrf_token": "forged"}, follow_redirects=False).status_code == 403
    # the JSON API with a cookie needs the X-CSRF-Token header on unsafe methods
    assert client.get("/api/me").status_code == 200
    assert client.post("/api/votes/undo").status_code == 403


def test_wrong_password_is_401(client, db: Database) -> None:
    with db.session() as s:
        users.create_user(s, "eve", "labeler", "eve-password")
    assert login(client, "eve", "not-it").status_code == 401
    assert login(client, "nobody", "not-it").status_code == 401


def test_size_limits(make_client, team) -> None:
    client = make_client(max_body_bytes=4096, max_import_bytes=20_000)
    admin = team["admin"]
    rows = [{"prompt": "p", "completions": [{"text": "a"}, {"text": "b"}]}]
    assert (
        client.post("/api/projects/demo/import", json={"candidates": rows}, headers=admin).status_code == 201
    )
    big = [{"prompt": "p" * 30_000, "completions": [{"text": "a"}, {"text": "b"}]}]
    assert (
        client.post("/api/projects/demo/import", json={"candidates": big}, headers=admin).status_code == 413
    )
    vote = {"task_id": 1, "choice": "A", "idempotency_key": "size-limit-1"}
    # a vote's body may take its longest texts whatever the general limit: a note too long is a 422, not a 413
    assert (
        client.post("/api/votes", json={**vote, "note": "x" * 5000}, headers=team["ann"]).status_code == 422
    )
    assert client.post("/api/votes", json={**vote, "note": "nul\x00"}, headers=team["ann"]).status_code == 422
    assert (
        client.post("/api/votes", content=b" " * (MAX_VOTE_BYTES + 1), headers=team["ann"])
        .json()["detail"]
        .startswith(f"request body over the limit of {MAX_VOTE_BYTES} bytes")
    )
    user = {"name": "zed", "role": "labeler"}

    def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(10):
            yield b" " * 1000

    streamed = client.post(
        "/api/users", content=chunks(), headers={**admin, "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert client.post("/api/users", json={**user, "pad": "x" * 5000}, headers=admin).status_code == 413
    assert (
        client.post("/api/votes", json={**vote, "note": "x" * 2000}, headers=team["ann"]).status_code == 201
    )
    # a form too long for the limit is a page, not a line of JSON
    page = client.post("/label/demo/skip", data={"task_id": "1", "pad": "你好" * 1000})
    assert page.status_code == 413 and "shorten the text" in page.text and "<html" in page.text.lower()
    assert (
        client.post("/api/users", content=b" " * 5000, headers=admin)
        .json()["detail"]
        .startswith("request body over the limit of 4096 bytes")
    )


def csrf_of(client) -> str:
    page = client.get("/login")
    return page.text.split('name="csrf_token" value="')[1].split('"')[0]


def test_logout_and_password_change_end_copied_sessions(make_client, db: Database) -> None:
    with db.session() as s:
        users.create_user(s, "eve", "labeler", "eve-password")
    browser, thief = make_client(), make_client()

    def copy_cookie() -> None:
        thief.cookies.set("rlhf_session", browser.cookies.get("rlhf_session"))

    assert login(browser, "eve", "eve-password").status_code == 303
    copy_cookie()
    assert thief.get("/api/me").status_code == 200
    assert (
        browser.post("/logout", data={"csrf_token": csrf_of(browser)}, follow_redirects=False).status_code
        == 303
    )
    assert thief.get("/api/me").status_code == 401  # the copy died with the logout
    assert thief.get("/label", follow_redirects=False).headers["location"] == "/login?next=/label&ended=1"

    assert login(browser, "eve", "eve-password").status_code == 303
    copy_cookie()
    assert thief.get("/api/me").status_code == 200
    with db.session() as s:
        users.update_user(s, "eve", password="new-password")
    assert thief.get("/api/me").status_code == 401
    assert browser.get("/api/me").status_code == 401  # every session opened with the old password
    assert login(browser, "eve", "new-password").status_code == 303
    assert browser.get("/api/me").status_code == 200


def test_login_attempts_are_limited_per_account_and_per_address(make_client, db: Database) -> None:
    with db.session() as s:
        users.create_user(s, "eve", "labeler", "eve-password")
    client = make_client(login_failures_per_account=2, login_attempts_per_address=3)
    assert [login(client, "eve", f"guess{i}").status_code for i in range(2)] == [401, 401]
    locked = login(client, "eve", "eve-password")  # even the right password: the account is locked a while
    assert locked.status_code == 429 and "for this account" in locked.text and "Retry-After" in locked.headers
    assert login(client, "other", "guess").status_code == 401  # another account from the same address
    over = login(client, "third", "guess")  # this address's fourth counted attempt: over its 3
    assert over.status_code == 429 and "from your address" in over.text


def test_admins_cannot_lock_themselves_or_everyone_out(api, db: Database) -> None:
    assert (
        api.client.patch("/api/users/admin", json={"role": "labeler"}, headers=api.team["admin"]).status_code
        == 409
    )
    assert (
        api.client.patch("/api/users/admin", json={"disabled": True}, headers=api.team["admin"]).status_code
        == 409
    )
    assert api.get("admin", "/api/me").json()["role"] == "admin"
    with db.session() as s:
        users.create_user(s, "root2", "admin")
        root2 = {"Authorization": f"Bearer {users.create_token(s, 'root2')}"}
    # another admin may demote this one; then root2 is the last admin, whom nobody can remove
    assert api.client.patch("/api/users/admin", json={"role": "labeler"}, headers=root2).status_code == 200
    with db.session() as s, pytest.raises(Conflict, match="last enabled admin"):
        users.update_user(s, "root2", disabled=True)


def test_two_admins_disabling_each_other_at_once_leave_one_enabled(
    db: Database, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers (two connections), each admin disabling the other, both past their first read before either
    writes: one is refused. Each counted the other as the admin left, and both went through (PostgreSQL)."""
    with db.session() as s:  # the store, migrated
        users.create_user(s, "root1", "admin")
        users.create_user(s, "root2", "admin")
    both_read = threading.Barrier(2)
    get_user = users.get_user

    def read_then_wait(session: object, name: str) -> User:
        user = get_user(session, name)  # type: ignore[arg-type]
        try:  # wait for the other worker's read, unless it waits on this one's lock
            both_read.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return user

    monkeypatch.setattr(users, "get_user", read_then_wait)
    outcomes: list[str] = []

    def disable(actor: str, other: str) -> None:
        worker = Database(db_url)
        try:
            with worker.session() as s:
                acting = get_user(s, actor)
                users.update_user(s, other, disabled=True, acting=acting)
            outcomes.append("done")
        except Conflict:
            outcomes.append("refused")
        finally:
            worker.dispose()

    threads = [
        threading.Thread(target=disable, args=pair) for pair in (("root1", "root2"), ("root2", "root1"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["done", "refused"]
    check = Database(db_url)
    with check.session() as s:
        enabled = s.scalars(select(User.name).where(User.role == "admin", User.disabled.is_(False))).all()
    check.dispose()
    assert len(enabled) == 1


def test_json_numbers_and_flags_are_not_read_from_strings_or_booleans(api) -> None:
    """A flag given as "yes" once disabled the user, and a task id given as true voted on task 1: the JSON API
    takes its numbers and flags as JSON numbers and booleans only (422 otherwise, nothing changed)."""
    api.seed(n_prompts=1)
    admin = api.team["admin"]
    for bad in ("yes", 1, "true"):
        r = api.client.patch("/api/users/bob", json={"disabled": bad}, headers=admin)
        assert r.status_code == 422, bad
    assert not any(u["disabled"] for u in api.get("admin", "/api/users").json())
    for body in ({"overlap": "3"}, {"overlap": True}, {"gold_rate": "0.5"}):
        assert api.client.patch("/api/projects/demo", json=body, headers=admin).status_code == 422, body
    assert (
        api.client.patch("/api/projects/demo", json={"overlap": 2, "gold_rate": 0}, headers=admin).status_code
        == 200
    )
    task = api.next("ann")
    assert task["id"] == 1
    r = api.post("ann", "/api/votes", json={"task_id": True, "choice": "A", "idempotency_key": "k-true-1"})
    assert r.status_code == 422
    for bad in ({"display_order": ["1", "0"]}, {"display_order": [True, 0]}):  # the list's items too
        body = {"task_id": task["id"], "choice": "A", "idempotency_key": "k-list-1", **bad}
        assert api.post("ann", "/api/votes", json=body).status_code == 422, bad
    assert api.vote("ann", task["id"]).status_code == 201  # the task is still open to a real vote


def test_an_admin_body_with_a_field_there_is_not_is_refused(api) -> None:
    """A mistyped setting ("overlapp") or a token's label under the CLI's name ("label") is a 422, not a 200
    that quietly leaves the setting as it was."""
    api.seed(n_prompts=1)
    admin = api.team["admin"]
    before = api.get("admin", "/api/projects/demo").json()
    r = api.client.patch("/api/projects/demo", json={"overlapp": 3}, headers=admin)
    assert r.status_code == 422 and "overlapp" in r.text
    assert api.get("admin", "/api/projects/demo").json() == before
    assert api.post("admin", "/api/users/bob/tokens", json={"label": "laptop"}).status_code == 422
    assert api.post("admin", "/api/users/bob/tokens", json={"name": "laptop"}).status_code == 201
    assert api.post("admin", "/api/users", json={"name": "eve", "rol": "admin"}).status_code == 422


def test_login_attempts_sent_together_count_against_the_account_before_the_password_is_checked() -> None:
    """Failed logins were counted after the password check: 28 wrong passwords sent at once for one account
    were all checked against a limit of 10. Each attempt now counts as it arrives, and a login that succeeds
    gives its count back."""
    from rlhf.feedback.errors import RateLimited
    from rlhf.feedback.security import LoginLimits

    limits = LoginLimits(per_address=100, per_account=3, window_s=60)
    limits.check("Eve", "10.0.0.1")
    limits.succeeded("eve")  # a login: no failure left behind
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):  # three attempts in flight, none answered yet
        limits.check("eve", address)
    with pytest.raises(RateLimited) as e:
        limits.check("EVE", "10.0.0.4")
    assert e.value.scope == "for this account"
    limited = LoginLimits(per_address=1, per_account=3, window_s=60)
    limited.check("ann", "10.0.0.9")
    with pytest.raises(RateLimited):  # over for the address: not counted against the account either
        limited.check("bob", "10.0.0.9")
    for address in ("10.0.0.10", "10.0.0.11", "10.0.0.12"):
        limited.check("bob", address)
