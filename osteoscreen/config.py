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

from .settings import (DEFAULT_MODEL, PROJECT_ROOT, TLS, ConfigError, Destination, Drift, Outcomes,  # noqa: F401
                       Output, Retention, Routing, Settings, Web)

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


_NULLABLE = ("database_url", "trusted_proxy_header", "secret_key", "metrics_token")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown setting {name!r}")
        current = getattr(obj, key)
        if key == "destinations":
            items = value if isinstance(value, list) else [value]
            try:
                setattr(obj, key, [v if isinstance(v, Destination) else
                                   Destination.parse(v) if isinstance(v, str) else Destination(**v) for v in items])
            except TypeError as exc:
                raise ConfigError(f"setting {name}: each destination is AET@HOST:PORT or "
                                  "{ae_title, host, port}") from exc
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


def dump(s: Settings) -> dict:
    """Settings as a config.yaml mapping (paths as text, destinations as AET@HOST:PORT[?tls]): what a
    child process is started with, so that it runs with exactly its parent's settings."""
    def plain(value):
        if isinstance(value, Destination):
            return str(value)
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value
    return plain(s)
