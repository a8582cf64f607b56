"""The node end to end, as a PACS sees it: DCMTK storescu sends, `osteoscreen serve` (a real process)
screens, DCMTK storescp receives the results. Every object received is checked with dciodvfy."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from osteoscreen.reports.read import read_sr
from osteoscreen.synth import make_study

from .conftest import dciodvfy_errors, require_tool

pytestmark = pytest.mark.slow
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
OSTEOSCREEN = [sys.executable, "-m", "osteoscreen.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Peer:
    """DCMTK storescp standing in for the PACS."""

    def __init__(self, folder: Path, port: int | None = None):
        require_tool("storescp")
        self.folder, self.port = folder, port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(folder), "+xa", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: port_open(self.port), 10)

    def objects(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class NodeProcess:
    def __init__(self, storage: Path, destination_port: int, settle: float = 1.0, port: int | None = None,
                 env: dict[str, str] | None = None):
        self.storage, self.port = storage, port or free_port()
        self.log = storage.parent / f"node-{self.port}.log"
        self.args = [*OSTEOSCREEN, "serve", "--port", str(self.port), "--storage", str(storage),
                     "--destination", f"PACS@127.0.0.1:{destination_port}"]
        self.env = {**os.environ, "OSTEOSCREEN_SETTLE_SECONDS": str(settle), "OSTEOSCREEN_BIND_ADDRESS": "127.0.0.1",
                    "OSTEOSCREEN_WEB__PORT": "0", **(env or {})}  # the dashboard on a free port
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        assert wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 60) and self.proc.poll() is None, \
            self.log.read_text()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def db(self):
        return create_engine(f"sqlite:///{self.storage / 'osteoscreen.db'}")


def storescu(port: int, files: list[Path], *extra: str) -> subprocess.CompletedProcess:
    require_tool("storescu")
    return subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "OSTEOSCREEN", *extra, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def write_study(kind: str, folder: Path, seed: int, **kw) -> tuple[list[Path], list]:
    images = make_study(kind, np.random.default_rng(seed), patient_index=seed, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{kind}{seed}_{i}.dcm"
        image.dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, images


@pytest.fixture
def peer(tmp_path):
    p = Peer(tmp_path / "pacs")
    yield p
    p.stop()


@pytest.fixture
def node(tmp_path, peer):
    n = NodeProcess(tmp_path / "var", peer.port)
    yield n
    n.stop()


def results_for(peer: Peer, study_uid: str) -> dict[str, list]:
    found = {"sr": [], "sc": [], "ko": []}
    for path in peer.objects():
        ds = dcmread(path)
        if str(ds.StudyInstanceUID) == study_uid:
            found[{SR_CLASS: "sr", KO_CLASS: "ko"}.get(ds.SOPClassUID, "sc")].append((path, ds))
    return found


def test_pelvis_and_lumbar_studies_come_back_in_their_studies(tmp_path, peer, node):
    hip_files, hip = write_study("hip", tmp_path / "in", seed=11)
    lum_files, lum = write_study("lumbar", tmp_path / "in", seed=12)
    sent = storescu(node.port, hip_files + lum_files)
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(peer.objects()) >= 2 + 3, 120), f"PACS got {peer.objects()}\n{node.log.read_text()[-3000:]}"

    hip_uid, lum_uid = str(hip[0].dataset.StudyInstanceUID), str(lum[0].dataset.StudyInstanceUID)
    # a study with an osteoporosis finding also gets a Key Object Selection, once its SR is in
    expected_kos = {uid: int(any(f.category == "osteoporosis" for f in read_sr(results_for(peer, uid)["sr"][0][1])))
                    for uid in (hip_uid, lum_uid)}
    assert wait_for(lambda: len(peer.objects()) >= 5 + sum(expected_kos.values()), 60), peer.objects()
    hip_res, lum_res = results_for(peer, hip_uid), results_for(peer, lum_uid)
    assert len(hip_res["sr"]) == 1 and len(hip_res["sc"]) == 1
    assert len(lum_res["sr"]) == 1 and len(lum_res["sc"]) == 2  # one heatmap per lumbar view
    assert (len(hip_res["ko"]), len(lum_res["ko"])) == (expected_kos[hip_uid], expected_kos[lum_uid])

    hip_findings = read_sr(hip_res["sr"][0][1])
    assert sorted(f.site for f in hip_findings) == ["left_hip", "right_hip"]
    assert all(f.source_sop_instance_uid == str(hip[0].dataset.SOPInstanceUID) for f in hip_findings)
    lum_findings = read_sr(lum_res["sr"][0][1])
    assert [f.site for f in lum_findings] == ["lumbar_spine", "lumbar_spine"]
    assert {f.source_sop_instance_uid for f in lum_findings} == {str(im.dataset.SOPInstanceUID) for im in lum}
    for f in hip_findings + lum_findings:
        assert f.assessable, f.reason
        assert f.category in ("normal", "osteopenia", "osteoporosis")
        assert sum(f.probabilities.values()) == pytest.approx(1.0, abs=0.01)
        assert -6 < f.t_score < 4

    for _, sc in hip_res["sc"] + lum_res["sc"]:
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in {
            str(im.dataset.SOPInstanceUID) for im in hip + lum}
    for path in peer.objects():
        assert dciodvfy_errors(path) == [], path

    with node.db().connect() as c:
        rows = c.execute(text("SELECT site, category FROM findings ORDER BY site")).all()
        assert [r[0] for r in rows] == ["left_hip", "lumbar_spine", "lumbar_spine", "right_hip"]
        assert c.execute(text("SELECT count(*) FROM deliveries WHERE state='delivered'")).scalar() == (
            5 + sum(expected_kos.values()))
    log = node.log.read_text()
    assert "stored" in log  # the node did log its work …
    for im in hip + lum:  # … without patient names or IDs
        assert str(im.dataset.PatientID) not in log
        assert str(im.dataset.PatientName) not in log and str(im.dataset.PatientName).split("^")[0] not in log


def test_chest_radiograph_is_accepted_skipped_and_recorded(tmp_path, peer, node):
    files, chest = write_study("chest", tmp_path / "in", seed=13)
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stderr
    uid = str(chest[0].dataset.StudyInstanceUID)

    def status():
        with node.db().connect() as c:
            return c.execute(text("SELECT status FROM studies WHERE study_uid=:u"), {"u": uid}).scalar()

    assert wait_for(lambda: status() == "skipped", 30)
    with node.db().connect() as c:
        eligible, reason = c.execute(text("SELECT eligible, skip_reason FROM instances")).one()
    assert not eligible and "body part" in reason and "CHEST" in reason
    time.sleep(2)
    assert peer.objects() == []  # nothing is produced for a non-screening image


def test_killed_right_after_success_loses_nothing(tmp_path, peer):
    # A long settle time guarantees the kill lands before any screening starts.
    node = NodeProcess(tmp_path / "var", peer.port, settle=4.0)
    files, hip = write_study("hip", tmp_path / "in", seed=14)
    sent = storescu(node.port, files)
    node.kill()
    assert sent.returncode == 0 and "Success" in (sent.stdout + sent.stderr) or sent.returncode == 0
    assert peer.objects() == []
    node.start()  # same storage, same database
    try:
        assert wait_for(lambda: len(peer.objects()) >= 2, 120), node.log.read_text()[-3000:]
        res = results_for(peer, str(hip[0].dataset.StudyInstanceUID))
        assert len(res["sr"]) == 1 and len(res["sc"]) == 1
    finally:
        node.stop()


def test_compressed_transfer_syntaxes_over_the_network(tmp_path, peer, node):
    """A JPEG 2000 and a JPEG-LS pelvis, sent as-is (storescu proposes the compressed syntax)."""
    require_tool("dcmcjpls")
    # Phantoms whose uncompressed pixels are assessable: then any site lost here is a decoding fault.
    j2k_files, j2k = write_study("hip", tmp_path / "j2k", seed=19)
    ds = dcmread(j2k_files[0])
    ds.compress("1.2.840.10008.1.2.4.90", encoding_plugin="pylibjpeg")
    ds.save_as(j2k_files[0], enforce_file_format=True)
    jls_files, jls = write_study("hip", tmp_path / "jls", seed=16)
    subprocess.run(["dcmcjpls", str(jls_files[0]), str(jls_files[0]) + ".jls"], check=True)
    for path, option in ((j2k_files[0], "--propose-j2k-lossless"), (Path(str(jls_files[0]) + ".jls"), "--propose-jls-lossless")):
        sent = storescu(node.port, [path], option)
        assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(peer.objects()) >= 4, 120), node.log.read_text()[-3000:]
    for study in (j2k, jls):
        res = results_for(peer, str(study[0].dataset.StudyInstanceUID))
        findings = read_sr(res["sr"][0][1])
        assert sorted(f.site for f in findings) == ["left_hip", "right_hip"] and all(f.assessable for f in findings)
    with node.db().connect() as c:
        syntaxes = {r[0] for r in c.execute(text("SELECT transfer_syntax_uid FROM instances"))}
    assert syntaxes == {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"}


def test_late_image_triggers_a_new_report_referencing_the_previous(tmp_path, peer, node):
    files, lumbar = write_study("lumbar", tmp_path / "in", seed=17)
    assert storescu(node.port, files[:1]).returncode == 0  # AP first
    assert wait_for(lambda: len(peer.objects()) >= 2, 120)
    first_sr = results_for(peer, str(lumbar[0].dataset.StudyInstanceUID))["sr"][0][1]
    assert storescu(node.port, files[1:]).returncode == 0  # the lateral arrives after reporting
    assert wait_for(lambda: len(results_for(peer, str(lumbar[0].dataset.StudyInstanceUID))["sr"]) >= 2, 120)
    srs = [ds for _, ds in results_for(peer, str(lumbar[0].dataset.StudyInstanceUID))["sr"]]
    second = next(ds for ds in srs if ds.SOPInstanceUID != first_sr.SOPInstanceUID)
    refs = [i.ReferencedSOPInstanceUID for s in second.PredecessorDocumentsSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert refs == [first_sr.SOPInstanceUID]
    assert len(read_sr(second)) == 2  # both views now


def test_echo_and_bad_object_keep_node_up(tmp_path, peer, node):
    require_tool("echoscu")
    assert subprocess.run(["echoscu", "-aec", "OSTEOSCREEN", "127.0.0.1", str(node.port)], timeout=30).returncode == 0
    bad = tmp_path / "bad.dcm"
    files, _ = write_study("hip", tmp_path / "in", seed=18)
    ds = dcmread(files[0])
    del ds.StudyInstanceUID  # no study to file it in: refused with a reason
    ds.save_as(bad, enforce_file_format=True)
    out = storescu(node.port, [bad])
    assert "0xc210" in (out.stdout + out.stderr).lower() or out.returncode != 0
    assert storescu(node.port, files).returncode == 0  # and a good one after it is still screened
    assert wait_for(lambda: len(peer.objects()) >= 2, 120)
    with node.db().connect() as c:
        assert c.execute(text("SELECT count(*) FROM audit_events WHERE event='rejected'")).scalar() == 1


def test_destination_down_then_up_every_result_delivered_once(tmp_path):
    """Sends to a dead PACS are retried with backoff (APScheduler) until it comes up."""
    pacs_port = free_port()
    os.environ["OSTEOSCREEN_DISPATCH_BACKOFF_SECONDS"] = "0.5"
    try:
        node = NodeProcess(tmp_path / "var", pacs_port)
    finally:
        del os.environ["OSTEOSCREEN_DISPATCH_BACKOFF_SECONDS"]
    try:
        files, hip = write_study("hip", tmp_path / "in", seed=20)
        assert storescu(node.port, files).returncode == 0

        def failed_attempts():
            with node.db().connect() as c:
                return c.execute(text("SELECT count(*) FROM deliveries WHERE attempts >= 1 AND state = 'pending' "
                                      "AND last_error IS NOT NULL")).scalar()

        assert wait_for(lambda: failed_attempts() == 2, 120), node.log.read_text()[-3000:]
        peer = Peer(tmp_path / "late-pacs", pacs_port)  # the PACS comes up where the node has been trying
        try:
            assert wait_for(lambda: len(peer.objects()) >= 2, 120), node.log.read_text()[-3000:]
            time.sleep(3)  # nothing more arrives: each object once
            assert len(peer.objects()) == 2
            with node.db().connect() as c:
                states = [r[0] for r in c.execute(text("SELECT state FROM deliveries"))]
            assert states == ["delivered", "delivered"]
        finally:
            peer.stop()
    finally:
        node.stop()


def test_roles_in_one_process_hand_work_on_without_waiting_for_their_polls(tmp_path, peer):
    """In `serve`, a settled study wakes the worker and a finished study wakes the dispatcher: with the
    worker's and the dispatcher's polls set to 10 minutes, results still arrive."""
    node = NodeProcess(tmp_path / "var", peer.port,
                       env={"OSTEOSCREEN_POLL_SECONDS": "600", "OSTEOSCREEN_DISPATCH_POLL_SECONDS": "60"})
    try:
        time.sleep(3)  # past the first scheduled ticks that fire on start
        files, _ = write_study("hip", tmp_path / "in", seed=21)
        sent = storescu(node.port, files)
        assert sent.returncode == 0, sent.stderr
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert wait_for(lambda: results_for(peer, study_uid)["sr"], 45), node.log.read_text()[-3000:]
    finally:
        node.stop()
    assert node.proc.returncode == 0 and "stopping" in node.log.read_text()


def test_a_stop_right_after_start_is_obeyed(tmp_path, peer):
    """SIGTERM while the node is still starting (its threads busy) stops it: the signal may land on any
    thread, and the main thread must still notice."""
    for _ in range(3):
        node = NodeProcess(tmp_path / "var", peer.port)
        node.proc.terminate()
        node.proc.wait(60)
        assert node.proc.returncode == 0, node.log.read_text()[-2000:]
