"""Who may store over STOW-RS: a bearer token (`dicomweb.token`, or the environment variable
`dicomweb.token_env` names), compared in constant time, or, where `dicomweb.web_users` allows it, a
dashboard user (`web.users`) with HTTP Basic, checked by the dashboard's own code (`users.py`).

A user's scrypt check costs tens of milliseconds of CPU, and a sender signs every request: a
successful check is remembered for VERIFIED_SECONDS under a keyed digest of name and password (never
the password itself), so a study of many requests pays for it once. Failed Basic sign-ins are
throttled per user name as on the dashboard (5 in 15 minutes; by name rather than address, because
behind a reverse proxy every request comes from the proxy's address).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
import time
from dataclasses import dataclass

from ..config import ConfigError, Settings
from ..users import ADMIN, Throttle, check_login, is_user, same

VERIFIED_SECONDS = 300.0
_MAX_VERIFIED = 256
TOKEN_PRINCIPAL = "token"  # how a bearer-token sender is named in the audit trail


@dataclass(frozen=True)
class Verdict:
    principal: str | None  # who: "token" or the user name; None when not signed in
    problem: str | None = None  # why not (for the audit trail: never a credential)
    throttled: bool = False


class Credentials:
    def __init__(self, settings: Settings, environ=None):
        d = settings.dicomweb
        env = os.environ if environ is None else environ
        self.settings = settings
        self.token = d.token or (env.get(d.token_env) if d.token_env else None) or None
        self.web_users = d.web_users
        if d.token_env and not self.token and d.web_users == "none":
            raise ConfigError(f"dicomweb.token_env names {d.token_env}, which is not set: no sender could sign in")
        self.throttle = Throttle()
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, tuple[str, float]] = {}
        self._lock = threading.Lock()

    @property
    def schemes(self) -> list[str]:
        """The WWW-Authenticate challenges of a 401."""
        out = ['Bearer realm="osteoscreen"'] if self.token else []
        if self.web_users != "none":
            out.append('Basic realm="osteoscreen", charset="UTF-8"')
        return out

    def check(self, authorization: str | None) -> Verdict:
        if not authorization:
            return Verdict(None, "no credentials")
        scheme, _, value = authorization.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer":
            if self.token and value and same(value, self.token):
                return Verdict(TOKEN_PRINCIPAL)
            return Verdict(None, "wrong bearer token" if self.token else "bearer tokens not accepted")
        if scheme == "basic":
            if self.web_users == "none":
                return Verdict(None, "HTTP Basic not accepted (dicomweb.web_users is none)")
            return self._basic(value)
        return Verdict(None, "unsupported authorization scheme")

    def _basic(self, value: str) -> Verdict:
        try:
            name, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return Verdict(None, "malformed HTTP Basic credentials")
        if not sep or not name:
            return Verdict(None, "malformed HTTP Basic credentials")
        name = name[:64]
        key = f"user:{name}"
        who = f"user {name}" if is_user(self.settings, name) else "an unknown user name"  # no stray text audited
        if self.throttle.blocked(key):
            return Verdict(None, f"too many failed sign-ins for {who}", throttled=True)
        digest = hmac.new(self._key, f"{name}\0{password}".encode("utf-8"), hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(digest)
        if hit and hit[1] > now:
            return Verdict(hit[0])
        user = check_login(self.settings, name, password)
        if user is None:
            self.throttle.failed(key)
            return Verdict(None, f"wrong password for {who}")
        if self.web_users == "admin" and user.role != ADMIN:
            return Verdict(None, f"user {name} is not an admin (dicomweb.web_users is admin)")
        self.throttle.succeeded(key)
        with self._lock:
            if len(self._verified) >= _MAX_VERIFIED:
                self._verified = {k: v for k, v in self._verified.items() if v[1] > now}
                if len(self._verified) >= _MAX_VERIFIED:
                    self._verified.clear()
            self._verified[digest] = (user.name, now + VERIFIED_SECONDS)
        return Verdict(user.name)
