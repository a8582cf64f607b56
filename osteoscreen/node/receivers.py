"""Extra receiving processes for one DICOM port (`listen_processes` > 1).

A Python process receives on one core at a time, however many associations it serves; DCMTK's
storescp forks a process per association for the same reason. The listen role therefore starts
`listen_processes - 1` children (`osteoscreen listen --receive-only`) with exactly its own settings,
all binding the port with SO_REUSEPORT so that the kernel spreads new associations over them. The
children only receive (spool file, database rows, Success); the settle timer and retention stay
in the parent. Each child dies with its parent (PR_SET_PDEATHSIG), and a stopped parent stops them.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ..config import Settings, dump

log = logging.getLogger("osteoscreen.listener")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ReceiverProcesses:
    def __init__(self, settings: Settings, port: int):
        self.settings, self.port = settings, port
        self.procs: list[subprocess.Popen] = []
        self.config: Path | None = None

    def start(self) -> None:
        count = self.settings.listen_processes - 1
        values = dump(self.settings)
        values["port"] = self.port  # the port the parent bound (it may have been 0: any free port)
        values["tls"]["enabled"] = False  # TLS associations stay with the parent
        values["dicomweb"]["enabled"] = False  # so does the STOW-RS receiver (its own HTTP port)
        storage = Path(self.settings.storage)
        storage.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="receivers-", suffix=".yaml", dir=storage)
        with os.fdopen(fd, "w") as fh:  # 0600: the settings can hold password hashes and keys
            yaml.safe_dump(values, fh)
        self.config = Path(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OSTEOSCREEN_")}  # the file says all
        log_level = [] if log.getEffectiveLevel() > logging.DEBUG else ["-v"]
        for _ in range(count):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "osteoscreen.cli", *log_level, "listen", "--receive-only",
                 "--config", str(self.config)], env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))
        log.info("%d more receiving process(es) on port %d", count, self.port)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
        if self.config is not None:
            self.config.unlink(missing_ok=True)
