"""STOW-RS destinations (issue 17): result objects stored at DICOMweb servers, with the outbox's
backoff, circuit breaker and `osteoscreen resend` (their settings: tests/test_config_destinations.py).

- the client (node/dicomweb_sender.py) against HTTP servers on real sockets (tests/dicomweb_peers.py):
  the body is the files' bytes with a Content-Length, never chunked; each kind of answer becomes a
  result per file; a 200 whose response omits an instance does not deliver it;
- the dispatcher on SQLite and PostgreSQL: the same through the outbox, and 5xx opening the circuit;
- end to end (slow): storescu → Orthanc → its Lua route (DIMSE) → `osteoscreen serve`, whose SR,
  heatmap and KOS go back by STOW-RS into Orthanc's DICOMweb server (Basic credentials), through a
  proxy that checks a bearer token, through one that omits the heatmap from Orthanc's answer, and to a
  destination that is down until an Orthanc starts there; QIDO-RS finds them in the source study.
"""
from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select, update

from bench.common import free_ports, tail_of, wait_for
from bench.orthanc import Node, find_orthanc
from osteoscreen.admin.queries.deliveries import failed_deliveries
from osteoscreen.cli import main
from osteoscreen.config import TLS, DicomWebDestination
from osteoscreen.dispatch.outbox import Dispatcher, association_outcome
from osteoscreen.node.dicomweb_sender import BLOCK, MultipartBody, store_files
from osteoscreen.store.models import AuditEvent, DestinationCircuit

from .conftest import require_tool
from .dicomweb_peers import (DICOMWEB_PLUGIN, KO_CLASS, PASSWORD, SC_CLASS, SR_CLASS, TOKEN, USER, Front, Stub,
                             basic, dicomweb_orthanc, qido, stow_response, value)
from .test_dispatch import circuit_row, deliveries, queue_results, run_due
from .test_dispatch import node  # noqa: F401 - a fixture, used by name
from .test_listener_security import make_pki
from .test_metrics import scrape

SECRET = "hunter2-secret"


# -- the client against HTTP servers ------------------------------------------------------------------
def sc_file(folder: Path, size: int = 8, study_uid: str | None = None) -> tuple[str, Path]:
    """A Secondary Capture file (size × size pixels); returns (SOP Instance UID, path)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.ConversionType = "DOE^JANE", "PID-4711", "OT", "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", size, size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(size * size) % 251).astype(np.uint8).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID), path


def parts(body: bytes, content_type: str) -> list[tuple[bytes, bytes]]:
    """(headers, content) of each part of a multipart body, split as RFC 2046 says."""
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    assert body.startswith(b"--" + boundary + b"\r\n") and body.endswith(b"\r\n--" + boundary + b"--\r\n")
    chunks = body[len(boundary) + 4:-(len(boundary) + 8)].split(b"\r\n--" + boundary + b"\r\n")
    return [tuple(c.split(b"\r\n\r\n", 1)) for c in chunks]


def test_the_body_is_the_files_bytes_read_block_by_block(tmp_path):
    files = [sc_file(tmp_path, n)[1] for n in (8, 700, 16)]  # the middle one is several blocks long
    body = MultipartBody(files)
    blocks = list(body)
    assert {len(b) for b in blocks[:-1]} == {BLOCK} and 0 < len(blocks[-1]) <= BLOCK and len(blocks) > 5
    data = b"".join(blocks)
    assert len(data) == len(body)
    assert [(h, c) for h, c in parts(data, body.content_type)] == [
        (b"Content-Type: application/dicom", f.read_bytes()) for f in files]
    assert body.content_type.startswith('multipart/related; type="application/dicom"; boundary=')


@pytest.fixture
def stub():
    servers = []

    def make(answer) -> Stub:
        servers.append(Stub(answer))
        return servers[-1]
    yield make
    for s in servers:
        s.stop()


ANSWERS = {  # name: (status, body or a function of the two UIDs, expected per file: (ok, status, error start))
    "200 omits one": (200, lambda a, b: stow_response(stored=[(SC_CLASS, a)]),
                      [(True, 0, None), (False, None, "not stored: the STOW-RS response (HTTP 200 OK) does not")]),
    "202 warning and failure": (202, lambda a, b: stow_response(stored=[(SC_CLASS, a)], failed=[(SC_CLASS, b, 0xA700)],
                                                                warnings={a: 0xB000}),
                                [(True, 0xB000, None), (False, 0xA700, "STOW-RS failure reason 0xA700 (HTTP 202")]),
    "409 both failed": (409, lambda a, b: stow_response(failed=[(SC_CLASS, a, 0xA900), (SC_CLASS, b, 0xC000)]),
                        [(False, 0xA900, "STOW-RS failure reason 0xA900 (HTTP 409"),
                         (False, 0xC000, "STOW-RS failure reason 0xC000")]),
    "200 empty": (200, lambda a, b: b"", [(False, None, "not stored")] * 2),
    "200 XML": (200, lambda a, b: (b"<NativeDicomModel/>", "application/dicom+xml"),
                [(False, None, "not stored")] * 2),
    "503": (503, lambda a, b: b"", [(False, None, "destination unreachable: HTTP 503")] * 2),
    "429": (429, lambda a, b: b"", [(False, None, "destination unreachable: HTTP 429")] * 2),
    "401": (401, lambda a, b: b"", [(False, None, "destination refused: HTTP 401")] * 2),
    "404": (404, lambda a, b: b"", [(False, None, "destination refused: HTTP 404")] * 2),
}


@pytest.mark.parametrize("name", ANSWERS)
def test_each_answer_becomes_a_result_per_file(tmp_path, stub, name):
    status, answer, expected = ANSWERS[name]
    (a, first), (b, second) = sc_file(tmp_path / "a", 600), sc_file(tmp_path / "b")

    def respond(record):
        out = answer(a, b)
        return (status, *out) if isinstance(out, tuple) else (status, out)
    server = stub(respond)
    results = store_files(DicomWebDestination(server.url), [first, second])
    assert [(r.path, r.ok, r.status, (r.error or None) and r.error[:len(e or "")]) for r, (_, _, e) in
            zip(results, expected)] == [(p, *e) for p, e in zip([first, second], expected)]
    answered = status not in (503, 429, 401, 404)
    assert association_outcome(results) is answered and all(r.peer_answered is answered for r in results)
    (request,) = server.requests
    assert request["path"] == "/dicom-web/studies" and request["accept"] == "application/dicom+json"
    assert request["transfer_encoding"] is None and int(request["content_length"]) == len(request["body"])
    assert [c for _, c in parts(request["body"], request["content_type"])] == [first.read_bytes(), second.read_bytes()]


def test_no_answer_in_time_or_nobody_listening_is_unreachable(tmp_path, stub):
    _, path = sc_file(tmp_path)
    (port,) = free_ports(1)
    down = store_files(DicomWebDestination(f"http://127.0.0.1:{port}/dicom-web"), [path])
    assert down[0].error.startswith("destination unreachable: ConnectionError") and down[0].peer_answered is False
    slow = stub(lambda record: (200, b""))
    slow.hold = True
    late = store_files(DicomWebDestination(slow.url, timeout=1), [path])
    assert late[0].error.startswith("destination unreachable: ReadTimeout") and association_outcome(late) is False


def test_credentials_go_in_the_authorization_header_only(tmp_path, stub, monkeypatch):
    uid, path = sc_file(tmp_path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom")
    server = stub(lambda record: (200, stow_response(stored=[(SC_CLASS, uid)])))
    monkeypatch.setenv("STOW_TEST_PASSWORD", SECRET)
    basic_dest = DicomWebDestination(server.url, auth="basic", username="osteo", password_env="STOW_TEST_PASSWORD")
    ok, bad = store_files(basic_dest, [path, broken])
    assert ok.ok and not bad.ok and bad.error.startswith("unreadable result file") and bad.peer_answered is None
    assert server.requests[-1]["authorization"] == "Basic " + base64.b64encode(f"osteo:{SECRET}".encode()).decode()
    assert store_files(DicomWebDestination(server.url, auth="bearer", token=SECRET), [path])[0].ok
    assert server.requests[-1]["authorization"] == f"Bearer {SECRET}"
    monkeypatch.delenv("STOW_TEST_PASSWORD")
    (missing,) = store_files(basic_dest, [path])
    assert missing.error == "destination refused: no credentials (environment variable STOW_TEST_PASSWORD is not set)"
    assert len(server.requests) == 2  # nothing was sent without them


# -- through the dispatcher (SQLite and PostgreSQL) ---------------------------------------------------
def test_dispatcher_delivers_only_what_the_answer_lists(node, stub):  # noqa: F811
    settings, db = node
    listed: set[str] = set()
    server = stub(lambda record: (200, stow_response(stored=[(SC_CLASS, u) for u in listed])))
    dest = f"{server.url}/{'long-path/' * 8}"[:-1]  # longer than the audit trail's peer column
    settings.destinations = [DicomWebDestination(dest)]
    queue_results(settings, db, dest, 2)
    first, second = deliveries(db, dest)
    listed.add(first.sop_instance_uid)
    assert Dispatcher(settings, db).run_once() == 1
    first, second = deliveries(db, dest)
    assert (first.state, second.state, second.attempts) == ("delivered", "pending", 1)
    assert second.last_error.startswith("not stored: the STOW-RS response (HTTP 200 OK) does not list it")
    circuit = circuit_row(db, dest)
    assert (circuit.state, circuit.consecutive_failures) == ("closed", 0)  # the destination answered
    with db.session() as s:
        audits = s.scalars(select(AuditEvent).where(AuditEvent.event == "delivered")).all()
    assert [(a.sop_instance_uid, a.peer) for a in audits] == [(first.sop_instance_uid, dest[:64])]


def test_dispatcher_5xx_opens_the_circuit_and_the_probe_closes_it(node, stub):  # noqa: F811
    settings, db = node
    answer = {"status": 503}
    server = stub(lambda record: (answer["status"], stow_response(stored=[(SC_CLASS, u) for u in uids])))
    queue_results(settings, db, server.url, 3)
    uids = [d.sop_instance_uid for d in deliveries(db, server.url)]
    dispatcher = Dispatcher(settings, db)  # the destination is not configured: reached by its text alone
    for _ in range(settings.dispatch_circuit_failures + 1):
        run_due(db, dispatcher)
    assert len(server.requests) == settings.dispatch_circuit_failures  # open: the last run sent nothing
    assert circuit_row(db, server.url).state == "open"
    assert {(d.state, d.attempts) for d in deliveries(db, server.url)} == {("pending", 3)}
    # the dashboard's failed deliveries and /metrics name the destination by its URL, as any other
    with db.session() as s:
        failed = failed_deliveries(s)
    assert {(f["destination"], f["last_error"]) for f in failed} == {(server.url, "destination unreachable: HTTP 503 "
                                                                                 "Service Unavailable")}
    assert scrape(db)[("osteoscreen_circuit_open", frozenset({("destination", server.url)}))] == 1
    answer["status"] = 200
    with db.session() as s:
        s.execute(update(DestinationCircuit).values(retry_at=DestinationCircuit.opened_at))
        s.commit()
    assert run_due(db, dispatcher) == 1  # the half-open probe: one object
    assert circuit_row(db, server.url).state == "closed"
    assert run_due(db, dispatcher) == 2
    assert {d.state for d in deliveries(db, server.url)} == {"delivered"}


def require_orthanc_dicomweb() -> None:
    if find_orthanc() is None or not DICOMWEB_PLUGIN.is_file():
        if os.environ.get("CI"):
            pytest.fail("Orthanc and its DICOMweb plugin are not installed (make system-deps)")
        pytest.skip("Orthanc or orthanc-dicomweb not installed (apt-get install orthanc orthanc-dicomweb)")


@pytest.mark.slow
def test_https_destination_is_verified_against_its_ca(tmp_path):
    require_orthanc_dicomweb()
    pki = make_pki(tmp_path / "pki")
    orthanc = dicomweb_orthanc(tmp_path / "orthanc")
    front = Front(orthanc, tls=(pki["server.pem"], pki["server.key"]))  # HTTPS in front of Orthanc
    try:
        study_uid = generate_uid()
        uid, path = sc_file(tmp_path / "files", study_uid=study_uid)
        login = {"auth": "basic", "username": USER, "password": PASSWORD}
        (untrusted,) = store_files(DicomWebDestination(front.url, **login), [path])  # certifi does not know our CA
        assert untrusted.error.startswith("destination unreachable: SSLError") and not untrusted.peer_answered
        assert front.requests == []  # nothing was sent to a peer we could not verify
        (own_ca,) = store_files(DicomWebDestination(front.url, **login, ca_certificates=str(pki["ca.pem"])), [path])
        (node_ca,) = store_files(DicomWebDestination(front.url, **login), [path],
                                 tls=TLS(ca_certificates=str(pki["ca.pem"])))  # the node's tls.ca_certificates
        assert own_ca.ok and node_ca.ok, (own_ca, node_ca)
        assert front.url.startswith("https://") and [r["upstream_status"] for r in front.requests] == [200, 200]
        assert classes(orthanc, study_uid) == {uid: SC_CLASS}
    finally:
        front.stop()
        orthanc.stop()


# -- end to end: storescu → Orthanc → osteoscreen serve → STOW-RS back into Orthanc --------------------
RESULTS_TIMEOUT = 240  # model load and the first screening on a busy machine
CLASS_OF = {"sr": SR_CLASS, "heatmap": SC_CLASS, "kos": KO_CLASS}


class Trip:
    """The module's peers: Orthanc (DICOMweb, Basic credentials) routing to the node, the two
    proxies, the node with four DICOMweb destinations, and (later) the Orthanc of the dead one."""

    def __init__(self, folder: Path):
        self.folder, self.node, self.later, self.peers = folder, None, None, []

    def diagnostics(self) -> str:
        logs = [self.node.log] if self.node else []
        logs += [p.log for p in (self.orthanc, self.later) if p is not None and hasattr(p, "log")]
        return "\n".join(f"--- {log} ---\n{tail_of(log, 5000)}" for log in logs)

    def deliveries(self, name: str) -> list[tuple]:
        """(kind, SOP Instance UID, state, attempts, last error, path) of the study's deliveries to one destination."""
        return self.node.query("SELECT d.kind, d.sop_instance_uid, d.state, d.attempts, d.last_error, d.path "
                               "FROM deliveries d JOIN studies s ON s.id = d.study_id WHERE s.study_uid = :u "
                               "AND d.destination = :d ORDER BY d.id", u=self.study_uid, d=self.urls[name])

    def circuit(self, name: str) -> tuple | None:
        rows = self.node.query("SELECT state, consecutive_failures, last_error FROM destination_circuits "
                               "WHERE destination = :d", d=self.urls[name])
        return rows[0] if rows else None

    def wait(self, predicate, what: str, timeout: float = RESULTS_TIMEOUT):
        def check():
            assert self.node.proc.poll() is None, f"the node exited\n{self.diagnostics()}"
            return predicate()
        result = wait_for(check, timeout, interval=0.3)
        assert result, f"{what} within {timeout} s\n{self.diagnostics()}"
        return result

    def delivered(self, name: str) -> list[tuple]:
        """The destination's deliveries of the study once there are three (SR, heatmap, KOS), all delivered."""
        def done():
            rows = self.deliveries(name)
            return rows if len(rows) == 3 and all(r[2] == "delivered" for r in rows) else None
        return self.wait(done, f"SR, heatmap and KOS delivered to {name}")


@pytest.fixture(scope="module")
def trip(tmp_path_factory):
    require_tool("storescu")
    require_orthanc_dicomweb()
    from .test_orthanc import normal_hip_study, save
    trip = Trip(tmp_path_factory.mktemp("dicomweb-send"))
    node_port, dead_http, dead_dicom = free_ports(3)
    trip.dead_ports, trip.orthanc = (dead_http, dead_dicom), None
    try:
        trip.orthanc = dicomweb_orthanc(trip.folder / "orthanc", node_port)
        trip.bearer, trip.omitting = Front(trip.orthanc, token=TOKEN), Front(trip.orthanc, drop_class=SC_CLASS)
        trip.peers += [trip.bearer, trip.omitting]
        trip.urls = {"basic": f"http://127.0.0.1:{trip.orthanc.http_port}/dicom-web", "bearer": trip.bearer.url,
                     "omitting": trip.omitting.url, "dead": f"http://127.0.0.1:{dead_http}/dicom-web"}
        password = {"auth": "basic", "username": USER, "password_env": "STOW_TEST_PACS_PASSWORD"}
        config = trip.folder / "node.yaml"
        config.write_text(yaml.safe_dump({
            "destinations": [{"url": trip.urls["basic"], **password},
                             {"url": trip.urls["bearer"], "auth": "bearer", "token_env": "STOW_TEST_PACS_TOKEN"},
                             {"url": trip.urls["omitting"], **password}, {"url": trip.urls["dead"], **password}],
            "dispatch_max_attempts": 2, "dispatch_backoff_seconds": 0.5, "dispatch_backoff_max_seconds": 1.0,
            "dispatch_circuit_failures": 2, "dispatch_circuit_open_seconds": 2.0,
            # every assessable site positive: the study gets a KOS whatever the model estimates
            "output": {"positive_categories": ["normal", "osteopenia", "osteoporosis"]}}))
        trip.node = Node(trip.folder / "node" / "var", node_port, None, settle_seconds=2.0, config_file=config,
                         env={"STOW_TEST_PACS_PASSWORD": PASSWORD, "STOW_TEST_PACS_TOKEN": TOKEN}, start_timeout=120)
        trip.datasets = [im.dataset for im in normal_hip_study()]
        trip.study_uid = str(trip.datasets[0].StudyInstanceUID)
        trip.orthanc.store(save(trip.datasets, trip.folder / "to-orthanc", "pelvis"), timeout=120)
        yield trip
    except BaseException:
        print(trip.diagnostics(), file=sys.stderr)
        raise
    finally:
        for peer in (trip.node, *trip.peers, trip.later, trip.orthanc):
            if peer is not None:
                peer.stop()


def classes(orthanc, study_uid: str) -> dict[str, str]:
    """SOP Instance UID → SOP Class UID of each instance QIDO-RS finds in the study."""
    return {value(i, "00080018"): value(i, "00080016") for i in qido(orthanc, f"/studies/{study_uid}/instances")}


@pytest.mark.slow
def test_sr_heatmap_and_kos_are_stored_in_the_source_study(trip):
    rows = trip.delivered("basic")
    assert sorted(r[0] for r in rows) == ["heatmap", "kos", "sr"]
    found = classes(trip.orthanc, trip.study_uid)
    assert str(trip.datasets[0].SOPInstanceUID) in found  # the source image, in the same study …
    assert {uid: found.get(uid) for _, uid, *_ in rows} == {uid: CLASS_OF[kind] for kind, uid, *_ in rows}
    modalities = {value(s, "00080060") for s in qido(trip.orthanc, f"/studies/{trip.study_uid}/series")}
    assert {"SR", "KO", "DX"} <= modalities, modalities  # … each result in a series of its own
    for kind, uid, *_, path in rows:  # stored as the node wrote them: the files' bytes, not re-encoded
        (orthanc_id,) = [i["id"] for i in trip.orthanc.instances(trip.study_uid) if i["tags"]["SOPInstanceUID"] == uid]
        assert trip.orthanc.get_bytes(f"/instances/{orthanc_id}/file") == Path(path).read_bytes(), kind


@pytest.mark.slow
def test_the_bearer_token_reaches_the_peer_and_a_wrong_one_is_refused(trip):
    rows = trip.delivered("bearer")
    assert trip.bearer.requests and all(r["authorization"] == f"Bearer {TOKEN}" and r["upstream_status"] == 200
                                        and r["transfer_encoding"] is None for r in trip.bearer.requests)
    sr_path = Path(next(r[5] for r in rows if r[0] == "sr"))
    wrong = store_files(DicomWebDestination(trip.bearer.url, auth="bearer", token="not-the-token"), [sr_path])
    assert wrong[0].error == "destination refused: HTTP 401 Unauthorized" and association_outcome(wrong) is False
    # Orthanc itself checks the Basic credentials
    direct = trip.urls["basic"]
    for dest in (DicomWebDestination(direct), DicomWebDestination(direct, auth="basic", username=USER, password="no")):
        assert store_files(dest, [sr_path])[0].error == "destination refused: HTTP 401 Unauthorized"


@pytest.mark.slow
def test_an_instance_the_answer_leaves_out_is_not_delivered(trip):
    def settled():
        rows = trip.deliveries("omitting")
        return rows if len(rows) == 3 and {r[2] for r in rows} <= {"delivered", "dead"} else None
    rows = trip.wait(settled, "the omitting destination's deliveries settled")
    states = {kind: (state, attempts) for kind, _, state, attempts, *_ in rows}
    assert states == {"sr": ("delivered", 1), "kos": ("delivered", 1), "heatmap": ("dead", 2)}
    heatmap = next(r for r in rows if r[0] == "heatmap")
    assert heatmap[4].startswith("not stored: the STOW-RS response (HTTP 200 OK) does not list it as stored")
    assert heatmap[1] in trip.omitting.dropped  # Orthanc did store it and said so; the answer the node got did not
    assert trip.circuit("omitting")[:2] == ("closed", 0)  # a destination that answers is not "down"


@pytest.mark.slow
def test_a_dead_destination_opens_its_circuit_loses_nothing_and_resend_delivers(trip, capsys):
    def given_up():
        rows, circuit = trip.deliveries("dead"), trip.circuit("dead")
        return rows if len(rows) == 3 and all(r[2] == "dead" for r in rows) and circuit and circuit[0] == "open" else None
    rows = trip.wait(given_up, "deliveries to the dead destination given up and its circuit open")
    assert all(r[3] == 2 and r[4].startswith("destination unreachable: ConnectionError") for r in rows)
    assert all(Path(r[5]).is_file() for r in rows)  # nothing lost: the outbox keeps every file
    state, failures, _ = trip.circuit("dead")
    assert failures >= 2
    # audited when it opened (and again after each failed half-open probe)
    assert trip.node.query("SELECT count(*) FROM audit_events WHERE event = 'circuit_open' AND peer = :p",
                           p=trip.urls["dead"][:64])[0][0] >= 1

    trip.later = dicomweb_orthanc(trip.folder / "orthanc-later", None, http_port=trip.dead_ports[0],
                                  dicom_port=trip.dead_ports[1])  # the destination comes back
    assert main(["resend", "--dead", "--storage", str(trip.node.storage)]) == 0
    assert "re-queued" in capsys.readouterr().out
    rows = trip.delivered("dead")  # the circuit's probe, then the rest
    assert classes(trip.later, trip.study_uid) == {uid: CLASS_OF[kind] for kind, uid, *_ in rows}
    assert trip.circuit("dead")[:2] == ("closed", 0)
    assert trip.node.query("SELECT count(*) FROM audit_events WHERE event = 'circuit_closed' AND peer = :p",
                           p=trip.urls["dead"][:64]) == [(1,)]


@pytest.mark.slow
def test_no_credentials_or_patient_data_in_the_log_or_the_database(trip):
    trip.delivered("basic")
    log = trip.node.log.read_text()
    assert "STOW-RS" in log or "delivery" in log or "circuit" in log  # the node did log its sending …
    stored = " ".join(str(v) for table, cols in (("deliveries", "destination, last_error"),
                                                 ("destination_circuits", "destination, last_error"),
                                                 ("audit_events", "peer, detail"))
                      for row in trip.node.query(f"SELECT {cols} FROM {table}") for v in row)
    secrets = (PASSWORD, TOKEN, basic().split()[1])
    for text in (log, stored):  # … without a secret, a patient name or an ID
        assert not [s for s in secrets if s in text]
        for ds in trip.datasets:
            assert str(ds.PatientID) not in text and str(ds.PatientName).split("^")[0] not in text
