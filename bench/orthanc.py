"""A private Orthanc PACS, and `osteoscreen serve` routed from it: the one start-up that the tests and
the benchmarks share.

Used by tests/test_orthanc.py (the round trip through a real PACS), tests/test_deployment.py (the demo
PACS's configuration starts) and bench/latency.py (end-to-end latency). It lives in bench/ because
the tests may import bench but bench never imports the tests; it needs only the standard library
and bench.common, so a clean clone imports it from the repository root without installing anything.
Test and benchmark infrastructure, not part of the osteoscreen package.

- `Orthanc(folder, node_port)`: its own free ports (or the ones given), storage and index under
  `folder`, the Lua script docker/orthanc/route.lua that the demo PACS of docker/compose.yaml runs
  (every stored CR/DX instance is sent to modality `osteoscreen`, here OSTEOSCREEN@127.0.0.1:node_port),
  OverwriteInstances (a re-sent image is stored and routed again, as a PACS re-routing a study would),
  no plugins. `config` overrides any setting (e.g. `{"Plugins": [...]}` for DICOMweb, `{"Name": ...}`),
  `base` replaces BASE_CONFIG (the demo PACS's JSON), `auth` is the REST API's user and password.
  REST helpers read it back; `store()` sends files to it with DCMTK storescu.
- `Node(storage, port, orthanc_dicom_port, settle_seconds=…)`: `osteoscreen serve` on 127.0.0.1:port
  sending its results to that Orthanc; `query()` reads its SQLite database (read-only).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import Proc, free_ports, port_open, require_tool, tail_of, wait_for

ROOT = Path(__file__).resolve().parent.parent
ROUTE_LUA = ROOT / "docker" / "orthanc" / "route.lua"  # shared with docker/compose.yaml's Orthanc

BASE_CONFIG = {
    "Name": "osteoscreen-test-pacs",
    "StorageCompression": False, "Plugins": [], "ExecuteLuaEnabled": False,
    "HttpServerEnabled": True, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "SslEnabled": False,
    "HttpDescribeErrors": True,
    "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
    "DicomCheckModalityHost": False, "DicomScuTimeout": 30, "DicomModalities": {},
    "OverwriteInstances": True, "SaveJobs": False, "ConcurrentJobs": 2, "StableAge": 3600,
}


def find_orthanc() -> str | None:
    """Orthanc lives in /usr/sbin, which a normal user's PATH may lack."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")


class Orthanc:
    """A private Orthanc: its own ports, storage and index, the forwarding Lua script."""

    def __init__(self, folder: Path, node_port: int | None = None, *, dicom_port: int | None = None,
                 http_port: int | None = None, config: dict | None = None, base: dict | None = None,
                 auth: tuple[str, str] | None = None, verbose: bool = False, binary: str | None = None,
                 start_timeout: float = 60):
        binary = binary or find_orthanc()
        if binary is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        if dicom_port is None or http_port is None:
            spare = iter(free_ports(2, exclude={node_port, dicom_port, http_port}))
            dicom_port, http_port = dicom_port or next(spare), http_port or next(spare)
        self.folder, self.dicom_port, self.http_port = Path(folder), dicom_port, http_port
        self._auth = None if auth is None else "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = {**(BASE_CONFIG if base is None else base), "StorageDirectory": str(self.folder / "storage"),
                    "IndexDirectory": str(self.folder / "storage"), "LuaScripts": [str(ROUTE_LUA)],
                    "HttpPort": http_port, "DicomPort": dicom_port}
        if node_port is not None:
            settings["DicomModalities"] = {"osteoscreen": ["OSTEOSCREEN", "127.0.0.1", node_port]}
        settings.update(config or {})
        self.settings = settings
        self.config_file = self.folder / "orthanc.json"
        self.config_file.write_text(json.dumps(settings, indent=2))
        self.log = self.folder / "orthanc.log"
        self._proc = Proc([binary, *(["--verbose"] if verbose else []), str(self.config_file)], self.log)
        self.proc = self._proc.proc
        up = wait_for(lambda: self.proc.poll() is not None or (port_open(dicom_port) and self._alive()),
                      start_timeout)
        if not up or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"Orthanc did not start:\n{tail_of(self.log, 6000)}")

    def _alive(self) -> bool:
        try:
            return self.get("/system")["DicomPort"] == self.dicom_port
        except (OSError, ValueError):
            return False

    def _open(self, path: str, data: bytes | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                         headers={"Authorization": self._auth} if self._auth else {})
        return urllib.request.urlopen(request, timeout=30)

    def get(self, path: str, data: bytes | None = None):
        """The JSON answer of the REST API (a POST when `data` is given)."""
        with self._open(path, data) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with self._open(path) as response:
            return response.read()

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's identifier of a study (None while it has none)."""
        for hit in self.get("/tools/lookup", study_uid.encode()):
            if hit.get("Type") == "Study":
                return hit["ID"]
        return None

    def instances(self, study_uid: str) -> list[dict]:
        """Each instance of the study: Orthanc ids and its simplified tags."""
        sid = self.study_id(study_uid)
        if sid is None:
            return []
        out = []
        for inst in self.get(f"/studies/{sid}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append({"id": inst["ID"], "series": inst["ParentSeries"], "study": sid, "tags": tags})
        return out

    def has_sr(self, sid: str) -> bool:
        """Whether the study (Orthanc's id) has a series of modality SR."""
        return any(s["MainDicomTags"].get("Modality") == "SR" for s in self.get(f"/studies/{sid}/series?expand"))

    def store(self, files: list[Path], j2k: bool = False, timeout: float = 300) -> float:
        """Send the files with DCMTK storescu (one association, as MODALITY); the JPEG 2000 files with
        -xv (JPEG 2000 lossless proposed: sent as stored, never transcoded). Returns the start time
        (time.time()); raises RuntimeError with storescu's output when it fails."""
        t0 = time.time()
        proc = subprocess.run([require_tool("storescu"), "-aet", "MODALITY", "-aec", "ORTHANC",
                               *(["-xv"] if j2k else []), "127.0.0.1", str(self.dicom_port), *map(str, files)],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {proc.stdout}{proc.stderr}"[:2000])
        return t0

    def stop(self, grace: float = 20) -> None:
        """SIGTERM, then SIGKILL if it does not go; safe to call twice."""
        self._proc.stop(grace)


class Node:
    """`osteoscreen serve` sending its results to Orthanc; its storage (and SQLite database) under
    `storage`, its log beside it. `env`: more environment (OSTEOSCREEN_… settings) for the node;
    `config_file`: a config.yaml for it (with `orthanc_dicom_port` None, its `destinations:` apply)."""

    def __init__(self, storage: Path, port: int, orthanc_dicom_port: int | None, *, settle_seconds: float,
                 env: dict | None = None, start_timeout: float = 120, config_file: Path | None = None):
        self.storage, self.port = Path(storage), port
        self.storage.mkdir(parents=True, exist_ok=True)
        self.log = self.storage.parent / "node.log"
        exe = Path(sys.executable).with_name("osteoscreen")
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "osteoscreen.cli"]
        args = [*command, "serve", "--port", str(port), "--ae-title", "OSTEOSCREEN", "--storage", str(self.storage),
                *(["--destination", f"ORTHANC@127.0.0.1:{orthanc_dicom_port}"] if orthanc_dicom_port else []),
                *(["--config", str(config_file)] if config_file else [])]
        environment = {**os.environ, "OSTEOSCREEN_SETTLE_SECONDS": str(settle_seconds),
                       "OSTEOSCREEN_BIND_ADDRESS": "127.0.0.1", "OSTEOSCREEN_WEB__PORT": "0", **(env or {})}
        self._proc = Proc(args, self.log, env=environment, port=port, start_timeout=start_timeout)
        self.proc = self._proc.proc

    def query(self, sql: str, *args, **params) -> list[tuple]:
        """Rows of a query on the node's database, read-only; parameters as `?` (args) or `:name` (params)."""
        con = sqlite3.connect(f"file:{self.storage / 'osteoscreen.db'}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, params or args).fetchall()
        finally:
            con.close()

    def stop(self) -> None:
        self._proc.stop(30)
