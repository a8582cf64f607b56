"""Typed settings: defaults < config.yaml < environment (OSTEOSCREEN_*) < command-line flags.

Every setting is documented in config.yaml at the repository root; `settings` holds the sections'
names, types and defaults (re-exported here), this module loads and validates them. A bad value
raises ConfigError, which the CLI turns into exit code 2.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .settings import (DEFAULT_MODEL, DESTINATION_FORMS, PROJECT_ROOT, TLS, ConfigError,  # noqa: F401
                       Destination, DicomWebDestination, Drift, Outcomes, Output, Retention, Routing, Settings,
                       Web, parse_destination)
from .settings import DicomWeb  # noqa: F401 - the STOW-RS receiver's section

def _coerce(value: Any, default: Any, name: str) -> Any:
    """Convert a YAML/env value to the type of the default, or raise ConfigError."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, Path):
            return Path(value)
        if isinstance(default, list) and isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: {value!r} is not a valid {type(default).__name__}") from exc


_NULLABLE = ("database_url", "trusted_proxy_header", "secret_key", "metrics_token", "token", "token_env")
DICOMWEB_AUTH = ("none", "basic", "bearer")


def _destination(value: Any, name: str) -> Destination | DicomWebDestination:
    """One entry of `destinations`: AET@HOST:PORT[?tls], a DICOMweb URL, or either's mapping form."""
    if isinstance(value, (Destination, DicomWebDestination)):
        return value
    if isinstance(value, str):
        return parse_destination(value)
    if not isinstance(value, dict):
        raise ConfigError(f"setting {name}: each destination is {DESTINATION_FORMS}, or a mapping")
    try:
        return DicomWebDestination(**value) if "url" in value else Destination(**value)
    except TypeError as exc:  # an unknown or missing key; the message names keys, never values
        raise ConfigError(f"setting {name}: a destination is {{ae_title, host, port, tls}} or {{url, auth, "
                          f"username, password_env, token_env, ca_certificates, timeout}} ({exc})") from None


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown setting {name!r}")
        current = getattr(obj, key)
        if key == "destinations":
            # a string (OSTEOSCREEN_DESTINATIONS) lists several comma-separated, or is a YAML/JSON list
            # (the mapping form, with credentials' environment variables, from the environment too)
            if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError as exc:  # its own message would quote the text, maybe a password
                    mark = getattr(exc, "problem_mark", None)
                    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                    raise ConfigError(f"setting {name}: not a YAML list of destinations{where}") from None
            items = value if isinstance(value, list) else value.split(",") if isinstance(value, str) else [value]
            setattr(obj, key, [_destination(v, name) for v in items if not (isinstance(v, str) and not v.strip())])
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"setting {name} must be a mapping")
            _apply(current, value, prefix=f"{name}.")
        elif value is not None:
            setattr(obj, key, _coerce(value, current, name))
        elif key in _NULLABLE:
            setattr(obj, key, None)


def load(config_file: Path | str | None = None, overrides: dict | None = None,
         environ: dict[str, str] | None = None) -> Settings:
    """Build Settings from the config file, OSTEOSCREEN_* environment variables and CLI overrides."""
    settings = Settings()
    path = Path(config_file) if config_file else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must contain a mapping")
        _apply(settings, data)
    env = os.environ if environ is None else environ
    from_env = {k[len("OSTEOSCREEN_"):].lower(): v for k, v in env.items()
                if k.startswith("OSTEOSCREEN_") and k != "OSTEOSCREEN_CONFIG"}
    flat = {k: v for k, v in from_env.items() if "__" not in k}
    _apply(settings, flat)
    for k, v in from_env.items():  # nested: OSTEOSCREEN_OUTPUT__HEATMAPS=false
        if "__" in k:
            section, key = k.split("__", 1)
            _apply(settings, {section: {key: v}})
    _apply(settings, {k: v for k, v in (overrides or {}).items() if v is not None})
    _validate(settings)
    _validate_destinations(settings.destinations)
    return settings


def _validate(s: Settings) -> None:
    if not re.fullmatch(r"[ -~]{1,16}", s.ae_title) or s.ae_title.strip() == "" or "\\" in s.ae_title:
        raise ConfigError(f"ae_title {s.ae_title!r} must be 1-16 printable ASCII characters")
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"port {s.port} out of range")
    if s.settle_seconds < 0:
        raise ConfigError("settle_seconds must be >= 0")
    if s.model_threads < 1:
        raise ConfigError(f"model_threads must be at least 1, got {s.model_threads}")
    if not 0 <= s.decode_threads <= 256:
        raise ConfigError(f"decode_threads must be between 0 (one per core) and 256, got {s.decode_threads}")
    if not 1 <= s.listen_processes <= 64:
        raise ConfigError(f"listen_processes must be between 1 and 64, got {s.listen_processes}")
    if s.worker_batch_studies < 1:
        raise ConfigError(f"worker_batch_studies must be at least 1, got {s.worker_batch_studies}")
    if s.model_precision not in ("fp32", "mixed"):
        raise ConfigError(f"model_precision {s.model_precision!r} must be fp32 or mixed")
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {s.device!r} must be auto, cpu or cuda")
    _validate_calibrations(s)
    _validate_listener(s)
    _validate_output(s.output)
    _validate_dispatch_retention(s)
    _validate_web(s.web)
    if not 0 <= s.outcomes.match_days <= 3660:
        raise ConfigError(f"outcomes.match_days must be between 0 and 3660 days, got {s.outcomes.match_days}")
    _validate_drift(s.drift)
    _validate_stow_receiver(s)


def _validate_drift(d: Drift) -> None:
    if d.window_studies < 5 or d.min_studies < 5 or d.min_studies > d.window_studies:
        raise ConfigError(f"drift.window_studies ({d.window_studies}) and drift.min_studies ({d.min_studies}) "
                          "must be at least 5, min_studies at most window_studies")
    if d.window_days < 0 or d.silent_hours < 0 or d.check_minutes <= 0:
        raise ConfigError("drift.window_days and drift.silent_hours must be >= 0 (0: off), "
                          "drift.check_minutes > 0")
    if not 0 < d.alpha < 0.5:
        raise ConfigError(f"drift.alpha must lie between 0 and 0.5, got {d.alpha}")


def _validate_calibrations(s: Settings) -> None:
    if not 0.5 <= s.interval_level < 1.0:
        raise ConfigError(f"interval_level must be at least 0.5 and below 1, got {s.interval_level}")
    if not isinstance(s.calibrations, dict):
        raise ConfigError("calibrations must map scanner keys (Manufacturer|ModelName) to calibration files")
    for key, path in s.calibrations.items():
        parts = str(key).split("|")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip() or any(
                not re.fullmatch(r"(station|serial)=.+", p.strip()) for p in parts[2:]):
            raise ConfigError(f"calibrations: {key!r} is not Manufacturer|ModelName[|station=S][|serial=N]")
        if not Path(str(path)).is_file():
            raise ConfigError(f"calibrations: file {path} (for {key}) not found")


def _validate_listener(s: Settings) -> None:
    for aet in s.allowed_calling_aets:
        if not re.fullmatch(r"[ -~]{1,16}", str(aet)) or str(aet).strip() == "" or "\\" in str(aet):
            raise ConfigError(f"allowed_calling_aets: {aet!r} is not an AE title (1-16 printable ASCII characters)")
    for name in ("max_dataset_bytes", "min_free_disk_mb", "max_queued_jobs"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name} must be >= 0 (0 = no limit), got {getattr(s, name)}")
    t = s.tls
    if not 0 <= t.port <= 65535:
        raise ConfigError(f"tls.port {t.port} out of range")
    if bool(t.certificate) != bool(t.private_key):
        raise ConfigError("tls.certificate and tls.private_key go together")
    for name in ("certificate", "private_key", "ca_certificates"):
        value = getattr(t, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"tls.{name}: file {value} not found")
    if t.enabled:
        if not t.certificate:
            raise ConfigError("tls.enabled needs tls.certificate and tls.private_key")
        if t.keep_plain_port and t.port == s.port and t.port != 0:
            raise ConfigError(f"tls.port and port are both {t.port}: give TLS its own port")
    if t.require_client_certificate and not t.ca_certificates:
        raise ConfigError("tls.require_client_certificate needs tls.ca_certificates")


def _validate_output(o: Output) -> None:
    policies = ("all", "positives", "sr_only")
    classes = ("normal", "osteopenia", "osteoporosis")  # findings.CLASSES; config imports nothing of ours
    if o.policy not in policies:
        raise ConfigError(f"output.policy {o.policy!r} must be one of {', '.join(policies)}")
    categories = o.positive_categories
    if not isinstance(categories, list) or not categories or any(c not in classes for c in categories):
        raise ConfigError(f"output.positive_categories {categories!r} must be a non-empty list of "
                          f"{', '.join(classes)}")


def _validate_dispatch_retention(s: Settings) -> None:
    if not 0.05 <= s.dispatch_poll_seconds <= 60:
        raise ConfigError(f"dispatch_poll_seconds must be between 0.05 and 60, got {s.dispatch_poll_seconds}")
    if s.dispatch_circuit_failures < 0:
        raise ConfigError(f"dispatch_circuit_failures must be >= 0 (0: no circuit breaker), "
                          f"got {s.dispatch_circuit_failures}")
    if s.dispatch_circuit_open_seconds <= 0:
        raise ConfigError(f"dispatch_circuit_open_seconds must be > 0, got {s.dispatch_circuit_open_seconds}")
    r = s.retention
    for name in ("spool_days", "outbox_days", "rows_days"):
        if getattr(r, name) < 0:
            raise ConfigError(f"retention.{name} must be >= 0 (0: keep forever), got {getattr(r, name)}")
    if r.interval_minutes <= 0:
        raise ConfigError(f"retention.interval_minutes must be > 0, got {r.interval_minutes}")


def _validate_destinations(destinations: list) -> None:
    """Each destination once; a DICOMweb one's credentials complete (no message repeats a secret). That
    the environment holds them is checked by the dispatch role, the only one that needs them."""
    seen = set()
    for d in destinations:
        if str(d) in seen:
            raise ConfigError(f"destinations: {d} appears twice")
        seen.add(str(d))
        if isinstance(d, DicomWebDestination):
            _validate_dicomweb_destination(d)


def _validate_dicomweb_destination(d: DicomWebDestination) -> None:
    where = f"destination {d}"
    if d.auth not in DICOMWEB_AUTH:
        raise ConfigError(f"{where}: auth {d.auth!r} must be one of {', '.join(DICOMWEB_AUTH)}")
    given = {k for k in ("username", "password", "password_env", "token", "token_env") if getattr(d, k)}
    allowed = {"none": set(), "basic": {"username", "password", "password_env"},
               "bearer": {"token", "token_env"}}[d.auth]
    if given - allowed:
        raise ConfigError(f"{where}: {', '.join(sorted(given - allowed))} do not go with auth {d.auth} "
                          "(auth: basic takes username and password_env; auth: bearer takes token_env)")
    secret_keys = {"basic": ("password", "password_env"), "bearer": ("token", "token_env")}.get(d.auth)
    if secret_keys:
        if d.auth == "basic" and not d.username:
            raise ConfigError(f"{where}: auth basic needs a username")
        inline, variable = secret_keys
        if bool(getattr(d, inline)) == bool(getattr(d, variable)):
            raise ConfigError(f"{where}: auth {d.auth} needs exactly one of {variable} (an environment "
                              f"variable's name, preferred) and {inline}")
        name = getattr(d, variable)
        if name is not None and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name))
                                 or str(name).upper().startswith("OSTEOSCREEN_")):
            raise ConfigError(f"{where}: {variable} {name!r} must name an environment variable, not "
                              "OSTEOSCREEN_… (those are settings)")
    if d.ca_certificates is not None:
        if not d.url.startswith("https://"):
            raise ConfigError(f"{where}: ca_certificates applies to https:// URLs only")
        if not Path(str(d.ca_certificates)).is_file():
            raise ConfigError(f"{where}: ca_certificates file {d.ca_certificates} not found")
    if isinstance(d.timeout, bool) or not isinstance(d.timeout, (int, float)) or not 0 < d.timeout <= 3600:
        raise ConfigError(f"{where}: timeout must be a number of seconds above 0 (at most 3600)")


WEB_ROLES = ("admin", "read-only")


def _validate_web(w: Web) -> None:
    if not 0 <= w.port <= 65535:
        raise ConfigError(f"web.port {w.port} out of range")
    if not isinstance(w.users, list):
        raise ConfigError("web.users must be a list of {name, password_hash, role}")
    names = set()
    for i, u in enumerate(w.users):
        if not isinstance(u, dict) or set(u) - {"name", "password_hash", "role"} or not u.get("name") \
                or not u.get("password_hash"):
            raise ConfigError(f"web.users[{i}] must be {{name, password_hash, role}} "
                              "(password_hash from `osteoscreen web hash-password`)")
        if u.get("role", "read-only") not in WEB_ROLES:
            raise ConfigError(f"web.users[{i}].role {u.get('role')!r} must be one of {', '.join(WEB_ROLES)}")
        if ":" not in str(u["password_hash"]) or str(u["password_hash"]).count("$") < 2:
            raise ConfigError(f"web.users[{i}].password_hash is not a password hash: store the output of "
                              "`osteoscreen web hash-password`, never the password")
        if u["name"] in names:
            raise ConfigError(f"web.users: {u['name']!r} appears twice")
        names.add(u["name"])
    for entry in w.trusted_proxies:
        try:
            ipaddress.ip_network(str(entry), strict=False)
        except ValueError:
            raise ConfigError(f"web.trusted_proxies: {entry!r} is not an IP address or network") from None
    if w.proxy_role not in WEB_ROLES:
        raise ConfigError(f"web.proxy_role {w.proxy_role!r} must be one of {', '.join(WEB_ROLES)}")
    if w.session_hours <= 0:
        raise ConfigError("web.session_hours must be > 0")
    if w.page_size < 1:
        raise ConfigError("web.page_size must be at least 1")


STOW_WEB_USERS = ("none", "admin", "all")


def _validate_stow_receiver(s: Settings) -> None:
    """The `dicomweb` section: the STOW-RS receiver of the listen role."""
    d = s.dicomweb
    if not 0 <= d.port <= 65535:
        raise ConfigError(f"dicomweb.port {d.port} out of range")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)*/?", d.base_path or "") or "/../" in f"{d.base_path}/" \
            or "/./" in f"{d.base_path}/":
        raise ConfigError(f"dicomweb.base_path {d.base_path!r} must be a URL path such as /dicom-web (or /)")
    d.base_path = d.base_path.rstrip("/")  # "" for /: POST /studies
    if d.web_users not in STOW_WEB_USERS:
        raise ConfigError(f"dicomweb.web_users {d.web_users!r} must be one of {', '.join(STOW_WEB_USERS)}")
    if d.token is not None and (not isinstance(d.token, str) or len(d.token) < 16 or not d.token.isprintable()
                                or any(c.isspace() for c in d.token)):
        raise ConfigError("dicomweb.token must be at least 16 printable characters without spaces "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if d.token_env is not None and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(d.token_env))
                                    or str(d.token_env).upper().startswith("OSTEOSCREEN_")):
        raise ConfigError(f"dicomweb.token_env {d.token_env!r} must name an environment variable, not "
                          "OSTEOSCREEN_… (those are settings: OSTEOSCREEN_DICOMWEB__TOKEN sets dicomweb.token)")
    if d.token and d.token_env:
        raise ConfigError("dicomweb: give token or token_env, not both")
    if d.max_request_bytes < 1 or d.retry_after_seconds < 1 or not 1 <= d.threads <= 64:
        raise ConfigError("dicomweb.max_request_bytes and dicomweb.retry_after_seconds must be at least 1, "
                          "dicomweb.threads between 1 and 64")
    if d.enabled:
        if not (d.token or d.token_env or d.web_users != "none"):
            raise ConfigError("dicomweb.enabled needs a way in: dicomweb.token, dicomweb.token_env or "
                              "dicomweb.web_users (admin or all, with web.users)")
        if d.web_users != "none" and not s.web.users and not (d.token or d.token_env):
            raise ConfigError(f"dicomweb.web_users is {d.web_users} but web.users is empty")
        if d.port and d.port == s.web.port and s.web.enabled:
            raise ConfigError(f"dicomweb.port and web.port are both {d.port}: give each its own port")


def dump(s: Settings) -> dict:
    """Settings as a config.yaml mapping (paths as text, destinations as AET@HOST:PORT[?tls] or a DICOMweb
    destination's mapping, which names the environment variables of its secrets rather than their values):
    what a child process is started with, so that it runs with exactly its parent's settings."""
    def plain(value):
        if isinstance(value, Destination):
            return str(value)
        if isinstance(value, DicomWebDestination):
            return value.to_config()
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    return plain(s)
