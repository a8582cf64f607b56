"""The listener against peers it should not trust or cannot afford: AE title policy, DICOM TLS with
DCMTK on both sides (storescu → listener, sender → storescp), the data set size limit and the
backpressure watermarks (0xA700, nothing left on disk), and no patient data in the logs."""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from osteoscreen.config import TLS, Destination, load
from osteoscreen.node.listener import Listener
from osteoscreen.node.sender import send_files
from osteoscreen.store.db import Database
from osteoscreen.store.models import AuditEvent, Instance, Job, Study

from .conftest import require_tool
from .test_node_e2e import free_port, port_open, wait_for, write_study

DX = "1.2.840.10008.5.1.4.1.1.1.1"


# -- helpers ------------------------------------------------------------------------------------
def make_pki(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost / 127.0.0.1 and a client certificate."""
    openssl = require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=osteoscreen test CA")
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ext in (("server", "server.ext"), ("client", "client.ext")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", ext)
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


class InProcessNode:
    """The listener role alone, in this process, on a fresh SQLite database."""

    def __init__(self, storage: Path, **settings):
        env = {"OSTEOSCREEN_BIND_ADDRESS": "127.0.0.1"}
        self.settings = load(None, {"storage": storage, "port": free_port(), **settings}, environ=env)
        self.db = Database(self.settings.db_url)
        self.listener = Listener(self.settings, self.db)
        self.listener.start()

    def audit(self, event: str) -> list[AuditEvent]:
        with self.db.session() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.event == event)))

    def instances(self) -> int:
        with self.db.session() as s:
            return len(s.scalars(select(Instance)).all())

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.settings.spool_dir.rglob("*") if p.is_file())

    def stop(self):
        self.listener.stop()
        self.db.dispose()


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def make(**settings):
        n = InProcessNode(tmp_path / f"var{len(nodes)}", **settings)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()


def storescu(port: int, files, *extra: str, aet="MODALITY", aec="OSTEOSCREEN") -> subprocess.CompletedProcess:
    require_tool("storescu")
    return subprocess.run(["storescu", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def echoscu(port: int, *extra: str, aet="MODALITY", aec="OSTEOSCREEN") -> subprocess.CompletedProcess:
    require_tool("echoscu")
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def pynetdicom_assoc(port: int, calling: str, called: str, tls_args=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)


def store_status(port: int, path: Path) -> int | None:
    """C-STORE one file with pynetdicom; the status (None if no answer)."""
    ae = AE(ae_title="MODALITY")
    ds = dcmread(path, stop_before_pixels=True)
    ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="OSTEOSCREEN")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return getattr(status, "Status", None)
    finally:
        assoc.release()


# -- association policy -------------------------------------------------------------------------
def test_unknown_calling_ae_is_rejected_and_audited(tmp_path, make_node):
    node = make_node(allowed_calling_aets=["MODALITY", "PACS"])
    files, _ = write_study("hip", tmp_path / "in", seed=31)
    assert echoscu(node.listener.port).returncode == 0
    assert echoscu(node.listener.port, aet="WRONG").returncode != 0
    out = storescu(node.listener.port, files, aet="WRONG")
    assert out.returncode != 0 and "rejected" in (out.stdout + out.stderr).lower()
    assoc = pynetdicom_assoc(node.listener.port, "INTRUDER", "OSTEOSCREEN")
    assert assoc.is_rejected
    assert node.instances() == 0 and node.spool_files() == []
    # the server's rejection handler writes its audit row after the A-ASSOCIATE-RJ has gone out: the
    # peer may see the rejection first, so the rows are waited for (a few seconds at most)
    deadline = time.monotonic() + 10
    while len(rejected := node.audit("association_rejected")) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(rejected) == 3
    assert {r.peer for r in rejected} == {"WRONG", "INTRUDER"}
    assert all("calling AE title not recognised" in r.detail for r in rejected)
    assert storescu(node.listener.port, files).returncode == 0 and node.instances() == 1  # MODALITY is allowed


def test_wrong_called_ae_is_rejected(make_node):
    node = make_node()  # require_called_aet defaults to true
    assert echoscu(node.listener.port, aec="SOMEONE_ELSE").returncode != 0
    assert pynetdicom_assoc(node.listener.port, "MODALITY", "ANY-SCP").is_rejected
    assoc = pynetdicom_assoc(node.listener.port, "MODALITY", "OSTEOSCREEN")
    assert assoc.is_established
    assoc.release()
    rejected = node.audit("association_rejected")
    assert len(rejected) == 2 and all("called AE title not recognised" in r.detail for r in rejected)
    lax = make_node(require_called_aet=False)
    assert echoscu(lax.listener.port, aec="SOMEONE_ELSE").returncode == 0


# -- TLS ------------------------------------------------------------------------------------------
def tls_settings(pki, **extra):
    return {"tls": {"enabled": True, "port": free_port(), "certificate": str(pki["server.pem"]),
                    "private_key": str(pki["server.key"]), "ca_certificates": str(pki["ca.pem"]), **extra}}


def test_dcmtk_storescu_over_tls_is_stored(tmp_path, pki, make_node):
    node = make_node(**tls_settings(pki, require_client_certificate=True))
    files, images = write_study("hip", tmp_path / "in", seed=32)
    tls_port = node.listener.tls_port
    assert tls_port and node.listener.port != tls_port  # the plain port stays open by default
    out = storescu(tls_port, files, "+tls", str(pki["client.key"]), str(pki["client.pem"]),
                   "+cf", str(pki["ca.pem"]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert node.instances() == 1 and len(node.spool_files()) == 1
    assert str(dcmread(node.spool_files()[0]).SOPInstanceUID) == str(images[0].dataset.SOPInstanceUID)
    # echoscu over TLS as well
    assert echoscu(tls_port, "+tls", str(pki["client.key"]), str(pki["client.pem"]),
                   "+cf", str(pki["ca.pem"])).returncode == 0


def test_plain_association_to_the_tls_port_fails(tmp_path, pki, make_node):
    node = make_node(**tls_settings(pki, keep_plain_port=False))
    assert node.listener.port == node.listener.tls_port  # only TLS now
    files, _ = write_study("hip", tmp_path / "in", seed=33)
    assert storescu(node.listener.tls_port, files).returncode != 0
    assoc = pynetdicom_assoc(node.listener.tls_port, "MODALITY", "OSTEOSCREEN")
    assert not assoc.is_established
    assert node.instances() == 0 and node.spool_files() == []
    assert port_open(node.listener.tls_port)  # and the listener still serves


def test_tls_client_certificate_required(tmp_path, pki, make_node):
    node = make_node(**tls_settings(pki, require_client_certificate=True))
    files, _ = write_study("hip", tmp_path / "in", seed=34)
    # anonymous TLS client (no certificate): the handshake fails
    out = storescu(node.listener.tls_port, files, "+tla", "+cf", str(pki["ca.pem"]))
    assert out.returncode != 0
    assert node.instances() == 0
    # the node's own sender, with its client certificate, gets through
    client = TLS(certificate=str(pki["client.pem"]), private_key=str(pki["client.key"]),
                 ca_certificates=str(pki["ca.pem"]))
    result = send_files(Destination("OSTEOSCREEN", "127.0.0.1", node.listener.tls_port, tls=True), files,
                        ae_title="MODALITY", tls=client)
    assert [r.ok for r in result] == [True], result
    anonymous = TLS(ca_certificates=str(pki["ca.pem"]))
    result = send_files(Destination("OSTEOSCREEN", "127.0.0.1", node.listener.tls_port, tls=True), files,
                        ae_title="MODALITY", tls=anonymous, timeout=5)
    assert not result[0].ok


def test_sender_delivers_over_tls_to_dcmtk_storescp(tmp_path, pki):
    require_tool("storescp")
    port, out_dir = free_port(), tmp_path / "pacs"
    out_dir.mkdir()
    peer = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(out_dir), "+tls", str(pki["server.key"]),
                             str(pki["server.pem"]), "+cf", str(pki["ca.pem"]), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: port_open(port), 10)
        files, images = write_study("lumbar", tmp_path / "in", seed=35)
        settings = load(None, {"tls": {"certificate": str(pki["client.pem"]), "private_key": str(pki["client.key"]),
                                       "ca_certificates": str(pki["ca.pem"])}}, environ={})
        dest = Destination.parse(f"PACS@localhost:{port}?tls")
        assert dest.tls and str(dest) == f"PACS@localhost:{port}?tls"
        results = send_files(dest, files, tls=settings.tls)
        assert all(r.ok and r.status == 0 for r in results), results
        received = sorted(str(dcmread(p).SOPInstanceUID) for p in out_dir.iterdir())
        assert received == sorted(str(im.dataset.SOPInstanceUID) for im in images)
        # without our CA the destination's certificate is not trusted: nothing is sent
        results = send_files(dest, files[:1], timeout=5, tls=None)
        assert not results[0].ok and "association" in results[0].error
        # a plain association to the TLS destination fails cleanly as well
        results = send_files(Destination("PACS", "127.0.0.1", port), files[:1], timeout=5)
        assert not results[0].ok
    finally:
        peer.terminate()
        peer.wait(10)


# -- limits and backpressure ----------------------------------------------------------------------
def _no_files_left(node) -> None:
    assert node.spool_files() == [], node.spool_files()
    assert node.instances() == 0


def test_data_set_over_the_size_limit_is_refused_without_a_file(tmp_path, make_node):
    node = make_node(max_dataset_bytes=1_000_000)  # a pelvis phantom is ~6 MB
    files, _ = write_study("hip", tmp_path / "in", seed=36)
    assert store_status(node.listener.port, files[0]) == 0xA700
    out = storescu(node.listener.port, files, "-v")
    assert "refused: outofresources" in (out.stdout + out.stderr).lower()
    _no_files_left(node)
    refused = node.audit("refused")
    assert len(refused) == 2 and all("max_dataset_bytes" in r.detail for r in refused)
    small = make_node(max_dataset_bytes=20_000_000)
    assert store_status(small.listener.port, files[0]) == 0


def test_low_disk_watermark_refuses_without_a_file(tmp_path, make_node):
    node = make_node(min_free_disk_mb=1 << 40)  # more than any disk has free
    files, _ = write_study("hip", tmp_path / "in", seed=37)
    assert store_status(node.listener.port, files[0]) == 0xA700
    _no_files_left(node)
    assert [r.detail for r in node.audit("refused")] == ["free disk space below min_free_disk_mb"]
    assert echoscu(node.listener.port).returncode == 0  # C-ECHO still answered


def test_queue_depth_limit_refuses_until_the_queue_drains(tmp_path, make_node):
    node = make_node(max_queued_jobs=2)
    with node.db.session() as s:
        study = Study(study_uid="1.2.3.4", status="queued")
        s.add(study)
        s.flush()
        s.add_all([Job(study_id=study.id, state="queued"), Job(study_id=study.id, state="running")])
        s.commit()
    files, _ = write_study("hip", tmp_path / "in", seed=38)
    assert store_status(node.listener.port, files[0]) == 0xA700
    _no_files_left(node)
    assert "max_queued_jobs" in node.audit("refused")[0].detail
    with node.db.session() as s:
        for job in s.scalars(select(Job)):
            job.state = "done"
        s.commit()
    assert wait_for(lambda: store_status(node.listener.port, files[0]) == 0, 5, interval=1.1)
    assert node.instances() == 1


def test_no_patient_data_in_the_log(tmp_path, make_node, caplog, pki):
    caplog.set_level(logging.DEBUG)
    node = make_node(allowed_calling_aets=["MODALITY"], max_dataset_bytes=20_000_000,
                     **tls_settings(pki))
    files, images = write_study("hip", tmp_path / "in", seed=39)
    chest, chest_images = write_study("chest", tmp_path / "in", seed=40)
    assert storescu(node.listener.port, files + chest).returncode == 0
    storescu(node.listener.port, files, aet="WRONG")
    small = make_node(max_dataset_bytes=1000)
    store_status(small.listener.port, files[0])
    assert "stored" in caplog.text and "rejected" in caplog.text and "refused" in caplog.text
    for im in images + chest_images:
        ds = im.dataset
        for value in (str(ds.PatientID), str(ds.PatientName), str(ds.PatientName).split("^")[0]):
            assert value not in caplog.text


def test_a_pdu_longer_than_the_limit_is_not_read(make_node):
    """A peer announcing a 200 MB PDU is cut off at once (pynetdicom alone would wait to read it
    whole into memory); the listener stays up."""
    import socket
    import struct
    import time

    node = make_node(max_pdu=65536)
    with socket.create_connection(("127.0.0.1", node.listener.port), timeout=10) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">L", 200_000_000) + b"\x00" * 1024)
        start = time.monotonic()
        try:
            closed = sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = True
        assert closed and time.monotonic() - start < 5
    assert echoscu(node.listener.port).returncode == 0
