"""rlhf/feedback/client.py and testing.py: the Python client against a live in-process server."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from rlhf.feedback.client import FeedbackAPIError, FeedbackClient
from rlhf.feedback.db import Database
from rlhf.feedback.models import Vote
from rlhf.feedback.testing import make_user, run_server


class FlakyTransport(httpx.HTTPTransport):
    """Delivers every request, but drops the answer to the first vote: the client sees a connection error
    after the server has committed, the case idempotency keys exist for."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path == "/api/votes" and self.dropped == 0:
            response.read()
            self.dropped += 1
            raise httpx.ReadError("connection reset", request=request)
        return response


@pytest.mark.parametrize("light", [False, True], ids=["httpx", "light"])
def test_client_end_to_end(db: Database, db_url: str, make_rows: Any, light: bool) -> None:
    admin_token = make_user(db_url, "admin", role="admin")
    with run_server(db_url) as url:
        assert url.startswith("http://127.0.0.1:")
        admin = FeedbackClient(url, admin_token, light=light)
        out = admin.import_candidates("demo", make_rows(3, 2), overlap=1)
        assert (out["prompts"], out["tasks"]) == (3, 3)
        admin.create_user("ann")
        transport = FlakyTransport()
        ann = FeedbackClient(url, admin.create_token("ann"), transport=transport, backoff_s=0.01)

        task = ann.next_task("demo")
        assert task is not None and set(task) == {
            "id",
            "project",
            "kind",
            "prompt",
            "completions",
            "display_order",
        }
        vote = ann.vote(task["id"], choice="B", display_order=task["display_order"], margin=1.5, note="n")
        assert transport.dropped == 1  # the first answer was lost, the retry (same key) got the original
        assert (vote["choice"], vote["margin"], vote["note"]) == ("B", 1.5, "n")
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Vote)) == 1

        assert ann.undo(project="demo")["retracted"] is True
        again = ann.next_task()  # no project: the first project with work for ann
        assert again is not None and again["id"] == task["id"]
        ann.vote(again["id"], choice="tie")
        second = ann.next_task("demo")
        ann.skip(second["id"])
        third = ann.next_task("demo")
        ann.vote(third["id"], choice="A", idempotency_key="my-own-key-1")
        assert ann.vote(third["id"], choice="A", idempotency_key="my-own-key-1")["choice"] == "A"  # a retry
        assert ann.next_task("demo") is None
        assert [v["choice"] for v in ann.my_votes("demo")] == ["A", "tie", "B"]

        with pytest.raises(FeedbackAPIError) as err:
            ann.stats("demo")
        assert err.value.status == 403
        assert [r["choice"] for r in admin.export("demo", "votes")] == ["tie", "A"]
        assert len(admin.export("demo", "pairs")) == 1
        stats = admin.stats("demo")
        assert stats["votes"] == 2 and stats["labelers"][0]["labeler"] == "ann"
        assert admin.update_project("demo", overlap=2)["overlap"] == 2
        updated = admin.update_project("demo", guidelines="Be *kind*", axes=["helpful", "harmless"])
        assert updated["guidelines"] == "Be *kind*" and updated["axes"] == ["helpful", "harmless"]
        task = admin.next_task("demo")
        judged = admin.vote(task["id"], choice="B", axes={"harmless": "A"}, rewrite="A kinder answer.")
        assert judged["axes"] == {"harmless": "A"} and judged["rewrite"] == "A kinder answer."
        assert [r["response"] for r in admin.export("demo", "sft")] == ["A kinder answer."]
        admin.set_disabled("ann")
        with pytest.raises(FeedbackAPIError) as err:
            ann.next_task("demo")
        assert err.value.status == 403
        for c in (admin, ann):
            c.close()


def test_server_timing_header(db_url: str) -> None:
    with run_server(db_url) as url:
        r = httpx.get(f"{url}/healthz")
    assert r.headers["server-timing"].startswith("app;dur=")


def test_light_client_reconnects_retries_and_reports_errors(
    db: Database, db_url: str, make_rows: Any
) -> None:
    admin_token = make_user(db_url, "admin", role="admin")
    with run_server(db_url) as url:
        admin = FeedbackClient(url, admin_token, light=True, backoff_s=0.01)
        admin.import_candidates("demo", make_rows(2, 2), overlap=1)
        task = admin.next_task("demo")
        assert admin._light is not None and admin._light.conn is not None
        admin._light.conn.sock.shutdown(socket.SHUT_RDWR)  # as a server's keep-alive timeout leaves it
        assert admin.next_task("demo")["id"] == task["id"]  # a new connection, the same open task
        with pytest.raises(FeedbackAPIError) as err:
            admin.vote(task["id"], choice="maybe")
        assert err.value.status == 422 and "choice" in err.value.detail
        with pytest.raises(FeedbackAPIError) as err:
            FeedbackClient(url, "not-a-token", light=True).next_task("demo")
        assert err.value.status == 401
        admin.close()
    with pytest.raises(httpx.TransportError):  # the server is gone: retried, then the error
        FeedbackClient(url, admin_token, light=True, retries=2, backoff_s=0.001).next_task("demo")
    with pytest.raises(ValueError, match="plain http"):
        FeedbackClient("https://example.org", admin_token, light=True)
