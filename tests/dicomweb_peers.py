"""HTTP peers for the STOW-RS client's tests (tests/test_dicomweb_send.py): Orthanc with its DICOMweb
plugin, QIDO-RS against it, and two small HTTP servers on real sockets in a thread of the test:

- `Stub`: answers every POST with what the test says (a status, a DICOM JSON body), records each
  request's headers and body, and can hold its answer back (a destination that times out);
- `Front`: a reverse proxy in front of Orthanc's DICOMweb. Orthanc (1.10 here) checks HTTP Basic
  credentials only (RegisteredUsers); bearer tokens need its authorization plugin, which is not
  installed and itself asks an outside web service. So the bearer destination is this proxy: it
  checks `Authorization: Bearer <token>` and forwards the request, with Orthanc's Basic credentials,
  to the real Orthanc, which stores it and answers. With `tls` it speaks HTTPS: Debian's Orthanc 1.10.1
  with SslEnabled closed every connection right after the TLS handshake here (curl: "empty reply from
  server"), so TLS ends at this proxy, as it would at an nginx in front of a PACS. `drop_class` removes that SOP class's instances
  from the ReferencedSOPSequence of Orthanc's 200 answer: a server that says OK but omits instances.
Both refuse a request without Content-Length (411), so a chunked upload cannot pass unnoticed.
"""
from __future__ import annotations

import base64
import json
import ssl
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.orthanc import Orthanc

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD, TOKEN = "osteoscreen", "s3cret-Pacs-Passw0rd", "tok-7f3a9c1e5b2d4f60"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture (the heatmaps)
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document


def basic(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def dicomweb_orthanc(folder: Path, node_port: int | None = None, *, config: dict | None = None,
                     **kwargs) -> Orthanc:
    """A private Orthanc serving DICOMweb at /dicom-web/, every request needing USER's Basic credentials."""
    return Orthanc(folder, node_port, auth=(USER, PASSWORD), config={
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, **(config or {})}, **kwargs)



def qido(orthanc: Orthanc, path: str) -> list[dict]:
    """A QIDO-RS answer (DICOM JSON) from Orthanc's DICOMweb server; [] when it has no match."""
    request = urllib.request.Request(f"http://127.0.0.1:{orthanc.http_port}/dicom-web{path}",
                                     headers={"Authorization": basic(), "Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body.strip() else []


def value(item: dict, tag: str):
    """The first value of a DICOM JSON element (None when absent)."""
    return ((item.get(tag) or {}).get("Value") or [None])[0]


def stow_response(stored: list[tuple[str, str]] = (), failed: list[tuple[str, str, int]] = (),
                  warnings: dict[str, int] | None = None) -> dict:
    """A STOW-RS response data set: stored (class, instance) pairs, failed (class, instance, reason)."""
    def ref(cls, uid, extra=None):
        return {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [uid]}, **(extra or {})}
    warnings = warnings or {}
    return {"00081199": {"vr": "SQ", "Value": [ref(c, u, {"00081196": {"vr": "US", "Value": [warnings[u]]}}
                                                    if u in warnings else None) for c, u in stored]},
            "00081198": {"vr": "SQ", "Value": [ref(c, u, {"00081197": {"vr": "US", "Value": [r]}})
                                                for c, u, r in failed]}}


class _Server:
    def __init__(self, handler_class, tls: tuple[Path, Path] | None = None):
        self.requests: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        if tls is not None:  # (certificate, key): HTTPS; a client that does not trust it fails the handshake
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*map(str, tls))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.server.peer = self
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def record(self) -> dict | None:
        """The request (headers, body), recorded; None (and 411 sent) without a Content-Length."""
        peer = self.server.peer
        record = {"path": self.path, "authorization": self.headers.get("Authorization"),
                  "content_type": self.headers.get("Content-Type"), "accept": self.headers.get("Accept"),
                  "content_length": self.headers.get("Content-Length"),
                  "transfer_encoding": self.headers.get("Transfer-Encoding")}
        peer.requests.append(record)
        if record["content_length"] is None or "chunked" in (record["transfer_encoding"] or "").lower():
            self.answer(411, b"")
            return None
        record["body"] = self.rfile.read(int(record["content_length"]))
        return record

    def answer(self, status: int, payload: bytes, content_type: str | None = "application/dicom+json",
               headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Stub(_Server):
    """answer(record) -> (status, JSON-able body or bytes[, content type]); `hold` makes it wait first."""

    def __init__(self, answer):
        self.answer, self.release = answer, threading.Event()
        self.hold = False

        class Handler(_Handler):
            def do_POST(self):
                peer = self.server.peer
                record = self.record()
                if record is None:
                    return
                if peer.hold:
                    peer.release.wait(30)
                status, payload, *ctype = peer.answer(record)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.answer(status, data, *(ctype or ["application/dicom+json"]))
        super().__init__(Handler)

    def stop(self) -> None:
        self.release.set()
        super().stop()


class Front(_Server):
    """Forwards POSTs to Orthanc's DICOMweb; `token`: checks the bearer token and forwards with Orthanc's
    Basic credentials (without: the client's Authorization is passed on); `drop_class`: see the module;
    `tls` (certificate, key): speaks HTTPS, as a TLS-terminating proxy (nginx …) in front of a PACS does."""

    def __init__(self, orthanc: Orthanc, *, token: str | None = None, drop_class: str | None = None,
                 tls: tuple[Path, Path] | None = None):
        self.upstream, self.token, self.drop_class = f"http://127.0.0.1:{orthanc.http_port}", token, drop_class
        self.dropped: list[str] = []

        class Handler(_Handler):
            def do_POST(self):
                peer = self.server.peer
                record = self.record()
                if record is None:
                    return
                body, authorization = record["body"], record["authorization"]
                if peer.token is not None:
                    if authorization != f"Bearer {peer.token}":
                        self.answer(401, b"", None, {"WWW-Authenticate": "Bearer"})
                        return
                    authorization = basic()
                forward = urllib.request.Request(peer.upstream + self.path, data=body, method="POST", headers={
                    "Content-Type": record["content_type"], "Accept": "application/dicom+json",
                    **({"Authorization": authorization} if authorization else {})})
                try:
                    with urllib.request.urlopen(forward, timeout=120) as response:
                        status, payload = response.status, response.read()
                except urllib.error.HTTPError as exc:
                    status, payload = exc.code, exc.read()
                record["upstream_status"] = status
                if peer.drop_class and status == 200:
                    data = json.loads(payload)
                    items = data["00081199"]["Value"]
                    peer.dropped += [value(i, "00081155") for i in items if value(i, "00081150") == peer.drop_class]
                    data["00081199"]["Value"] = [i for i in items if value(i, "00081150") != peer.drop_class]
                    payload = json.dumps(data).encode()
                self.answer(status, payload)
        super().__init__(Handler, tls)
