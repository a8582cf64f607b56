"""The dispatch outbox against real DICOM peers, on SQLite and PostgreSQL: the circuit breaker per
destination (state in the database), C-STORE warnings as delivered, `osteoscreen resend`."""
from __future__ import annotations

import threading
from datetime import timedelta

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import func, select, update

from osteoscreen.cli import main
from osteoscreen.config import load
from osteoscreen.dispatch import outbox
from osteoscreen.dispatch.outbox import Dispatcher, association_outcome
from osteoscreen.node.sender import SendResult
from osteoscreen.store.db import Database
from osteoscreen.store.models import AuditEvent, Delivery, DestinationCircuit, Study, utcnow
from osteoscreen.store.spool import Spool

from .test_node_e2e import Peer, free_port

PATIENT_NAME, PATIENT_ID = "DOE^JANE", "PID-4711"


def result_object(outbox_spool: Spool, study_uid: str) -> tuple[str, str]:
    """A small Secondary Capture in the outbox, as the worker writes it; returns (SOP UID, path)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.ConversionType = PATIENT_NAME, PATIENT_ID, "OT", "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    return str(ds.SOPInstanceUID), str(outbox_spool.write_dataset(ds))


@pytest.fixture
def node(tmp_path, db_url):
    """Settings and database of a dispatcher; backoff tiny so that failed deliveries are due at once."""
    settings = load(None, {"storage": str(tmp_path / "var"), "database_url": db_url})
    settings.dispatch_backoff_seconds, settings.dispatch_backoff_max_seconds = 0.001, 0.002
    settings.dispatch_max_attempts = 50
    settings.dispatch_circuit_failures, settings.dispatch_circuit_open_seconds = 3, 3600
    db = Database(db_url)
    yield settings, db
    db.dispose()


def run_due(db, dispatcher) -> int:
    """One dispatcher run with every pending delivery due: the backoff is milliseconds, but a fast
    run can still come before it."""
    with db.session() as s:
        s.execute(update(Delivery).where(Delivery.state == "pending")
                  .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    return dispatcher.run_once()


def queue_results(settings, db, destination: str, count: int, study_uid: str | None = None) -> list[int]:
    """A reported study with `count` result objects queued for destination; returns delivery ids."""
    study_uid = study_uid or generate_uid()
    spool = Spool(settings.outbox_dir)
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            study = Study(study_uid=study_uid, patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                          status="screened", reported_at=utcnow())
            s.add(study)
            s.flush()
        ds = [Delivery(study_id=study.id, sop_instance_uid=uid, kind="heatmap", path=path, destination=destination)
              for uid, path in (result_object(spool, study_uid) for _ in range(count))]
        s.add_all(ds)
        s.commit()
        return [d.id for d in ds]


class CountingSender:
    """Wraps node.sender.send_files: every call is one association attempt."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int]] = []
        real = outbox.send_files

        def send(destination, paths, *args, **kwargs):
            self.calls.append((str(destination), len(paths)))
            return real(destination, paths, *args, **kwargs)
        monkeypatch.setattr(outbox, "send_files", send)

    def to(self, destination: str) -> list[int]:
        return [n for d, n in self.calls if d == destination]


def deliveries(db, destination: str) -> list[Delivery]:
    with db.session() as s:
        return s.scalars(select(Delivery).where(Delivery.destination == destination).order_by(Delivery.id)).all()


def circuit_row(db, destination: str) -> DestinationCircuit | None:
    with db.session() as s:
        return s.get(DestinationCircuit, destination)


def received_uids(peer: Peer) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in peer.objects()]


def test_breaker_opens_after_k_failures_probes_half_open_and_closes(node, tmp_path, monkeypatch):
    settings, db = node
    healthy = Peer(tmp_path / "healthy")
    down_port = free_port()  # nothing listens here yet
    down = f"PACS@127.0.0.1:{down_port}"
    up = f"PACS@127.0.0.1:{healthy.port}"
    ids = queue_results(settings, db, down, 4)
    queue_results(settings, db, up, 2)
    sender = CountingSender(monkeypatch)
    dispatcher = Dispatcher(settings, db)
    peer = None
    try:
        # K = 3 association failures in a row open the circuit
        for _ in range(3):
            run_due(db, dispatcher)
        assert sender.to(down) == [4, 4, 4]
        row = circuit_row(db, down)
        assert row.state == "open" and row.consecutive_failures == 3 and row.retry_at > utcnow()
        assert "association" in row.last_error
        assert [d.attempts for d in deliveries(db, down)] == [3, 3, 3, 3]
        # the healthy destination went on as usual
        assert {d.state for d in deliveries(db, up)} == {"delivered"} and sender.to(up) == [2]

        # open: no association is attempted and no attempt is spent, by this dispatcher or another
        # process's (a fresh Database and Dispatcher: the state is in the database, not in memory)
        other_db = Database(settings.db_url)
        try:
            for d in (dispatcher, Dispatcher(settings, other_db)) * 3:
                assert d.run_once() == 0
        finally:
            other_db.dispose()
        assert sender.to(down) == [4, 4, 4]
        assert {(d.state, d.attempts) for d in deliveries(db, down)} == {("pending", 3)}
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.event == "circuit_open")) == 1

        # the destination comes up; the open interval is over (the timer lives in the database)
        peer = Peer(tmp_path / "pacs", port=down_port)
        with db.session() as s:
            s.execute(update(DestinationCircuit).where(DestinationCircuit.destination == down)
                      .values(retry_at=utcnow() - timedelta(seconds=1)))
            s.commit()
        # half-open: exactly one object goes as the probe; it succeeds and closes the circuit
        assert dispatcher.run_once() == 1
        assert sender.to(down) == [4, 4, 4, 1]
        row = circuit_row(db, down)
        assert row.state == "closed" and row.consecutive_failures == 0 and row.retry_at is None
        # closed: the backlog is due at once and goes in one association
        assert dispatcher.run_once() == 3
        assert sender.to(down) == [4, 4, 4, 1, 3]
        assert dispatcher.run_once() == 0
        final = deliveries(db, down)
        assert {d.state for d in final} == {"delivered"} and [d.id for d in final] == ids
        # every result delivered exactly once
        uids = received_uids(peer)
        assert sorted(uids) == sorted(d.sop_instance_uid for d in final) and len(set(uids)) == len(uids) == 4
        with db.session() as s:
            events = s.scalars(select(AuditEvent.event)).all()
            assert events.count("delivered") == 6 and events.count("circuit_closed") == 1
            assert not any(PATIENT_NAME in (e.detail or "") or PATIENT_ID in (e.detail or "")
                           for e in s.scalars(select(AuditEvent)))
    finally:
        healthy.stop()
        if peer:
            peer.stop()


def test_failed_probe_opens_the_circuit_again_for_longer(node, monkeypatch):
    settings, db = node
    settings.dispatch_circuit_open_seconds, settings.dispatch_backoff_max_seconds = 10, 1000  # the cap
    down = f"PACS@127.0.0.1:{free_port()}"
    queue_results(settings, db, down, 2)
    sender = CountingSender(monkeypatch)
    dispatcher = Dispatcher(settings, db)
    for _ in range(3):
        run_due(db, dispatcher)
    first_open = circuit_row(db, down).retry_at - circuit_row(db, down).updated_at
    with db.session() as s:
        s.execute(update(DestinationCircuit).values(retry_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    run_due(db, dispatcher)  # the probe: one object, still down
    assert sender.to(down) == [2, 2, 2, 1]
    row = circuit_row(db, down)
    assert row.state == "open" and row.consecutive_failures == 4
    assert first_open == timedelta(seconds=10)
    assert row.retry_at - row.updated_at == timedelta(seconds=20)  # doubled per failed probe, up to the cap
    assert sorted(d.attempts for d in deliveries(db, down)) == [3, 4]  # only the probe spent an attempt
    run_due(db, dispatcher)  # the circuit is open again: nothing is tried
    assert len(sender.calls) == 4


def test_breaker_off_keeps_plain_backoff_and_dead_after_n(node, monkeypatch):
    settings, db = node
    settings.dispatch_circuit_failures, settings.dispatch_max_attempts = 0, 2
    down = f"PACS@127.0.0.1:{free_port()}"
    queue_results(settings, db, down, 1)
    sender = CountingSender(monkeypatch)
    dispatcher = Dispatcher(settings, db)
    for _ in range(4):
        run_due(db, dispatcher)
    assert sender.to(down) == [1, 1]
    [d] = deliveries(db, down)
    assert d.state == "dead" and d.attempts == 2 and "association" in d.last_error
    assert circuit_row(db, down) is None


class StatusPeer:
    """A pynetdicom Storage SCP answering each C-STORE with the status chosen per SOP Instance UID."""

    def __init__(self, statuses: dict[str, int]):
        self.statuses, self.received = statuses, []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])

        def on_store(event):
            uid = str(event.request.AffectedSOPInstanceUID)
            with self.lock:
                self.received.append(uid)
            return self.statuses.get(uid, 0x0000)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self):
        self.server.shutdown()


def test_warning_statuses_count_as_delivered_and_refusals_do_not_trip_the_breaker(node):
    settings, db = node
    settings.dispatch_circuit_failures = 1  # one association failure would open it
    peer = StatusPeer({})
    dest = f"PACS@127.0.0.1:{peer.port}"
    try:
        queue_results(settings, db, dest, 3)
        warn, warn2, refused = [d.sop_instance_uid for d in deliveries(db, dest)]
        peer.statuses.update({warn: 0xB000, warn2: 0xB007, refused: 0xA700})
        assert Dispatcher(settings, db).run_once() == 2
        by_uid = {d.sop_instance_uid: d for d in deliveries(db, dest)}
        assert by_uid[warn].state == by_uid[warn2].state == "delivered"
        assert by_uid[refused].state == "pending" and by_uid[refused].last_error == "C-STORE status 0xA700"
        # the peer answered: an application-level refusal is not an association failure
        row = circuit_row(db, dest)
        assert row.state == "closed" and row.consecutive_failures == 0
        with db.session() as s:
            details = s.scalars(select(AuditEvent.detail).where(AuditEvent.event == "delivered")).all()
        assert sorted(details) == ["status 0xB000", "status 0xB007"]
    finally:
        peer.stop()


def test_association_outcome_classification():
    ok = SendResult(None, True, 0, None)
    refused = SendResult(None, False, 0xA700, "C-STORE status 0xA700")
    down = SendResult(None, False, None, "association aborted or peer unreachable (X)")
    unreadable = SendResult(None, False, None, "unreadable result file: x")
    context = SendResult(None, False, None, "not sent: no accepted presentation context")
    assert association_outcome([ok, down]) is True
    assert association_outcome([refused]) is True
    assert association_outcome([context]) is True
    assert association_outcome([down, unreadable]) is False
    assert association_outcome([SendResult(None, False, None, "association rejected (X)")]) is False
    assert association_outcome([unreadable]) is None
    assert association_outcome([ok], raised=True) is False


def test_resend_dead_deliveries_are_delivered(node, tmp_path, capsys):
    settings, db = node
    settings.dispatch_circuit_failures, settings.dispatch_max_attempts = 0, 1
    port = free_port()
    dest = f"PACS@127.0.0.1:{port}"
    study_uid = generate_uid()
    dead_ids = queue_results(settings, db, dest, 3, study_uid=study_uid)
    dispatcher = Dispatcher(settings, db)
    dispatcher.run_once()
    assert {(d.state, d.attempts) for d in deliveries(db, dest)} == {("dead", 1)}
    url = ["--database-url", settings.db_url]

    assert main(["resend", "--dead", *url]) == 0
    assert capsys.readouterr().out.strip() == "3 deliveries re-queued"
    assert {(d.state, d.attempts) for d in deliveries(db, dest)} == {("pending", 0)}
    with db.session() as s:
        audits = s.scalars(select(AuditEvent).where(AuditEvent.event == "resend")).all()
    assert sorted(a.sop_instance_uid for a in audits) == sorted(d.sop_instance_uid for d in deliveries(db, dest))
    assert all(a.study_uid == study_uid and a.peer == dest and "was dead" in a.detail for a in audits)
    assert not any(PATIENT_NAME in a.detail or PATIENT_ID in a.detail for a in audits)

    peer = Peer(tmp_path / "pacs", port=port)
    try:
        assert dispatcher.run_once() == 3
        assert {d.state for d in deliveries(db, dest)} == {"delivered"}
        assert sorted(received_uids(peer)) == sorted(d.sop_instance_uid for d in deliveries(db, dest))
        assert main(["resend", "--dead", *url]) == 0
        assert capsys.readouterr().out.strip() == "0 deliveries re-queued"

        # one delivered object again, by id (e.g. the PACS lost it)
        assert main(["resend", "--delivery", str(dead_ids[0]), *url]) == 0
        assert capsys.readouterr().out.strip() == "1 delivery re-queued"
        assert dispatcher.run_once() == 1
        # a whole study; one of its deliveries is still queued, one's outbox file is gone
        extra = queue_results(settings, db, dest, 1, study_uid=study_uid)
        gone = deliveries(db, dest)[1]
        with db.session() as s:
            s.execute(update(Delivery).where(Delivery.id == gone.id).values(purged_at=utcnow()))
            s.commit()
        assert main(["resend", "--study", study_uid, *url]) == 0
        assert capsys.readouterr().out.strip() == ("2 deliveries re-queued (1 already queued; "
                                                   "1 skipped: outbox file removed by retention)")
        assert dispatcher.run_once() == 3
        assert {d.state for d in deliveries(db, dest)} == {"delivered"} and extra
        # storescp names files by SOP Instance UID: the re-sent ones overwrote their first copies
        assert sorted(received_uids(peer)) == sorted(d.sop_instance_uid for d in deliveries(db, dest))
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(AuditEvent)
                            .where(AuditEvent.event == "delivered")) == 3 + 1 + 3
    finally:
        peer.stop()


@pytest.mark.parametrize("argv", [["resend"], ["resend", "--dead", "--study", "1.2"],
                                  ["resend", "--delivery", "x"]])
def test_resend_bad_usage_exits_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_resend_unknown_study_or_delivery_exits_2(node, capsys):
    settings, _ = node
    url = ["--database-url", settings.db_url]
    assert main(["resend", "--study", "1.2.3.999", *url]) == 2
    assert "no study" in capsys.readouterr().err
    assert main(["resend", "--delivery", "424242", *url]) == 2
    assert "no delivery with id 424242" in capsys.readouterr().err
