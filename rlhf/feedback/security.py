"""Passwords (argon2), API tokens (random, stored as SHA-256), signed session cookies, CSRF tokens, rate limit.

Cookies are signed with HMAC-SHA256 under the app secret. CSRF uses the signed double-submit pattern:
every browser holds a random `rlhf_csrf` cookie, and each form carries HMAC(secret, that nonce), which a
page on another origin can neither read nor compute.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from rlhf.feedback.errors import RateLimited
from rlhf.feedback.models import User

SESSION_COOKIE = "rlhf_session"
CSRF_COOKIE = "rlhf_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:  # an API-only user: spend a hash's time anyway, so this cannot be told apart
        _hasher.hash(password)
        return False
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    """A 256-bit random bearer token; shown once, stored only as its hash."""
    return "rlhf_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # A fast hash is enough here: the token is random, so there is nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _sign(secret: str, payload: bytes) -> str:
    mac = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def make_session_cookie(secret: str, user_id: int, max_age_s: int) -> str:
    body = json.dumps({"uid": user_id, "exp": int(time.time()) + max_age_s}, separators=(",", ":")).encode()
    data = base64.urlsafe_b64encode(body).decode().rstrip("=")
    return f"{data}.{_sign(secret, data.encode())}"


def read_session_cookie(secret: str, cookie: str | None) -> int | None:
    """The user id of a valid, unexpired session cookie, else None."""
    if not cookie or cookie.count(".") != 1:
        return None
    data, mac = cookie.split(".")
    if not hmac.compare_digest(mac, _sign(secret, data.encode())):
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        uid, exp = int(body["uid"]), int(body["exp"])
    except (ValueError, KeyError, TypeError):
        return None
    return uid if exp > time.time() else None


def new_csrf_nonce() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(secret: str, nonce: str) -> str:
    return _sign(secret, b"csrf:" + nonce.encode())


def check_csrf(secret: str, nonce: str | None, token: str | None) -> bool:
    if not nonce or not token:
        return False
    return hmac.compare_digest(token, csrf_token(secret, nonce))


class RateLimiter:
    """A sliding one-minute window of new votes per labeler, kept in this process's memory.

    With several server processes each enforces the limit on its own share of the traffic.
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._events: dict[int, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, user_id: int) -> None:
        """Raise RateLimited if `user_id` already used up this minute's budget."""
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        with self._lock:
            window = self._events.setdefault(user_id, deque())
            while window and window[0] <= now - 60:
                window.popleft()
            if len(window) >= self.per_minute:
                retry = max(1, int(window[0] + 60 - now) + 1)
                raise RateLimited(f"rate limit: at most {self.per_minute} votes per minute", retry)

    def record(self, user_id: int) -> None:
        if self.per_minute <= 0:
            return
        with self._lock:
            self._events.setdefault(user_id, deque()).append(time.monotonic())


class AuthCache:
    """Bearer token -> its user, remembered for `ttl_s` seconds, so most API requests skip a query and a
    thread-pool hop. Cleared whenever this process changes a user; other server processes see a change
    within `ttl_s`. Votes check the disabled flag again inside their own transaction, so a disabled
    labeler never gets a vote in, even from a cache entry that is seconds old."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, User]] = {}
        self._lock = threading.Lock()

    def get(self, token: str) -> User | None:
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(hash_token(token))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, token: str, user: User) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[hash_token(token)] = (time.monotonic() + self.ttl_s, user)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
