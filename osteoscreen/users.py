"""The node's users (`web.users`: name, scrypt password hash, role) and how a password is checked
against them, without Flask: the dashboard (`web/auth.py`) and the STOW-RS receiver
(`node/stow_auth.py`, HTTP Basic) sign users in with the same code.

Role `read-only` sees everything on the dashboard; `admin` may also acknowledge follow-ups and
re-send deliveries (and, where `dicomweb.web_users` is `admin`, store images over STOW-RS).
"""
from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass

from werkzeug.security import check_password_hash, generate_password_hash

from .config import Settings

ADMIN, READ_ONLY = "admin", "read-only"
# Compared against when the user name is unknown, so that a wrong name costs as much as a wrong password.
_DUMMY_HASH = generate_password_hash("osteoscreen-dummy-password")


@dataclass(frozen=True)
class User:
    name: str
    role: str
    via: str  # "password" | "proxy"

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def hash_password(password: str) -> str:
    """What `osteoscreen web hash-password` prints: werkzeug's scrypt hash."""
    return generate_password_hash(password, method="scrypt")


def same(a: str, b: str) -> bool:
    """Constant-time comparison of two texts (any characters: hmac wants bytes for non-ASCII)."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def check_login(settings: Settings, name: str, password: str) -> User | None:
    for u in settings.web.users:
        if same(str(u["name"]), name):
            if check_password_hash(u["password_hash"], password):
                return User(u["name"], u.get("role", READ_ONLY), "password")
            return None
    check_password_hash(_DUMMY_HASH, password)
    return None


def is_user(settings: Settings, name: str) -> bool:
    return any(str(u["name"]) == name for u in settings.web.users)


class Throttle:
    """Failed sign-ins per client address and per user name: after `limit` failures within `window`
    seconds, further attempts are refused until the window has passed (in memory, per process)."""

    def __init__(self, limit: int = 5, window: float = 900.0):
        self.limit, self.window = limit, window
        self.failures: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self.failures.get(key, []) if now - t < self.window]
        if times:
            self.failures[key] = times
        else:
            self.failures.pop(key, None)
        return times

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self.lock:
            return any(len(self._recent(k, now)) >= self.limit for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self.lock:
            for k in keys:
                self.failures.setdefault(k, []).append(now)
            if len(self.failures) > 10000:  # bounded memory under a spray of names
                for k in list(self.failures):
                    self._recent(k, now)

    def succeeded(self, *keys: str) -> None:
        with self.lock:
            for k in keys:
                self.failures.pop(k, None)
