"""A small synchronous client of the labeling API (httpx). The simulated panel and the RLHF loop vote
through it, so their votes travel the same path as people's.

    with FeedbackClient("http://127.0.0.1:8000", token) as client:
        while (task := client.next_task("demo")) is not None:
            client.vote(task["id"], choice="A", display_order=task["display_order"])

Votes carry an idempotency key (a fresh UUID unless given); on a connection error or a 429/503 the client
retries with the same key, so a vote is recorded once however often it is sent.

`light=True` sends over one keep-alive connection of the standard library's http.client instead of httpx:
a fraction of httpx's CPU per request (benchmarks/label_queue.py), for callers that talk to a plain-http
server they started themselves, such as the demo's simulated panel. It reads no proxy settings.
"""

from __future__ import annotations

import http.client
import json
import select
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from rlhf.errors import RlhfError
from rlhf.retry import send_retrying

RETRY_STATUS = (429, 502, 503, 504)


class FeedbackAPIError(RlhfError):
    """The server answered with an error status; `status` and `detail` say which."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"labeling API answered {status}: {detail}")
        self.status = status
        self.detail = detail


class FeedbackClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 8,
        backoff_s: float = 0.1,
        transport: httpx.BaseTransport | None = None,
        light: bool = False,
    ) -> None:
        self.retries = retries
        self.backoff_s = backoff_s
        self._light: _KeepAlive | None = None
        if light:
            if transport is not None:
                raise ValueError("a light client sends through http.client: it takes no httpx transport")
            self._light = _KeepAlive(base_url, token, timeout_s)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()
        if self._light is not None:
            self._light.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self, method: str, path: str, *, retry: bool = True, params: Any = None, body: Any = None
    ) -> httpx.Response:
        """Send a request; with `retry`, resend it on connection errors and 429/5xx-unavailable answers."""

        def sent() -> httpx.Response:
            if self._light is not None:
                return self._light.request(method, path, params, body)
            return self._http.request(method, path, params=params, json=body)

        response = send_retrying(sent, retries=self.retries if retry else 0, backoff_s=self.backoff_s,
                                 retry_status=RETRY_STATUS.__contains__)  # fmt: skip
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (ValueError, AttributeError):
                detail = response.text
            raise FeedbackAPIError(
                response.status_code, detail if isinstance(detail, str) else json.dumps(detail)
            )
        return response

    # ---- labeling ------------------------------------------------------------------------------------

    def next_task(self, project: str | None = None) -> dict[str, Any] | None:
        """The next task for this token's user (assigned to them), or None when nothing is left.

        The task dict has id, project, kind, prompt, completions [{position, text}] and a random
        display_order; send that order back with the vote if you showed the answers in it.
        """
        params = {"project": project} if project else None
        task: dict[str, Any] | None = self._request("POST", "/api/tasks/next", params=params).json()["task"]
        return task

    def vote(
        self,
        task_id: int,
        choice: str | None = None,
        ranking: Sequence[int] | None = None,
        rating: float | None = None,
        margin: float | None = None,
        note: str | None = None,
        display_order: Sequence[int] | None = None,
        idempotency_key: str | None = None,
        *,
        confidence: float | None = None,
        time_to_vote_ms: int | None = None,
        source: str = "api",
        axes: dict[str, str] | None = None,
        rewrite: str | None = None,
    ) -> dict[str, Any]:
        """Record a vote: `choice` (A/B/tie/both_bad) for pairwise tasks, `ranking` (rank per position,
        1 = best) for ranking tasks, `rating` for rating tasks; optionally per-axis judgements (axis ->
        A/B/same) and a better answer. Returns the stored vote (the original one when `idempotency_key`
        was used before with the same vote)."""
        body = {
            "task_id": task_id,
            "choice": choice,
            "ranking": list(ranking) if ranking is not None else None,
            "rating": rating,
            "margin": margin,
            "confidence": confidence,
            "note": note,
            "display_order": list(display_order) if display_order is not None else None,
            "time_to_vote_ms": time_to_vote_ms,
            "axes": axes,
            "rewrite": rewrite,
            "idempotency_key": idempotency_key or f"cli-{uuid.uuid4().hex}",
            "source": source,
        }
        vote: dict[str, Any] = self._request(
            "POST", "/api/votes", body={k: v for k, v in body.items() if v is not None}
        ).json()
        return vote

    def skip(self, task_id: int) -> None:
        self._request("POST", f"/api/tasks/{task_id}/skip")

    def undo(self, vote_id: int | None = None, project: str | None = None) -> dict[str, Any]:
        """Retract a vote of yours (the latest if `vote_id` is None, in `project` if given) within the undo
        window."""
        path = "/api/votes/undo" if vote_id is None else f"/api/votes/{vote_id}/undo"
        params = {"project": project} if project and vote_id is None else None
        out: dict[str, Any] = self._request("POST", path, retry=False, params=params).json()
        return out

    def my_votes(self, project: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if project:
            params["project"] = project
        out: list[dict[str, Any]] = self._request("GET", "/api/votes", params=params).json()
        return out

    # ---- admin ---------------------------------------------------------------------------------------

    def import_candidates(
        self,
        project: str,
        candidates: Sequence[dict[str, Any]],
        *,
        task_kind: str = "pairwise",
        gold: Sequence[dict[str, Any]] = (),
        overlap: int | None = None,
        gold_rate: float | None = None,
        guidelines: str | None = None,
        axes: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Import candidate rows (the generation file's format); retried only when rows have prompt_ids,
        because only then is a repeated import harmless."""
        body: dict[str, Any] = {"task_kind": task_kind, "candidates": list(candidates), "gold": list(gold)}
        if overlap is not None:
            body["overlap"] = overlap
        if gold_rate is not None:
            body["gold_rate"] = gold_rate
        if guidelines is not None:
            body["guidelines"] = guidelines
        if axes is not None:
            body["axes"] = list(axes)
        safe = all("prompt_id" in r for r in [*candidates, *gold])
        out: dict[str, Any] = self._request(
            "POST", f"/api/projects/{project}/import", body=body, retry=safe
        ).json()
        return out

    def export(self, project: str, format: str = "votes") -> list[dict[str, Any]]:
        """Preference records: votes, pairs, ranking or rating (see rlhf.feedback.export)."""
        text = self._request("GET", f"/api/projects/{project}/export", params={"format": format}).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def stats(self, project: str) -> dict[str, Any]:
        out: dict[str, Any] = self._request("GET", f"/api/projects/{project}/stats").json()
        return out

    def update_project(
        self,
        project: str,
        overlap: int | None = None,
        gold_rate: float | None = None,
        guidelines: str | None = None,
        axes: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        fields = (("overlap", overlap), ("gold_rate", gold_rate), ("guidelines", guidelines))
        body: dict[str, Any] = {k: v for k, v in fields if v is not None}
        if axes is not None:
            body["axes"] = list(axes)
        out: dict[str, Any] = self._request("PATCH", f"/api/projects/{project}", body=body).json()
        return out

    def create_user(self, name: str, role: str = "labeler", password: str | None = None) -> dict[str, Any]:
        body = {"name": name, "role": role, **({"password": password} if password else {})}
        out: dict[str, Any] = self._request("POST", "/api/users", body=body, retry=False).json()
        return out

    def create_token(self, user: str, label: str = "") -> str:
        token: str = self._request(
            "POST", f"/api/users/{user}/tokens", body={"name": label}, retry=False
        ).json()["token"]
        return token

    def set_disabled(self, user: str, disabled: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = self._request("PATCH", f"/api/users/{user}", body={"disabled": disabled}).json()
        return out


class _KeepAlive:
    """One keep-alive HTTP/1.1 connection (http.client) that answers with httpx.Response objects and raises
    httpx.TransportError subclasses, so FeedbackClient treats both kinds of sending alike."""

    def __init__(self, base_url: str, token: str, timeout_s: float) -> None:
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"a light client needs a plain http:// URL, not {base_url!r}")
        self.host, self.port, self.prefix = url.hostname, url.port or 80, url.path
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, params: Any, body: Any) -> httpx.Response:
        target = self.prefix + path + (f"?{urlencode(params)}" if params else "")
        headers = dict(self.headers)
        content = None
        if body is not None:
            # the bytes httpx would send for json=body
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        if (
            self.conn is not None
            and self.conn.sock is not None
            and select.select([self.conn.sock], [], [], 0)[0]
        ):
            self.close()  # readable while idle: the server closed it (keep-alive timeout); start afresh
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            self.conn.request(method, target, body=content, headers=headers)
            answer = self.conn.getresponse()
            data = answer.read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise httpx.ReadError(f"{type(e).__name__}: {e}") from e
        return httpx.Response(answer.status, headers=answer.getheaders(), content=data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
