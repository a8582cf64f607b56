"""The settings' shape: every section as a typed dataclass with its defaults, and ConfigError.

config.yaml at the repository root documents each setting; `config.load` fills these from the
file, the environment and the flags, and validates them."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PROJECT_ROOT / "models" / "osteoscreen-v0.3.pt"


class ConfigError(ValueError):
    """A setting is missing, malformed or contradictory."""


@dataclass
class Destination:
    ae_title: str
    host: str
    port: int
    tls: bool = False  # send over DICOM TLS (client side of the `tls` settings)

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """Parse AET@HOST:PORT, the form used on the command line; AET@HOST:PORT?tls sends over TLS."""
        m = re.fullmatch(r"([^@]{1,16})@([^:?]+):(\d{1,5})(\?tls)?", text.strip())
        if not m:
            raise ConfigError(f"destination {text!r} is not AET@HOST:PORT or AET@HOST:PORT?tls")
        return cls(m.group(1), m.group(2), int(m.group(3)), bool(m.group(4)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("?tls" if self.tls else "")


DESTINATION_FORMS = "AET@HOST:PORT, AET@HOST:PORT?tls or a DICOMweb base URL (https://host[:port]/path)"
DESTINATION_MAX_CHARS = 128  # the destination column of deliveries and circuits


def _dicomweb_url(text) -> str:
    """A DICOMweb base URL, normalised (scheme in lower case, no trailing slash), or ConfigError."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"DICOMweb destination url {text!r} is not a URL")
    text = text.strip()
    if re.search(r"://[^/?#]*@", text):  # checked first, so that no message below repeats a password
        # never in the URL: the URL is the destination's name in the database, the audit trail and the logs
        raise ConfigError("DICOMweb destination: credentials do not belong in the URL; use auth with "
                          "username and password_env, or token_env")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise ConfigError(f"DICOMweb destination {text!r} is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"DICOMweb destination {text!r} must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ConfigError(f"DICOMweb destination {text!r}: a base URL has no query or fragment")
    url = f"{parts.scheme.lower()}://{parts.netloc}{parts.path.rstrip('/')}"
    if len(url) > DESTINATION_MAX_CHARS:
        raise ConfigError(f"DICOMweb destination {url!r} is longer than {DESTINATION_MAX_CHARS} characters")
    return url


@dataclass
class DicomWebDestination:
    """A DICOMweb destination: results are stored there with STOW-RS (POST <url>/studies).

    Its text is the base URL alone, the key of its deliveries, circuit, audit events and metrics, so a
    credential never becomes part of it: the password or token comes from the environment variable
    `password_env` / `token_env` names (preferred), or from `password` / `token` in the config file."""
    url: str
    auth: str = "none"  # none | basic | bearer
    username: str | None = None  # basic
    password_env: str | None = None  # basic: the environment variable that holds the password
    password: str | None = field(default=None, repr=False)  # basic: the password itself (prefer password_env)
    token_env: str | None = None  # bearer: the environment variable that holds the token
    token: str | None = field(default=None, repr=False)  # bearer: the token itself (prefer token_env)
    ca_certificates: str | None = None  # https: PEM bundle to trust (default tls.ca_certificates, else certifi's)
    timeout: float = 30.0  # seconds to connect, and to wait for the answer once the request is sent

    def __post_init__(self) -> None:
        self.url = _dicomweb_url(self.url)

    def __str__(self) -> str:
        return self.url

    def secret(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The password (basic) or the token (bearer), from its environment variable when one is named."""
        env = os.environ if environ is None else environ
        if self.auth == "basic":
            return env.get(self.password_env) if self.password_env else self.password
        if self.auth == "bearer":
            return env.get(self.token_env) if self.token_env else self.token
        return None

    def to_config(self) -> dict:
        """The mapping form of config.yaml (settings left at their defaults omitted)."""
        values = {"url": self.url, "auth": self.auth, "username": self.username, "password_env": self.password_env,
                  "password": self.password, "token_env": self.token_env, "token": self.token,
                  "ca_certificates": self.ca_certificates, "timeout": self.timeout}
        defaults = {"auth": "none", "timeout": 30.0}
        return {k: v for k, v in values.items() if v is not None and defaults.get(k) != v}


def parse_destination(text: str) -> Destination | DicomWebDestination:
    """A destination as the command line and the list form write it: a DICOMweb base URL (http:// or
    https://), or AET@HOST:PORT[?tls] for DIMSE."""
    if "://" in text:  # a URL: only http(s) is one we send to (and its errors never repeat a password)
        return DicomWebDestination(text)
    try:
        return Destination.parse(text)
    except ConfigError:
        raise ConfigError(f"destination {text!r} is not {DESTINATION_FORMS}") from None


@dataclass
class Routing:
    modalities: list[str] = field(default_factory=lambda: ["CR", "DX"])
    hip_keywords: list[str] = field(default_factory=lambda: ["HIP", "PELVIS", "PELV", "FEMUR", "BECKEN"])
    lumbar_keywords: list[str] = field(default_factory=lambda: ["LSPINE", "LUMBAR", "L-SPINE", "LWS", "L SPINE"])
    ap_views: list[str] = field(default_factory=lambda: ["AP", "PA"])
    lateral_views: list[str] = field(default_factory=lambda: ["LL", "RL", "LAT", "LATERAL", "RLD", "LLD"])


@dataclass
class Output:
    # all: SR + heatmaps + KOS when positive; positives: the same, but only for studies with a positive
    # site (other studies send nothing; their findings are still recorded); sr_only: the SR alone.
    policy: str = "all"
    series_number_sr: int = 9901
    series_number_heatmap: int = 9902
    series_number_kos: int = 9903
    series_description_sr: str = "osteoscreen bone density SR"
    series_description_heatmap: str = "osteoscreen heatmap"
    series_description_kos: str = "osteoscreen positive findings"
    heatmaps: bool = True
    kos: bool = True  # a Key Object Selection document flagging the positive images (not under sr_only)
    positive_categories: list[str] = field(default_factory=lambda: ["osteoporosis"])


@dataclass
class TLS:
    """DICOM TLS: the listener's TLS port, and the node's identity and trust for TLS destinations."""
    enabled: bool = False  # listen for TLS associations on `port` below
    port: int = 2762
    keep_plain_port: bool = True  # with TLS enabled, also keep the unencrypted Settings.port open
    certificate: str | None = None  # PEM: our certificate (chain); server, and client for TLS destinations
    private_key: str | None = None  # PEM, unencrypted
    ca_certificates: str | None = None  # PEM bundle of trusted CAs (peers' certificates); none: system store
    require_client_certificate: bool = False  # listener: refuse TLS peers without a certificate from a CA
    check_hostname: bool = True  # sender: the destination's certificate must name its host


@dataclass
class Retention:
    """What the listen role's retention job removes, by age in days (0 = keep forever)."""
    spool_days: float = 30.0  # received images of studies reported (or skipped) this long ago
    outbox_days: float = 30.0  # result files delivered this long ago (a study's latest SR is kept)
    rows_days: float = 0.0  # database rows of done studies (instances, jobs, findings, deliveries)
    interval_minutes: float = 60.0  # how often the job runs


@dataclass
class Web:
    """The dashboard and /metrics (`osteoscreen web`; `serve` starts it too when enabled)."""
    enabled: bool = True  # `serve` runs the dashboard beside the DICOM roles
    bind_address: str = "127.0.0.1"  # 0.0.0.0 in a container, or behind a reverse proxy on another host
    port: int = 8080
    # [{name, password_hash, role}]: role admin (acknowledge, resend) or read-only;
    # password_hash from `osteoscreen web hash-password`
    users: list = field(default_factory=list)
    # Sign-in by a reverse proxy that authenticated the user: it sets this header (e.g. X-Forwarded-User).
    # Only requests from trusted_proxies may use it; those users get proxy_role unless in proxy_admins.
    trusted_proxy_header: str | None = None
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    proxy_role: str = "read-only"
    proxy_admins: list[str] = field(default_factory=list)
    secret_key: str | None = None  # signs session cookies; default: made once, kept in <storage>/web-secret
    session_hours: float = 8.0  # a sign-in ends this long after it began
    secure_cookies: bool = False  # mark the session cookie Secure (HTTPS only): true behind a TLS proxy
    metrics_token: str | None = None  # when set, /metrics needs "Authorization: Bearer <token>"
    page_size: int = 50


@dataclass
class DicomWeb:
    """The STOW-RS receiver (DICOMweb Store, PS3.18 §10.5) that the listen role runs beside the DICOM
    port: POST {base_path}/studies[/{StudyInstanceUID}] on its own HTTP port (docs/DEPLOYMENT.md)."""
    enabled: bool = False
    bind_address: str = "127.0.0.1"  # behind a TLS reverse proxy; 0.0.0.0 to take requests from the network
    port: int = 8081
    base_path: str = "/dicom-web"
    # bearer token senders present ("Authorization: Bearer <token>"), at least 16 characters; or the name of
    # the environment variable that holds it (token_env; not an OSTEOSCREEN_* name)
    token: str | None = None
    token_env: str | None = None
    web_users: str = "none"  # none | admin | all: which web.users may sign in with HTTP Basic
    max_request_bytes: int = 1 << 30  # a larger request body gets 413; each part also max_dataset_bytes
    retry_after_seconds: int = 60  # the Retry-After of a 503 (disk watermark, queue depth)
    threads: int = 4  # requests handled at once


@dataclass
class Drift:
    """The drift watch per scanner group (docs/MONITORING.md): a recent window of screened studies
    against a reference window (the group's first studies under its current calibration)."""
    window_studies: int = 30  # studies in each window (the recent one: the group's latest)
    window_days: float = 0.0  # > 0: the recent window is the last this many days instead (at least min_studies)
    min_studies: int = 20  # a window with fewer studies than this is "insufficient data"
    alpha: float = 0.05  # family-wise false-alarm level of one check (Bonferroni over the signals tested)
    silent_hours: float = 24.0  # a group that sent before and nothing for this long is "silent"; 0 = off
    check_minutes: float = 15.0  # how often the scheduler checks every group


@dataclass
class Outcomes:
    """DXA outcomes (`osteoscreen db outcomes import`): a DXA result is matched to the patient's screened
    study dated at most match_days before it (or on the same day)."""
    match_days: int = 365


@dataclass
class Settings:
    ae_title: str = "OSTEOSCREEN"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    storage: Path = Path("var")
    database_url: str | None = None  # default: SQLite inside storage
    destinations: list[Destination | DicomWebDestination] = field(default_factory=list)  # DIMSE or DICOMweb
    settle_seconds: float = 10.0
    # DCMTK's largest (ASC_MAXIMUMPDUSIZE): DCMTK senders then send 128 KiB PDUs, and pynetdicom spends
    # its per-PDU work on half as many (docs/BENCHMARKS.md)
    max_pdu: int = 131072
    # listener: who may associate, and what it may cost us
    allowed_calling_aets: list[str] = field(default_factory=list)  # empty: any calling AE title
    require_called_aet: bool = True  # the called AE title must be ae_title
    max_dataset_bytes: int = 1 << 30  # larger C-STORE data sets are refused (0xA700); 0 = no limit
    min_free_disk_mb: int = 1024  # below this free space on the spool's disk, C-STORE gets 0xA700; 0 = off
    max_queued_jobs: int = 10000  # queued + running screening jobs above which C-STORE gets 0xA700; 0 = off
    # processes receiving on the DICOM port (SO_REUSEPORT, Linux): concurrent senders use more than one core
    listen_processes: int = 1
    tls: TLS = field(default_factory=TLS)
    # worker
    model_path: Path = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda
    model_threads: int = 1  # torch CPU threads per process: a study's few crops run fastest on one
    # threads OpenJPEG may use to decode one JPEG 2000 image (0 = the process's cores, at most 4): a 17 MB pelvis
    # decodes in about half the time on 2 cores (docs/BENCHMARKS.md)
    decode_threads: int = 0
    # fp32, or mixed: the network under torch.autocast in bfloat16 (GPUs without it stay fp32), for GPU
    # throughput; estimates differ from fp32 in the second or third decimal
    model_precision: str = "fp32"
    # site calibrations (`osteoscreen calibrate`): scanner key "Manufacturer|ModelName[|station=S][|serial=N]"
    # → calibration file; the most specific key naming an image's scanner applies
    calibrations: dict = field(default_factory=dict)
    require_calibration: bool = False  # images from a scanner without one: not assessable (scanner_not_calibrated)
    interval_level: float = 0.9  # coverage of the T-score prediction intervals
    poll_seconds: float = 0.5
    lease_seconds: float = 120.0
    job_max_attempts: int = 3
    worker_batch_studies: int = 4  # jobs a worker claims at once; their sites share one model call
    # dispatch
    dispatch_poll_seconds: float = 0.5  # how often the dispatcher looks for due results (serve: also at once)
    dispatch_max_attempts: int = 8
    dispatch_backoff_seconds: float = 5.0
    dispatch_backoff_max_seconds: float = 600.0
    # circuit breaker per destination: this many consecutive association failures open it (0 = no breaker)
    dispatch_circuit_failures: int = 5
    dispatch_circuit_open_seconds: float = 60.0  # open this long, then one probe; doubles per failed probe
    routing: Routing = field(default_factory=Routing)
    output: Output = field(default_factory=Output)
    retention: Retention = field(default_factory=Retention)
    web: Web = field(default_factory=Web)
    outcomes: Outcomes = field(default_factory=Outcomes)
    drift: Drift = field(default_factory=Drift)
    dicomweb: DicomWeb = field(default_factory=DicomWeb)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.storage / 'osteoscreen.db').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.storage / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.storage / "outbox"
