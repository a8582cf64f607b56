"""The Storage SCU against a real pynetdicom peer that accepts only some SOP classes: a file the
peer cannot take fails alone, with the reason, and the rest are delivered."""
from pynetdicom import AE, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from osteoscreen.config import Destination
from osteoscreen.node.sender import send_files
from osteoscreen.reports.sr import build_sr

from .test_reports import MODEL, findings_for, make_dx, saved


def test_a_sop_class_the_peer_refuses_fails_alone(tmp_path):
    received = []
    peer = AE(ae_title="PICKY")
    peer.add_supported_context(Verification)
    peer.add_supported_context(DigitalXRayImageStorageForPresentation)  # images only, no SR

    def on_store(event):
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    server = peer.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.server_address[1]
        dx = make_dx()
        image = saved(dx, tmp_path / "dx.dcm")
        report = saved(build_sr([dx], findings_for(dx), MODEL), tmp_path / "sr.dcm")
        broken = tmp_path / "broken.dcm"
        broken.write_bytes(b"not dicom at all")
        results = send_files(Destination("PICKY", "127.0.0.1", port), [report, image, broken])
    finally:
        server.shutdown()
    assert [r.path for r in results] == [report, image, broken]
    sr, dx_result, bad = results
    assert not sr.ok and "not sent" in sr.error
    assert dx_result.ok and dx_result.status == 0 and received == [str(dx.SOPInstanceUID)]
    assert not bad.ok and "unreadable result file" in bad.error


def test_unreachable_peer_fails_every_file(tmp_path):
    dx = make_dx()
    image = saved(dx, tmp_path / "dx.dcm")
    results = send_files(Destination("NOBODY", "127.0.0.1", 9), [image], timeout=3)
    assert len(results) == 1 and not results[0].ok and results[0].error
