"""`osteoscreen demo`: the whole loop on one machine, with nothing else running.

A small Storage SCP stands in for the PACS. The node (all roles, SQLite, local folders) receives a
synthetic pelvis study and a synthetic lumbar AP + lateral study over DICOM, screens them, and sends
the SR, the heatmaps and, for a positive study, a Key Object Selection back to the stand-in PACS,
which files them by study.
"""
from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import func, select

from .config import Destination, Settings
from .node.sender import send_files
from .reports.read import read_sr
from .service import Node
from .store.models import Delivery, Study
from .synth import make_study

log = logging.getLogger("osteoscreen.demo")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandInPACS:
    """A minimal Storage SCP that keeps what it receives under folder/studyNN/, one folder per study."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS"):
        self.folder = folder
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax)
        self.port = free_port()
        self.received: list[Path] = []
        self.studies: dict[str, int] = {}

    def _on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        index = self.studies.setdefault(str(ds.StudyInstanceUID), len(self.studies) + 1)
        study = self.folder / f"study{index:02d}"  # folder names never come from received UIDs
        study.mkdir(parents=True, exist_ok=True)
        kind = {SR_CLASS: "SR", KO_CLASS: "KOS"}.get(ds.SOPClassUID, "heatmap")
        path = study / f"{len(self.received):04d}_{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.received.append(path)
        return 0

    def __enter__(self) -> "StandInPACS":
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


def run_demo(workdir: Path = Path("demo-output"), timeout: float = 180.0) -> int:
    work = workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)  # each demo starts from nothing
    work.mkdir(parents=True)
    rng = np.random.default_rng(20261123)
    incoming = work / "incoming"
    incoming.mkdir(exist_ok=True)
    studies = {"pelvis AP": make_study("hip", rng, patient_index=1),
               "lumbar AP + lateral": make_study("lumbar", rng, patient_index=2)}
    files = []
    for images in studies.values():
        for image in images:
            path = incoming / f"{len(files):02d}_{image.kind}_{image.view}.dcm"
            image.dataset.save_as(path, enforce_file_format=True)
            files.append(path)
    with StandInPACS(work / "pacs") as pacs:
        settings = Settings(storage=work / "var", port=free_port(), bind_address="127.0.0.1", settle_seconds=1.0,
                            destinations=[Destination("DEMOPACS", "127.0.0.1", pacs.port)])
        node = Node(settings).start()
        try:
            print(f"osteoscreen node listening as {settings.ae_title} on port {settings.port}; "
                  f"stand-in PACS DEMOPACS on port {pacs.port}")
            results = send_files(Destination(settings.ae_title, "127.0.0.1", settings.port), files, "DEMOMODALITY")
            failed = [r for r in results if not r.ok]
            if failed:
                print(f"sending failed: {failed[0].error}")
                return 1
            print(f"sent {len(files)} radiographs; waiting for results …")
            deadline = time.monotonic() + timeout
            while not _all_delivered(node, len(studies)) and time.monotonic() < deadline:
                time.sleep(0.5)
            done = _all_delivered(node, len(studies))
        finally:
            node.stop()
    if not done:
        print(f"timed out: the PACS received {len(pacs.received)} result objects; not every study was reported")
        return 1
    _print_results(studies, pacs.received)
    print(f"\nEverything (node database, spool, outbox, stand-in PACS) is under {work}")
    _print_admin_next_steps(work, settings)
    return 0


def _print_admin_next_steps(work: Path, settings: Settings) -> None:
    """Leave a dashboard configuration with a one-off demo user, and say how to look at the results."""
    import secrets

    import yaml

    from .web.auth import hash_password
    password = secrets.token_urlsafe(9)
    config = work / "dashboard.yaml"
    config.write_text(yaml.safe_dump({
        "storage": str(settings.storage.resolve()),
        "web": {"port": 8080, "users": [{"name": "demo", "role": "admin", "password_hash": hash_password(password)}]},
    }, sort_keys=False))
    config.chmod(0o600)
    storage = settings.storage
    print("\nAs an administrator, next:")
    print(f"  osteoscreen db list --storage {storage}          # the screenings, as a table (--json for scripts)")
    print(f"  osteoscreen db worklist --storage {storage}      # positives awaiting follow-up")
    print(f"  osteoscreen web --config {config}   # the dashboard on http://127.0.0.1:8080/ "
          f"(user demo, password {password})")


def _all_delivered(node: Node, n_studies: int) -> bool:
    """Every study reported and every result object the node queued delivered (the node's database
    is the bookkeeper: how many objects a study yields depends on its findings)."""
    with node.db.session() as session:
        reported = session.scalar(select(func.count()).select_from(Study).where(Study.reported_at.is_not(None)))
        waiting = session.scalar(select(func.count()).select_from(Delivery).where(Delivery.state != "delivered"))
    return reported >= n_studies and waiting == 0


def _print_results(studies: dict, received: list[Path]) -> None:
    by_study: dict[str, list[Path]] = {}
    for path in received:
        by_study.setdefault(str(dcmread(path, stop_before_pixels=True).StudyInstanceUID), []).append(path)
    print("\nResults (synthetic-phantom research model: NOT FOR DIAGNOSTIC USE)")
    for label, images in studies.items():
        uid = str(images[0].dataset.StudyInstanceUID)
        truth = {s: t.t_score for im in images for s, t in im.sites.items()}
        views = {str(im.dataset.SOPInstanceUID): im.view.upper() for im in images}
        print(f"\n{label} study (phantom truth: " + ", ".join(f"{s} T={t:+.1f}" for s, t in truth.items()) + ")")
        for path in sorted(by_study.get(uid, [])):
            ds = dcmread(path)
            if ds.SOPClassUID == SR_CLASS:
                for f in read_sr(ds):
                    text = (f"{f.category}, estimated T-score {f.t_score:+.1f}" if f.assessable
                            else f"not assessable ({f.reason})")
                    print(f"  {f.site:<13} {views.get(f.source_sop_instance_uid, ''):<4} {text}")
                print(f"  SR:      {path}")
            elif ds.SOPClassUID == KO_CLASS:
                print(f"  key object selection (positive finding): {path}")
            else:
                print(f"  heatmap: {path}")
