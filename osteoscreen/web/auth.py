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
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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


def check_login(settings: Settings, name: str, password: str) -> User | None:
    for u in settings.web.users:
        if hmac.compare_digest(str(u["name"]), name):
            if check_password_hash(u["password_hash"], password):
                return User(u["name"], u.get("role", READ_ONLY), "password")
            return None
    check_password_hash(_DUMMY_HASH, password)
    return None


def configure(app, settings: Settings) -> None:
    app.secret_key = secret_key(settings)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax",
                      PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.web.session_hours))

    @app.before_request
    def load_user() -> None:
        g.user = _proxy_user(settings) or _session_user(settings)

    @app.context_processor
    def inject() -> dict:
        return {"user": g.get("user"), "csrf_token": csrf_token}


def _session_user(settings: Settings) -> User | None:
    name = session.get("user")
    if not name:
        return None
    # The configuration is the authority: a user removed (or demoted) since signing in loses access.
    for u in settings.web.users:
        if u["name"] == name:
            return User(name, u.get("role", READ_ONLY), "password")
    session.clear()
    return None


def _proxy_user(settings: Settings) -> User | None:
    header = settings.web.trusted_proxy_header
    if not header or request.remote_addr not in settings.web.trusted_proxies:
        return None
    name = (request.headers.get(header) or "").strip()
    if not name:
        return None
    return User(name[:64], ADMIN if name in settings.web.proxy_admins else settings.web.proxy_role, "proxy")


def sign_in(user: User) -> None:
    session.clear()
    session.permanent = True
    session["user"] = user.name
    session["csrf"] = secrets.token_urlsafe(24)


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
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
    """Only redirect to paths on this site after sign-in (no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("overview")


__all__ = ["ADMIN", "READ_ONLY", "User", "admin_required", "check_login", "configure", "csrf_token",
           "hash_password", "login_required", "safe_next", "secret_key", "sign_in"]
