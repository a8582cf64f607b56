"""Who is signed in to the dashboard, and what they may do.

Two ways in: a user from `web.users` (name, scrypt password hash, role) signs in with the form, or a
reverse proxy that already authenticated the user (SSO) names them in `web.trusted_proxy_header` —
believed only from `web.trusted_proxies`. Roles: `read-only` sees everything; `admin` may also
acknowledge follow-ups and re-send deliveries. Sessions are Flask's signed cookies (HttpOnly,
SameSite=Lax); every form that changes something carries a per-session CSRF token.
"""
from __future__ import annotations

import functools
import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from flask import abort, g, redirect, request, session, url_for
from werkzeug.security import check_password_hash, generate_password_hash

from ..config import Settings

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


def secret_key(settings: Settings) -> str:
    """web.secret_key, or one generated once and kept (mode 0600) in the storage folder."""
    if settings.web.secret_key:
        return settings.web.secret_key
    path = Path(settings.storage) / "web-secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        try:  # exclusive create: of two processes starting together, both end up with the winner's key
            with open(path, "x") as fh:
                fh.write(key)
            path.chmod(0o600)
        except FileExistsError:
            pass
        return path.read_text().strip()


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


def configure(app, settings: Settings) -> None:
    app.secret_key = secret_key(settings)
    # A sign-in lasts session_hours from signing in (not from the last click): the cookie is not
    # renewed on each request, and _session_user checks the sign-in time too.
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=settings.web.secure_cookies, SESSION_REFRESH_EACH_REQUEST=False,
                      PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.web.session_hours))

    @app.before_request
    def load_user() -> None:
        g.user = _proxy_user(settings) or _session_user(settings)

    @app.context_processor
    def inject() -> dict:
        return {"user": g.get("user"), "csrf_token": csrf_token}


def _fingerprint(password_hash: str) -> str:
    """Ties a session to the password it was opened with: changing the hash ends old sessions."""
    return hmac.new(password_hash.encode("utf-8"), b"osteoscreen-session", "sha256").hexdigest()[:32]


def _session_user(settings: Settings) -> User | None:
    name = session.get("user")
    if not name:
        return None
    # The configuration is the authority: a user removed, demoted or given a new password since
    # signing in loses the session; so does a session older than session_hours.
    age = time.time() - float(session.get("since", 0))
    for u in settings.web.users:
        if u["name"] == name and same(session.get("pw", ""), _fingerprint(u["password_hash"])) \
                and 0 <= age < settings.web.session_hours * 3600:
            return User(name, u.get("role", READ_ONLY), "password")
    session.clear()
    return None


def _from_trusted_proxy(settings: Settings) -> bool:
    try:
        peer = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    for entry in settings.web.trusted_proxies:
        try:
            if peer in ipaddress.ip_network(str(entry), strict=False):
                return True
        except ValueError:
            continue
    return False


def _proxy_user(settings: Settings) -> User | None:
    header = settings.web.trusted_proxy_header
    if not header or not _from_trusted_proxy(settings):
        return None
    name = (request.headers.get(header) or "").strip()[:64]
    if not name:
        return None
    return User(name, ADMIN if name in settings.web.proxy_admins else settings.web.proxy_role, "proxy")


def sign_in(user: User, settings: Settings) -> None:
    session.clear()
    session.permanent = True
    session["user"] = user.name
    session["since"] = time.time()
    session["pw"] = next(_fingerprint(u["password_hash"]) for u in settings.web.users if u["name"] == user.name)
    session["csrf"] = secrets.token_urlsafe(24)


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    if not sent or not same(sent, session.get("csrf", "")):
        abort(400, "The form expired or did not come from this dashboard; reload the page and try again.")


def login_required(view):
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if g.get("user") is None:
            return redirect(url_for("login", next=request.full_path if request.query_string else request.path))
        return view(*args, **kwargs)
    return wrapped


def admin_required(view):
    """POST views that change something: signed in, admin, and a valid CSRF token."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        user = g.get("user")
        if user is None:
            return redirect(url_for("login"))
        if not user.is_admin:
            abort(403, "This needs the admin role.")
        check_csrf()
        return view(*args, **kwargs)
    return wrapped


def safe_next(target: str | None) -> str:
    """Only redirect to paths on this site after sign-in (no open redirect: browsers drop tabs and
    newlines, so "/\t/evil" would become "//evil"; backslashes read as slashes)."""
    if target and not any(ord(c) <= 0x20 or c in "\\\x7f" for c in target):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith("//"):
            return target
    return url_for("overview")


__all__ = ["ADMIN", "READ_ONLY", "Throttle", "User", "admin_required", "check_login", "configure", "csrf_token",
           "hash_password", "is_user", "login_required", "safe_next", "same", "secret_key", "sign_in"]
