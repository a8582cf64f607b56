"""Small helpers shared by the bench modules: ports, waiting, `osteoscreen` processes, DICOM copies with
fresh UIDs, statistics, result rows, a bar chart, progress, and the stand-alone command line.

Peak RSS of processes lives in `bench.memory`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
OSTEOSCREEN = [sys.executable, "-m", "osteoscreen.cli"]
PG_ADMIN_DSN = os.environ.get("OSTEOSCREEN_BENCH_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test")


# -- network and waiting -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int, exclude: Iterable[int | None] = ()) -> list[int]:
    """`n` distinct free ports, none of them in `exclude`."""
    taken, ports = set(exclude), []
    while len(ports) < n:
        port = free_port()
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.2):
    """Poll `predicate` until it returns something truthy or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def tail_of(path: Path, chars: int = 3000) -> str:
    """The last `chars` characters of a log file ("" when it cannot be read)."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} is not installed (apt-get install dcmtk for storescu/storescp)")
    return path


# -- processes --------------------------------------------------------------------------------------
class Proc:
    """A child process with its own log file; `port` (if given) is waited for after the start.
    Use as a context manager, or call stop() in a finally: it always ends the process."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, port: int | None = None,
                 start_timeout: float = 120.0):
        self.args, self.log, self.port = args, Path(log), port
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if port is not None:
            wait_for(lambda: port_open(port) or self.proc.poll() is not None, start_timeout)
        if self.proc.poll() is not None or (port is not None and not port_open(port)):
            self.stop()
            raise RuntimeError(f"{args[0:4]} did not start; log tail:\n{self.tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return tail_of(self.log, n)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def osteoscreen_env(**settings) -> dict:
    """os.environ plus OSTEOSCREEN_<KEY>=value for each keyword (nested keys with a double underscore)."""
    env = {**os.environ, "OSTEOSCREEN_BIND_ADDRESS": "127.0.0.1", "OSTEOSCREEN_DEVICE": "cpu",
           "PYTHONUNBUFFERED": "1"}
    env.update({f"OSTEOSCREEN_{k.upper()}": str(v) for k, v in settings.items()})
    return env


# -- PostgreSQL ----------------------------------------------------------------------------------------
def pg_available() -> bool:
    try:
        import psycopg
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False


class PgDatabase:
    """A throwaway PostgreSQL database (created on enter, dropped WITH (FORCE) on exit); `.url` is the
    SQLAlchemy URL the node takes."""

    def __init__(self, prefix: str = "osteo_bench"):
        import uuid
        self.name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        params = dict(p.split("=", 1) for p in PG_ADMIN_DSN.split())
        self.url = (f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
                    f"{params.get('port', '5432')}/{self.name}")

    def _admin(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as c:
            c.execute(sql)

    def __enter__(self) -> "PgDatabase":
        self._admin(f'CREATE DATABASE "{self.name}"')
        return self

    def __exit__(self, *exc) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# -- DICOM -------------------------------------------------------------------------------------------
def renew_uids(ds, tag: str | None = None):
    """Give a dataset (in place) fresh Study, Series and SOP Instance UIDs, so that a copy is a new study
    to a receiver (a re-sent SOP Instance UID is a duplicate); `tag` also renews patient name/ID."""
    from pydicom.uid import generate_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if tag is not None:
        ds.PatientID, ds.PatientName = tag[:64], f"BENCH^{tag}"[:64]
        ds.AccessionNumber = tag[:16]
    return ds


def storescu_args(port: int, files: Iterable[Path], called: str = "OSTEOSCREEN") -> list[str]:
    """DCMTK storescu sending every file in one association."""
    return [require_tool("storescu"), "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port),
            *map(str, files)]


# -- statistics and rows -----------------------------------------------------------------------------
def percentile(values: Iterable[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50)


def row(measure: str, value: float, unit: str, *, reference: str | None = None,
        reference_value: float | None = None, ratio: float | None = None, target: str | None = None,
        met: bool | None = None, note: str | None = None) -> dict:
    """One result row in the runner's format. `ratio` defaults to value / reference_value when a
    reference value is given (pass it explicitly where lower is better or the ratio is inverted)."""
    if ratio is None and reference_value not in (None, 0) and value is not None:
        ratio = value / reference_value
    clean = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)  # noqa: E731
    return {"measure": measure, "value": clean(value), "unit": unit, "reference": reference,
            "reference_value": clean(reference_value), "ratio": None if ratio is None else round(float(ratio), 4),
            "target": target, "met": met, "note": note}


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -- output ------------------------------------------------------------------------------------------
def progress_bar(total: int | None, desc: str, enabled: bool):
    """A tqdm bar on stderr (a do-nothing one when not enabled)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def bar_chart(path: Path, title: str, ylabel: str, groups: list[str], series: dict[str, list[float]],
              value_format: str = "{:.0f}", target: float | None = None, target_label: str = "target") -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series (label → values per group);
    `target` draws a dashed horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    n = max(1, len(series))
    width = 0.8 / n
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [0 if v is None else v for v in values], width, label=label)
        for bar, v in zip(bars, values):
            if v is not None:
                ax.annotate(value_format.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    if target is not None:
        ax.axhline(target, color="crimson", linestyle="--", linewidth=1, label=target_label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if n > 1 or target is not None:
        ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def print_rows(result: dict, file=sys.stdout) -> None:
    headers = ["measure", "value", "reference", "ratio", "target", "met"]
    lines = []
    for r in result["rows"]:
        ref = f"{r['reference']}: {r['reference_value']:.4g}" if r.get("reference") and r.get(
            "reference_value") is not None else (r.get("reference") or "-")
        lines.append([r["measure"], "-" if r["value"] is None else f"{r['value']:.4g} {r['unit']}", ref,
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}x", r.get("target") or "-",
                      "-" if r.get("met") is None else ("met" if r["met"] else "MISSED")])
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(headers)]
    print(f"== {result['name']}", file=file)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)), file=file)
    for x in lines:
        print("  ".join(c.ljust(w) for c, w in zip(x, widths)), file=file)
    for r in result["rows"]:
        if r.get("note"):
            print(f"  * {r['measure']}: {r['note']}", file=file)


def cli(run: Callable[..., dict], name: str, argv: list[str] | None = None) -> int:
    """`python -m bench.<name> [--quick] [--workdir DIR] [--quiet] [--json OUT]`: run one module alone,
    print its rows as a table and the whole result as JSON."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    p.add_argument("--quick", action="store_true", help="smoke sizes (well under a minute)")
    p.add_argument("--workdir", default=str(ROOT / "var" / "bench" / name))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    result = run(quick=args.quick, workdir=workdir, progress=not args.quiet)
    result.setdefault("raw", {})["seconds"] = round(time.monotonic() - t0, 1)
    print_rows(result)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0
