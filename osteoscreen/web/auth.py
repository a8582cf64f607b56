"""Who is signed in to the dashboard, and what they may do.

Two ways in: a user from `web.users` (name, scrypt password hash, role) signs in with the form, or a
reverse proxy that already authenticated the user (SSO) names them in `web.trusted_proxy_header` —
believed only from `web.trusted_proxies`. Roles: `read-only` sees everything; `admin` may also
acknowledge follow-ups and re-send deliveries. Sessions are Flask's signed cookies (HttpOnly,
SameSite=Lax); every form that changes something carries a per-session CSRF token. The user
store and its password check (`osteoscreen/users.py`) are shared with the STOW-RS receiver.
"""
from __future__ import annotations

import functools
import hmac
import ipaddress
import secrets
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from flask import abort, g, redirect, request, session, url_for

from ..config import Settings
# the user store and password check, shared with the STOW-RS receiver's HTTP Basic sign-in
from ..users import ADMIN, READ_ONLY, Throttle, User, check_login, hash_password, is_user, same  # noqa: F401


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
