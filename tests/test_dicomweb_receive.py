"""The STOW-RS receiver against real senders: plain `requests` (hostile bodies among them),
dicomweb-client's `store_instances` (chunked uploads), Orthanc's own DICOMweb client, and, end to
end, Orthanc sending a study to `osteoscreen serve` over STOW-RS and receiving its report back.

The in-process node is the listen role's two receivers on one `Acceptor`: the DIMSE listener and
the STOW-RS server, so that both paths can be compared row for row. After every hostile request the
node must have stored nothing, left nothing in spool/tmp, and still take a valid STOW-RS request.
"""
from __future__ import annotations

import http.client
import io
import json
import socket
import urllib.error
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom import Dataset, dcmread
from sqlalchemy import select

from bench.common import free_ports, renew_uids, tail_of, wait_for
from osteoscreen.config import load
from osteoscreen.node.listener import Listener
from osteoscreen.node.stow_server import StowServer
from osteoscreen.store.db import Database
from osteoscreen.store.models import AuditEvent, Instance, Study
from osteoscreen.synth import make_study
from osteoscreen.users import hash_password

from .conftest import require_tool
from .test_listener_security import storescu
from .test_node_e2e import free_port

TOKEN = "stow-test-token-7f3c9a1e5b"
DICOM = 'multipart/related; type="application/dicom"; boundary=OSTEO-b0undary'
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USERS = [{"name": "alice", "role": "admin", "password_hash": hash_password("alice-pass-1")},
         {"name": "bob", "role": "read-only", "password_hash": hash_password("bob-pass-2")}]


# -- the node and what it holds ---------------------------------------------------------------
class StowNode:
    def __init__(self, storage: Path, dicomweb: dict | None = None, **settings):
        values = {"storage": storage, "port": free_port(), "web": {"users": USERS},
                  "dicomweb": {"enabled": True, "port": 0, "token": TOKEN, **(dicomweb or {})}, **settings}
        self.settings = load(None, values, environ={"OSTEOSCREEN_BIND_ADDRESS": "127.0.0.1"})
        self.db = Database(self.settings.db_url)
        self.listener = Listener(self.settings, self.db)
        self.listener.start()
        self.stow = StowServer(self.settings, self.listener.acceptor).start()
        self.url = self.stow.url

    def instances(self) -> list[Instance]:
        with self.db.session() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def audit(self, event: str) -> list[AuditEvent]:
        with self.db.session() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.event == event).order_by(AuditEvent.id)))

    def leftovers(self) -> list[Path]:
        return sorted(self.settings.spool_dir.joinpath("tmp").iterdir())

    def stop(self) -> None:
        self.stow.stop()
        self.listener.stop()
        self.db.dispose()


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def make(dicomweb: dict | None = None, **settings) -> StowNode:
        nodes.append(StowNode(tmp_path / f"var{len(nodes)}", dicomweb, **settings))
        return nodes[-1]

    yield make
    for n in nodes:
        n.stop()


@pytest.fixture(scope="module")
def pelvis() -> Dataset:
    return make_study("hip", np.random.default_rng(71), patient_index=71)[0].dataset


@pytest.fixture(scope="module")
def lumbar() -> list[Dataset]:
    return [im.dataset for im in make_study("lumbar", np.random.default_rng(72), patient_index=72)]


def fresh(ds: Dataset, study_uid: str | None = None) -> Dataset:
    """A copy with new UIDs (in `study_uid` when given): a new instance to the node."""
    out = renew_uids(deepcopy(ds))
    if study_uid:
        out.StudyInstanceUID = study_uid
    return out


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def body(*parts: bytes, boundary: str = "OSTEO-b0undary", part_type: str | None = "application/dicom") -> bytes:
    head = f"\r\nContent-Type: {part_type}" if part_type else ""
    out = b"".join(f"--{boundary}{head}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return out + f"--{boundary}--\r\n".encode()


def post(node: StowNode, data, content_type: str | None = DICOM, path: str = "/studies",
         auth: str | None = f"Bearer {TOKEN}", method: str = "POST", **kw) -> requests.Response:
    headers = {k: v for k, v in (("Content-Type", content_type), ("Authorization", auth)) if v is not None}
    return requests.request(method, node.url + path, data=data, headers=headers, timeout=60, **kw)


def raw_post(node: StowNode, data: bytes, path: str) -> int:
    """POST with the path sent exactly as written (requests would remove dot segments first)."""
    conn = http.client.HTTPConnection("127.0.0.1", node.stow.port, timeout=60)
    try:
        conn.request("POST", node.settings.dicomweb.base_path + path, body=data,
                     headers={"Content-Type": DICOM, "Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def stored_uids(response: requests.Response) -> list[str]:
    ds = Dataset.from_json(response.json())
    return [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", [])]


def failures(response: requests.Response) -> list[tuple[str, int]]:
    ds = Dataset.from_json(response.json())
    return [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in ds.get("FailedSOPSequence", [])]


def still_receives(node: StowNode, ds: Dataset) -> None:
    """A valid STOW-RS request is stored after whatever came before."""
    before = len(node.instances())
    good = fresh(ds)
    r = post(node, body(part10(good)))
    assert r.status_code == 200, r.text
    assert stored_uids(r) == [str(good.SOPInstanceUID)] and len(node.instances()) == before + 1


# -- storing ------------------------------------------------------------------------------------
def test_a_study_is_stored_durably_and_recorded_as_c_store_records_it(tmp_path, make_node, lumbar):
    require_tool("storescu")
    node = make_node()
    over_dimse = [fresh(ds) for ds in lumbar]
    files = []
    for i, ds in enumerate(over_dimse):
        files.append(tmp_path / f"dimse{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    assert storescu(node.listener.port, files).returncode == 0
    over_web = [fresh(ds) for ds in lumbar]
    for ds in over_web[1:]:
        ds.StudyInstanceUID = over_web[0].StudyInstanceUID
    parts = [part10(ds) for ds in over_web]
    r = post(node, body(*parts), path=f"/studies/{over_web[0].StudyInstanceUID}")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom+json", r.text
    assert stored_uids(r) == [str(ds.SOPInstanceUID) for ds in over_web] and failures(r) == []
    rows = {i.sop_instance_uid: i for i in node.instances()}
    same = ("sop_class_uid", "transfer_syntax_uid", "modality", "region", "view", "eligible", "skip_reason",
            "scanner", "acquisition")
    for dimse, web, part in zip(over_dimse, over_web, parts):
        a, b = rows[str(dimse.SOPInstanceUID)], rows[str(web.SOPInstanceUID)]
        assert {k: getattr(a, k) for k in same} == {k: getattr(b, k) for k in same}
        assert b.eligible and Path(b.path).read_bytes() == part  # the part itself, durably in the spool
        assert Path(b.path).parent.parent == node.settings.spool_dir
    with node.db.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == str(over_web[0].StudyInstanceUID)))
        assert study.status == "receiving" and study.calling_ae == "token"  # settles and is screened as any
    received = [e for e in node.audit("received") if e.peer == "token@127.0.0.1"]
    assert {e.sop_instance_uid for e in received} == {str(ds.SOPInstanceUID) for ds in over_web}
    request = node.audit("stow_request")[-1]
    assert request.detail.startswith("HTTP 200: 2 part(s)") and "2 stored" in request.detail
    assert request.study_uid == str(over_web[0].StudyInstanceUID)
    assert node.leftovers() == []
    again = post(node, body(*parts))  # re-sent: duplicates, stored once
    assert again.status_code == 200 and len(stored_uids(again)) == 2 and len(node.instances()) == 4


def test_dicomweb_client_stores_with_a_chunked_upload_and_a_dashboard_user(make_node, lumbar):
    from dicomweb_client import DICOMwebClient
    node = make_node({"web_users": "admin"})
    session = requests.Session()
    session.auth = ("alice", "alice-pass-1")
    client = DICOMwebClient(node.url, session=session)
    assert sum(len(part10(ds)) for ds in lumbar) > client._chunk_size  # so it sends Transfer-Encoding: chunked
    datasets = [fresh(ds, str(lumbar[0].StudyInstanceUID)) for ds in lumbar]
    answer = client.store_instances(datasets)  # parts without the 128-byte preamble, as it writes them
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == \
        [str(ds.SOPInstanceUID) for ds in datasets]
    assert {i.sop_instance_uid for i in node.instances()} == {str(ds.SOPInstanceUID) for ds in datasets}
    assert {e.peer for e in node.audit("received")} == {"alice@127.0.0.1"}
    session.auth = ("bob", "bob-pass-2")  # read-only: not with web_users admin
    with pytest.raises(requests.HTTPError) as err:
        client.store_instances([fresh(lumbar[0])])
    assert err.value.response.status_code == 401 and len(node.instances()) == 2


def test_a_chunked_request_body_is_stored(make_node, pelvis):
    """dicomweb-client issue #42: a chunked upload answered 200 with nothing stored. Here the
    rows must be there, whatever the chunk sizes."""
    node = make_node()
    ds = fresh(pelvis)
    data = body(part10(ds))
    sizes = [1, 7, 8191, 65536, 1 << 20]

    def chunks():
        i, k = 0, 0
        while i < len(data):
            n = sizes[k % len(sizes)]
            yield data[i:i + n]
            i, k = i + n, k + 1

    r = post(node, chunks())
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 200 and stored_uids(r) == [str(ds.SOPInstanceUID)]
    assert [i.sop_instance_uid for i in node.instances()] == [str(ds.SOPInstanceUID)]


def test_some_stored_some_not_is_202_with_both_sequences(make_node, pelvis):
    node = make_node()
    good, other = fresh(pelvis), fresh(pelvis)
    r = post(node, body(part10(good), part10(other)), path=f"/studies/{good.StudyInstanceUID}")
    assert r.status_code == 202
    assert stored_uids(r) == [str(good.SOPInstanceUID)]
    assert failures(r) == [(str(other.SOPInstanceUID), 0xA900)]  # its study is not the URL's
    assert [i.sop_instance_uid for i in node.instances()] == [str(good.SOPInstanceUID)]


# -- who may store ------------------------------------------------------------------------------
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-000000000", f"Basic {TOKEN}", "Digest x=1",
                                  "Basic YWxpY2U6YWxpY2UtcGFzcy0x"])  # alice's, but web_users is none
def test_no_or_wrong_credentials_get_401_and_store_nothing(make_node, pelvis, auth):
    node = make_node()
    r = post(node, body(part10(fresh(pelvis))), auth=auth)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="osteoscreen"'
    assert node.instances() == [] and node.leftovers() == []
    assert node.audit("stow_request")[-1].detail.startswith("HTTP 401: authentication required")
    still_receives(node, pelvis)


def test_failed_basic_sign_ins_are_throttled_and_audited_without_the_password(make_node, pelvis):
    node = make_node({"web_users": "all", "token": None})
    assert post(node, b"", auth=None).headers["WWW-Authenticate"] == 'Basic realm="osteoscreen", charset="UTF-8"'
    for _ in range(5):
        r = requests.post(node.url + "/studies", data=b"", auth=("alice", "wrong-guess"), timeout=30)
        assert r.status_code == 401
    r = requests.post(node.url + "/studies", data=body(part10(fresh(pelvis))), timeout=30,
                      headers={"Content-Type": DICOM}, auth=("alice", "alice-pass-1"))
    assert r.status_code == 429 and r.headers["Retry-After"]
    details = " ".join(e.detail for e in node.audit("stow_request"))
    assert "wrong password for user alice" in details and "wrong-guess" not in details
    r = requests.post(node.url + "/studies", data=body(part10(fresh(pelvis))), timeout=30,
                      headers={"Content-Type": DICOM}, auth=("bob", "bob-pass-2"))  # web_users all: read-only too
    assert r.status_code == 200 and len(node.instances()) == 1


# -- hostile requests ---------------------------------------------------------------------------
def _hostile(pelvis: Dataset) -> dict:
    good = part10(fresh(pelvis))
    traversal = fresh(pelvis)
    traversal.SOPInstanceUID = "../../../../etc/passwd"
    traversal.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    whole = body(good)
    return {  # name: (body, content type, path, method, expected status)
        "truncated body": (whole[:len(whole) // 2], DICOM, "/studies", "POST", 400),
        "closing boundary missing": (whole[:-len("--OSTEO-b0undary--\r\n")], DICOM, "/studies", "POST", 400),
        "wrong boundary": (body(good, boundary="another-boundary"), DICOM, "/studies", "POST", 400),
        "no parts": (b"--OSTEO-b0undary--\r\n", DICOM, "/studies", "POST", 400),
        "empty body": (b"", DICOM, "/studies", "POST", 400),
        "missing Content-Type": (whole, None, "/studies", "POST", 415),
        "not multipart": (good, "application/dicom", "/studies", "POST", 415),
        "metadata type": (whole, 'multipart/related; type="application/dicom+json"; boundary=OSTEO-b0undary',
                          "/studies", "POST", 415),
        "no boundary": (whole, 'multipart/related; type="application/dicom"', "/studies", "POST", 400),
        "non-DICOM part": (body(b"\x00" * 200 + b"no dicom here " * 1000), DICOM, "/studies", "POST", 409),
        "text part": (body(b"hello", part_type="text/plain"), DICOM, "/studies", "POST", 409),
        "traversal UID in the data set": (body(part10(traversal)), DICOM, "/studies", "POST", 409),
        "traversal in the URL": (whole, DICOM, "/studies/..%2F..%2F..%2Fetc%2Fpasswd", "POST", 404),
        "dot segments in the URL": (whole, DICOM, "/studies/1.2.3/../../../etc", "POST", 404),
        "not a UID in the URL": (whole, DICOM, "/studies/1.2.3%00x", "POST", 400),
        "study mismatch": (whole, DICOM, "/studies/1.2.826.0.1.3680043.8.498.1", "POST", 409),
        "other method": (whole, DICOM, "/studies", "PUT", 405),
        "unknown resource": (whole, DICOM, "/series", "POST", 404),
    }


HOSTILE = list(_hostile(make_study("hip", np.random.default_rng(73), patient_index=73)[0].dataset))


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_request_gets_a_4xx_stores_nothing_and_the_node_goes_on(make_node, pelvis, name):
    node = make_node()
    data, content_type, path, method, expected = _hostile(pelvis)[name]
    if ".." in path:  # sent verbatim
        assert raw_post(node, data, path) == expected
    else:
        r = post(node, data, content_type, path=path, method=method)
        assert r.status_code == expected, r.text
        if expected == 409:
            assert r.headers["Content-Type"] == "application/dicom+json"
            if name == "study mismatch":
                assert [reason for _, reason in failures(r)] == [0xA900]
    assert node.instances() == [] and node.leftovers() == []
    assert node.audit("stow_request")[-1].detail.startswith(f"HTTP {expected}")
    assert not [p for p in node.settings.storage.rglob("*") if "passwd" in p.name or "etc" == p.name]
    still_receives(node, pelvis)


def test_a_connection_dropped_mid_body_stores_nothing(make_node, pelvis):
    node = make_node()
    data = body(part10(fresh(pelvis)))
    channels = node.stow.server._map  # waitress's open sockets (its own among them)
    idle = len(channels)
    with socket.create_connection(("127.0.0.1", node.stow.port), timeout=10) as sock:
        sock.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Type: {DICOM}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data[:len(data) // 2])
        assert wait_for(lambda: len(channels) > idle, 10)
    assert wait_for(lambda: len(channels) == idle, 10)  # the server has dropped the connection
    assert node.instances() == [] and node.leftovers() == [] and node.audit("stow_request") == []
    still_receives(node, pelvis)


def test_a_part_over_max_dataset_bytes_is_refused_with_its_uids(make_node, pelvis):
    node = make_node(max_dataset_bytes=1_000_000)  # a pelvis phantom is ~6 MB
    big = fresh(pelvis)
    r = post(node, body(part10(big)))
    assert r.status_code == 409 and failures(r) == [(str(big.SOPInstanceUID), 0xA700)]
    assert node.instances() == [] and node.leftovers() == []
    assert "max_dataset_bytes" in node.audit("refused")[-1].detail


# -- limits -------------------------------------------------------------------------------------
def test_disk_watermark_and_queue_depth_get_503_with_retry_after(make_node, pelvis):
    low = make_node(min_free_disk_mb=1 << 40, dicomweb={"retry_after_seconds": 42})
    r = post(low, body(part10(fresh(pelvis))))
    assert r.status_code == 503 and r.headers["Retry-After"] == "42" and low.instances() == []
    assert low.audit("refused")[-1].detail == "free disk space below min_free_disk_mb"
    full = make_node(max_queued_jobs=1)
    from osteoscreen.store.models import Job
    with full.db.session() as s:
        study = Study(study_uid="1.2.3.4", status="queued")
        s.add(study)
        s.flush()
        s.add(Job(study_id=study.id, state="queued"))
        s.commit()
    r = post(full, body(part10(fresh(pelvis))))
    assert r.status_code == 503 and r.headers["Retry-After"] == "60" and full.instances() == []


def test_a_body_over_max_request_bytes_is_refused_before_it_is_read(make_node, pelvis):
    node = make_node(dicomweb={"max_request_bytes": 1_000_000})
    r = post(node, body(part10(fresh(pelvis))))
    assert r.status_code == 413 and node.instances() == []
    assert "max_request_bytes" in node.audit("stow_request")[-1].detail
    assert node.audit("stow_request")[-1].detail.startswith("HTTP 413")
    small = fresh(pelvis)
    small.PixelData, small.Rows, small.Columns = b"\x00\x00" * 64, 8, 8
    r = post(node, body(part10(small)))
    assert r.status_code == 200 and len(node.instances()) == 1


def test_no_patient_data_in_the_log_or_the_audit_trail(make_node, pelvis, caplog):
    caplog.set_level("DEBUG")
    node = make_node(max_dataset_bytes=20_000_000)
    ds = fresh(pelvis)
    post(node, body(part10(ds)))
    post(node, body(part10(ds)), path="/studies/1.2.3")
    post(node, body(part10(ds))[:1000])
    post(node, body(part10(ds)), auth=None)
    text = caplog.text + " ".join(str(e.detail) + str(e.peer) for e in node.audit("stow_request") +
                                  node.audit("rejected") + node.audit("received"))
    assert "STOW-RS" in text and "stored" in text
    for value in (str(ds.PatientID), str(ds.PatientName), str(ds.PatientName).split("^")[0]):
        assert value not in text


# -- settings -----------------------------------------------------------------------------------
def test_config_yaml_documents_the_section_with_its_defaults():
    from osteoscreen.settings import DicomWeb
    assert load(Path(__file__).resolve().parent.parent / "config.yaml", environ={}).dicomweb == DicomWeb()


@pytest.mark.parametrize("dicomweb, message", [
    ({"enabled": True}, "needs a way in"),
    ({"token": "short"}, "at least 16"),
    ({"token_env": "OSTEOSCREEN_SECRET"}, "not OSTEOSCREEN_"),
    ({"token": TOKEN, "token_env": "STOW_TOKEN"}, "not both"),
    ({"web_users": "everyone"}, "none, admin, all"),
    ({"base_path": "/dicom-web/../x"}, "URL path"),
    ({"enabled": True, "token": TOKEN, "port": 8080}, "both 8080"),
])
def test_bad_dicomweb_settings_stop_start_up(dicomweb, message):
    from osteoscreen.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        load(None, {"dicomweb": dicomweb}, environ={})


def test_the_token_may_come_from_a_named_environment_variable(tmp_path, monkeypatch, pelvis):
    monkeypatch.setenv("STOW_TEST_TOKEN", "from-the-environment-0123")
    node = StowNode(tmp_path / "var", {"token": None, "token_env": "STOW_TEST_TOKEN", "base_path": "/"})
    try:
        assert node.url.endswith(str(node.stow.port))  # base_path / is the server's root
        r = post(node, body(part10(fresh(pelvis))), auth="Bearer from-the-environment-0123")
        assert r.status_code == 200 and len(node.instances()) == 1
        assert post(node, body(part10(fresh(pelvis))), auth=f"Bearer {TOKEN}").status_code == 401
    finally:
        node.stop()


# -- Orthanc's DICOMweb client ----------------------------------------------------------------------
def orthanc_with_dicomweb(folder: Path, servers: dict, dicom_node_port: int | None = None):
    from bench.orthanc import Orthanc, find_orthanc
    if find_orthanc() is None or not PLUGIN.exists():
        pytest.skip("Orthanc or its DICOMweb plugin (orthanc-dicomweb) not installed")
    # no Lua route: images reach the node over STOW-RS only
    return Orthanc(folder, dicom_node_port, config={"LuaScripts": [], "Plugins": [str(PLUGIN)],
                                                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                                                                 "Servers": servers}})


def orthanc_stow(orthanc, server: str, study_uid: str) -> dict:
    sid = orthanc.study_id(study_uid)
    assert sid, "the study is not in Orthanc"
    return orthanc.get(f"/dicom-web/servers/{server}/stow",
                       json.dumps({"Resources": [sid], "Synchronous": True}).encode())


@pytest.mark.slow
def test_orthanc_stows_a_study_chunked_and_not(tmp_path, make_node, lumbar):
    require_tool("storescu")
    node = make_node()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    orthanc = orthanc_with_dicomweb(tmp_path / "orthanc", {
        "chunked": {"Url": node.url + "/", "HttpHeaders": bearer, "ChunkedTransfers": True},
        "plain": {"Url": node.url + "/", "HttpHeaders": bearer, "ChunkedTransfers": False},
        "nobody": {"Url": node.url + "/"}})
    try:
        for server in ("chunked", "plain"):
            datasets = [fresh(lumbar[0])]
            datasets.append(fresh(lumbar[1], str(datasets[0].StudyInstanceUID)))
            files = []
            for i, ds in enumerate(datasets):
                files.append(tmp_path / f"{server}{i}.dcm")
                ds.save_as(files[-1], enforce_file_format=True)
            orthanc.store(files)
            answer = orthanc_stow(orthanc, server, str(datasets[0].StudyInstanceUID))
            assert answer["InstancesCount"] == "2", answer
            rows = {i.sop_instance_uid: i for i in node.instances()}
            assert all(str(ds.SOPInstanceUID) in rows and rows[str(ds.SOPInstanceUID)].eligible for ds in datasets)
        with pytest.raises(urllib.error.HTTPError):  # no credentials: Orthanc's job fails, nothing more is stored
            orthanc_stow(orthanc, "nobody", str(datasets[0].StudyInstanceUID))
        assert len(node.instances()) == 4 and node.leftovers() == []
        assert node.audit("stow_request")[-1].detail.startswith("HTTP 401")
    except BaseException:
        print(tail_of(orthanc.log, 4000))
        raise
    finally:
        orthanc.stop()


@pytest.mark.slow
def test_a_study_sent_by_orthanc_over_stow_rs_is_screened_and_its_report_comes_back(tmp_path):
    """`osteoscreen serve` with dicomweb enabled: Orthanc STOWs a pelvis to it; the node records it,
    settles, screens and sends its SR back to Orthanc by C-STORE, into the same study."""
    from bench.orthanc import Node
    require_tool("storescu")
    node_port, web_port = free_ports(2)
    orthanc = orthanc_with_dicomweb(tmp_path / "orthanc", {"osteoscreen": {
        "Url": f"http://127.0.0.1:{web_port}/dicom-web/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}},
        dicom_node_port=node_port)
    node = None
    try:
        node = Node(tmp_path / "node" / "var", node_port, orthanc.dicom_port, settle_seconds=1.0,
                    env={"OSTEOSCREEN_DICOMWEB__ENABLED": "true", "OSTEOSCREEN_DICOMWEB__PORT": str(web_port),
                         "OSTEOSCREEN_DICOMWEB__TOKEN": TOKEN, "OSTEOSCREEN_DISPATCH_BACKOFF_SECONDS": "1"})
        assert wait_for(lambda: _port_open(web_port), 30), tail_of(node.log)
        ds = make_study("hip", np.random.default_rng(109), patient_index=109, implants=())[0].dataset
        path = tmp_path / "pelvis.dcm"
        ds.save_as(path, enforce_file_format=True)
        orthanc.store([path])
        assert orthanc_stow(orthanc, "osteoscreen", str(ds.StudyInstanceUID))["InstancesCount"] == "1"
        assert node.query("SELECT sop_instance_uid, eligible FROM instances") == [(str(ds.SOPInstanceUID), 1)]
        assert node.query("SELECT peer FROM audit_events WHERE event = 'received'") == [("token@127.0.0.1",)]
        sid = orthanc.study_id(str(ds.StudyInstanceUID))

        def reported():
            status = node.query("SELECT status FROM studies WHERE study_uid = ?", str(ds.StudyInstanceUID))
            assert status and status[0][0] != "failed", tail_of(node.log)
            return status[0][0] == "screened" and orthanc.has_sr(sid)

        assert wait_for(reported, 180, interval=0.5), tail_of(node.log, 6000)
        srs = [i for i in orthanc.instances(str(ds.StudyInstanceUID)) if i["tags"].get("Modality") == "SR"]
        assert len(srs) == 1
        sr = dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{srs[0]['id']}/file")))
        assert str(sr.StudyInstanceUID) == str(ds.StudyInstanceUID)
        log = node.log.read_text()
        assert str(ds.PatientID) not in log and str(ds.PatientName) not in log
    except BaseException:
        print(tail_of(orthanc.log, 4000))
        raise
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
