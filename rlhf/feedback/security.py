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
import random
import re
import secrets
import threading
import time
from collections.abc import Hashable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.concurrency import run_in_threadpool

from rlhf.feedback.errors import RateLimited
from rlhf.feedback.models import User
from rlhf.feedback.shared import Shared

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


def make_session_cookie(secret: str, user_id: int, max_age_s: int, generation: int = 0) -> str:
    """A signed cookie naming the user and their session generation at login (see read_session_cookie)."""
    claims = {"uid": user_id, "gen": generation, "exp": int(time.time()) + max_age_s}
    body = json.dumps(claims, separators=(",", ":")).encode()
    data = base64.urlsafe_b64encode(body).decode().rstrip("=")
    return f"{data}.{_sign(secret, data.encode())}"


def read_session_cookie(secret: str, cookie: str | None) -> tuple[int, int] | None:
    """(user id, session generation) of a valid, unexpired session cookie, else None. The cookie is live
    only while the generation equals the user's `session_generation` (logout and password changes bump it)."""
    if not cookie or cookie.count(".") != 1:
        return None
    data, mac = cookie.split(".")
    if not hmac.compare_digest(mac, _sign(secret, data.encode())):
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        uid, gen, exp = int(body["uid"]), int(body.get("gen", 0)), int(body["exp"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return (uid, gen) if exp > time.time() else None


def new_csrf_nonce() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(secret: str, nonce: str) -> str:
    return _sign(secret, b"csrf:" + nonce.encode())


def check_csrf(secret: str, nonce: str | None, token: str | None) -> bool:
    if not nonce or not token:
        return False
    return hmac.compare_digest(token, csrf_token(secret, nonce))


class RateLimiter:
    """A sliding window (one minute unless told) of events per key, kept where `shared` keeps them: this
    process's memory by default, or a store every server process sees (see rlhf.feedback.shared)."""

    def __init__(
        self,
        per_window: int,
        window_s: float = 60.0,
        what: str = "votes per minute",
        shared: Shared | None = None,
        name: str = "votes",
    ) -> None:
        self.per_minute = per_window
        self.window_s = window_s
        self.what = what
        self.shared = shared or Shared()
        self.name = name

    def check(self, key: Hashable) -> None:
        """Raise RateLimited if `key` already used up this window's budget."""
        if self.per_minute > 0:
            self._raise_if(self.shared.take(self._key(key), self.per_minute, self.window_s, add=False))

    def record(self, key: Hashable) -> None:
        if self.per_minute > 0:
            self.shared.add(self._key(key), self.window_s)

    def take(self, key: Hashable) -> None:
        """check and record in one step, so parallel requests (on any worker) cannot all pass before any
        is counted."""
        if self.per_minute > 0:
            self._raise_if(self.shared.take(self._key(key), self.per_minute, self.window_s))

    async def take_async(self, key: Hashable) -> None:
        """`take` from the event loop: in the thread pool where it costs a database transaction."""
        if self.per_minute > 0 and self.shared.slow:
            await run_in_threadpool(self.take, key)
        else:
            self.take(key)

    async def give_back_async(self, key: Hashable) -> None:
        if self.per_minute > 0 and self.shared.slow:
            await run_in_threadpool(self.give_back, key)
        else:
            self.give_back(key)

    def give_back(self, key: Hashable) -> None:
        """Uncount the latest `take` of `key` (the action turned out not to count, e.g. a replay)."""
        if self.per_minute > 0:
            self.shared.remove_newest(self._key(key))

    def _key(self, key: Hashable) -> str:
        return f"{self.name}:{key}"

    def _raise_if(self, retry_s: float | None) -> None:
        if retry_s is not None:
            retry = max(1, int(retry_s) + 1)
            raise RateLimited(f"rate limit: at most {self.per_minute} {self.what}; retry in {retry} s", retry)


class LoginLimits:
    """Login attempts per client address (every attempt) and failed ones per account name, each in a
    sliding window: guessing passwords is slow from one address, and for one account from many."""

    def __init__(
        self, per_address: int, per_account: int, window_s: float, shared: Shared | None = None
    ) -> None:
        minutes = f"{window_s / 60:g} minutes"
        what = f"login attempts per address in {minutes}"
        self.by_address = RateLimiter(per_address, window_s, what, shared, "login_address")
        what = f"failed logins per account in {minutes}"
        self.by_account = RateLimiter(per_account, window_s, what, shared, "login_account")

    def check(self, name: str, address: str) -> None:
        """Count this attempt, against its address and (until it succeeds: `succeeded`) its account, in one step
        each, so that attempts sent together cannot all pass before any is counted; raise RateLimited (with
        `scope` set) if the address or account is over."""
        try:
            self.by_account.take(name.casefold())
        except RateLimited as e:
            e.scope = "for this account"
            raise
        try:
            self.by_address.take(address)
        except RateLimited as e:
            self.by_account.give_back(name.casefold())
            e.scope = "from your address"
            raise

    def succeeded(self, name: str) -> None:
        """The attempt `check` counted against its account logged in: only failed ones count there."""
        self.by_account.give_back(name.casefold())


class AuthCache:
    """Bearer token -> its user, remembered for up to `ttl_s` seconds, so most API requests skip a query and a
    thread-pool hop. `clear()` after changing a user or token: this process forgets at once; with a shared
    auth epoch (Redis) every other process does too, on its next request (an entry is good only under the
    epoch read before its lookup). Without one, other processes see a change within `ttl_s`. Votes check
    the disabled flag again inside their own transaction, so a disabled labeler never gets a vote in."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl_s: float, shared: Shared | None = None) -> None:
        self.ttl_s = ttl_s
        self.shared = shared or Shared()
        self._entries: dict[str, tuple[float, User, int | None]] = {}
        self._lock = threading.Lock()

    def epoch(self) -> int | None:
        """The shared auth epoch now (read it before looking a token up; pass it to get and put)."""
        return self.shared.auth_epoch() if self.ttl_s > 0 else None

    async def epoch_async(self) -> int | None:
        """`epoch` from the event loop."""
        return await self.shared.auth_epoch_async() if self.ttl_s > 0 else None

    def get(self, token: str, epoch: int | None = None) -> User | None:
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(hash_token(token))
        if entry is None or entry[0] < time.monotonic() or entry[2] != epoch:
            return None
        return entry[1]

    def put(self, token: str, user: User, epoch: int | None = None) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            # a lifetime drawn from [0.8 ttl, ttl]: tokens first looked up together (a server just started)
            # drift apart, rather than all expiring, and queueing for a lookup, together again and again
            expires = time.monotonic() + self.ttl_s * random.uniform(0.8, 1.0)
            self._entries[hash_token(token)] = (expires, user, epoch)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        self.shared.bump_auth_epoch()


# the pages a login may return to: a labeler's or an admin's own page, never another site (an open redirect)
_RETURN_PATH = re.compile(r"/(label|admin)(/(?!\.+(/|$))[A-Za-z0-9_.-]+)*")  # no "." or ".." segment


def return_path(path: str | None) -> bool:
    """Whether the login may send the browser back to `path` (an app page, not another site)."""
    return path is not None and len(path) <= 300 and _RETURN_PATH.fullmatch(path) is not None
