"""The node inside a real PACS: Orthanc routes radiographs to `osteoscreen serve` and receives the
results back into the same studies.

Studies go to Orthanc only (DCMTK storescu, never to the node directly). Orthanc's Lua script
(docker/orthanc/route.lua, the one the demo PACS of docker/compose.yaml runs) sends every stored
CR/DX instance to the node; the node sends its SR, heatmaps and (when a site is estimated
osteoporotic) a Key Object Selection back to Orthanc, where the script leaves them alone. Everything is read back through Orthanc's REST API.

One Orthanc and one node serve the whole module; each has its own free ports, storage under a
temporary folder and a log file that is printed when a test fails. Both are started by
bench/orthanc.py, the start-up bench/latency.py uses too: Orthanc's settings are its BASE_CONFIG
(paths, ports and the node's address filled in), with OverwriteInstances, so that a re-sent image is
stored again and routed again, as a PACS re-routing a study would.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from bench.common import free_ports, tail_of, wait_for
from bench.orthanc import Node, Orthanc, find_orthanc
from osteoscreen.reports.read import read_sr
from osteoscreen.synth import make_study

from .conftest import dciodvfy_errors, require_tool

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document
SETTLE_SECONDS = 3.0  # AP and lateral forwarded by Orthanc well inside this: one report per study
RESULTS_TIMEOUT = 180  # seconds for every study to come back (model load + screening on a busy machine)


# -- peers: bench/orthanc.py's Orthanc and node, shared with bench/latency.py ----------------------
def orthanc_binary() -> str:
    """Orthanc's path; a skip where it is not installed (a failure in CI, which installs it)."""
    path = find_orthanc()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Orthanc is not installed (CI installs the orthanc package)")
        pytest.skip("Orthanc not installed (apt-get install orthanc, or make system-deps)")
    return path


def storescu_to_orthanc(orthanc: Orthanc, files: list[Path]) -> None:
    require_tool("storescu")
    orthanc.store(files, timeout=120)


# -- studies ---------------------------------------------------------------------------------------
@dataclass
class Study:
    name: str
    datasets: list  # the sent images (pydicom datasets)
    files: list[Path]
    results: list[dict] = field(default_factory=list)  # Orthanc instances that are not the sent images

    @property
    def uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def source_uids(self) -> set[str]:
        return {str(ds.SOPInstanceUID) for ds in self.datasets}

    def of_class(self, sop_class: str) -> list[dict]:
        return [r for r in self.results if r["tags"].get("SOPClassUID") == sop_class]

    def modality(self, modality: str) -> list[dict]:
        return [r for r in self.results if r["tags"].get("Modality") == modality]

    def sr(self) -> dict:
        srs = self.of_class(SR_CLASS)
        assert len(srs) == 1, f"{self.name}: {len(srs)} SRs in Orthanc"
        return srs[0]


def save(datasets: list, folder: Path, name: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{name}_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def hip_study_where(wanted, first_seed: int, tries: int = 60):
    """The first pelvis phantom from `first_seed` on whose truth (per site, what `synth` writes to
    manifest.csv) satisfies `wanted`; clean (no metal). Expectations are then derived from the SR."""
    for seed in range(first_seed, first_seed + tries):
        images = make_study("hip", np.random.default_rng(seed), patient_index=seed, implants=())
        if wanted(list(images[0].sites.values())):
            return images
    raise AssertionError("no such phantom")  # pragma: no cover


def normal_hip_study():
    """Both hips clearly normal (T >= -0.5): no site should be flagged."""
    return hip_study_where(lambda sites: all(t.t_score >= -0.5 for t in sites), 109)


def osteoporotic_hip_study():
    """Both hips osteoporotic, one well below -2.5 (T <= -3.2): very likely estimated osteoporotic."""
    return hip_study_where(lambda sites: min(t.t_score for t in sites) <= -3.2
                           and all(t.category == "osteoporosis" for t in sites), 105)


def disguised_chest():
    """A chest radiograph whose header claims a pelvis AP (as tests/test_quality.py): routed as a hip,
    refused on its pixels."""
    pelvis = make_study("hip", np.random.default_rng(4401), patient_index=4401)[0].dataset
    chest = make_study("chest", np.random.default_rng(4402), patient_index=4402)[0].dataset
    disguised = deepcopy(chest)
    for keyword in ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ViewPosition"):
        setattr(disguised, keyword, pelvis[keyword].value)
    return [disguised]


# -- the module's round trip ------------------------------------------------------------------------
class RoundTrip:
    def __init__(self, folder: Path):
        self.folder = folder
        self.orthanc: Orthanc | None = None
        self.node: Node | None = None
        self.studies: dict[str, Study] = {}

    def diagnostics(self) -> str:
        parts = []
        if self.node is not None:
            parts.append(f"--- node log ({self.node.log}) ---\n{tail_of(self.node.log, 6000)}")
        if self.orthanc is not None:
            parts.append(f"--- Orthanc log ({self.orthanc.log}) ---\n{tail_of(self.orthanc.log, 6000)}")
        return "\n".join(parts)

    def start(self) -> None:
        node_port, dicom_port, http_port = free_ports(3)
        self.orthanc = Orthanc(self.folder / "orthanc", node_port, dicom_port=dicom_port, http_port=http_port,
                               verbose=True, binary=orthanc_binary())
        self.node = Node(self.folder / "node" / "var", node_port, dicom_port, settle_seconds=SETTLE_SECONDS,
                         env={"OSTEOSCREEN_DISPATCH_BACKOFF_SECONDS": "1"}, start_timeout=90)

    def stop(self) -> None:
        for peer in (self.node, self.orthanc):
            if peer is not None:
                peer.stop()

    def progress(self, study: Study) -> tuple[str | None, int, int]:
        """(the node's study status, result objects it queued for Orthanc, how many of those it has
        delivered and Orthanc holds)."""
        rows = self.node.query("SELECT status FROM studies WHERE study_uid = :u", u=study.uid)
        if not rows:
            return None, 0, 0
        deliveries = self.node.query("SELECT d.sop_instance_uid, d.state FROM deliveries d JOIN studies s "
                                     "ON s.id = d.study_id WHERE s.study_uid = :u", u=study.uid)
        in_orthanc = {i["tags"].get("SOPInstanceUID") for i in self.orthanc.instances(study.uid)}
        held = sum(state == "delivered" and uid in in_orthanc for uid, state in deliveries)
        return rows[0][0], len(deliveries), held

    def wait_until_reported(self, studies: list[Study], timeout: float = RESULTS_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        pending = list(studies)
        while pending and time.monotonic() < deadline:
            for name, peer in (("node", self.node), ("Orthanc", self.orthanc)):
                assert peer.proc.poll() is None, f"{name} exited ({peer.proc.returncode})\n{self.diagnostics()}"
            for study in list(pending):
                status, queued, held = self.progress(study)
                assert status != "failed", f"the node failed to screen {study.name}\n{self.diagnostics()}"
                if status == "screened" and queued > 0 and held == queued:
                    pending.remove(study)
            time.sleep(0.5)
        assert not pending, (f"not every result in Orthanc after {timeout}s: (name, node status, queued, in Orthanc) "
                             f"{[(s.name, *self.progress(s)) for s in pending]}\n{self.diagnostics()}")

    def fetch(self, study: Study) -> list[dict]:
        """The study's instances in Orthanc other than the sent images, each with its file."""
        out_dir = self.folder / "from-orthanc" / study.name
        out_dir.mkdir(parents=True, exist_ok=True)
        results = []
        for inst in self.orthanc.instances(study.uid):
            if inst["tags"].get("SOPInstanceUID") in study.source_uids:
                continue
            path = out_dir / f"{inst['id']}.dcm"
            path.write_bytes(self.orthanc.get_bytes(f"/instances/{inst['id']}/file"))
            results.append({**inst, "path": path, "ds": dcmread(path)})
        return results


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    require_tool("storescu")
    orthanc_binary()
    folder = tmp_path_factory.mktemp("orthanc-round-trip")
    trip = RoundTrip(folder)
    try:
        trip.start()
        inbox = folder / "to-orthanc"
        lumbar = make_study("lumbar", np.random.default_rng(12), patient_index=12)  # truth: osteoporotic
        studies = [
            Study("pelvis", [im.dataset for im in normal_hip_study()], []),
            Study("lumbar", [im.dataset for im in lumbar], []),
            Study("not_assessable", disguised_chest(), []),
            Study("osteoporotic", [im.dataset for im in osteoporotic_hip_study()], []),
        ]
        for study in studies:
            study.files = save(study.datasets, inbox / study.name, study.name)
            trip.studies[study.name] = study
        storescu_to_orthanc(trip.orthanc, [f for s in studies for f in s.files])
        trip.wait_until_reported(studies)
        for study in studies:
            study.results = trip.fetch(study)
        yield trip
    except BaseException:
        print(trip.diagnostics(), file=sys.stderr)
        raise
    finally:
        trip.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(request, round_trip):
    """Print both logs when a test of this module fails."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\n{round_trip.diagnostics()}", file=sys.stderr)


def findings_of(study: Study):
    return read_sr(study.sr()["ds"])


# -- tests -----------------------------------------------------------------------------------------
def test_radiographs_reach_the_node_through_orthanc_and_results_are_not_forwarded(round_trip):
    """The Lua route sends exactly the sent radiographs, from Orthanc; nothing the node produced goes back."""
    node = round_trip.node
    sent = {uid for s in round_trip.studies.values() for uid in s.source_uids}
    received = node.query("SELECT sop_instance_uid, modality FROM instances")
    assert {r[0] for r in received} == sent
    assert {r[1] for r in received} <= {"DX", "CR"}
    peers = {r[0] for r in node.query("SELECT DISTINCT peer FROM audit_events "
                                      "WHERE event IN ('received', 'duplicate')")}
    assert peers == {"ORTHANC"}
    results = {r["tags"]["SOPInstanceUID"] for s in round_trip.studies.values() for r in s.results}
    assert results and not results & {r[0] for r in received}


def test_pelvis_comes_back_with_sr_and_heatmap_in_the_same_study(round_trip):
    study = round_trip.studies["pelvis"]
    source = study.datasets[0]
    sr = study.sr()
    heatmaps = study.of_class(SC_CLASS)
    assert len(heatmaps) == 1
    assert sr["tags"]["Modality"] == "SR" and str(sr["ds"].SOPClassUID) == SR_CLASS
    orthanc_source = [i for i in round_trip.orthanc.instances(study.uid)
                      if i["tags"]["SOPInstanceUID"] in study.source_uids]
    assert len(orthanc_source) == 1
    for result in (sr, heatmaps[0]):
        assert str(result["ds"].StudyInstanceUID) == study.uid and result["study"] == orthanc_source[0]["study"]
        assert str(result["ds"].SeriesInstanceUID) != str(source.SeriesInstanceUID)  # a new series …
        assert result["series"] != orthanc_source[0]["series"]  # … in Orthanc too
    assert sr["series"] != heatmaps[0]["series"]
    assert str(heatmaps[0]["ds"].SourceImageSequence[0].ReferencedSOPInstanceUID) == str(source.SOPInstanceUID)

    findings = findings_of(study)
    assert sorted(f.site for f in findings) == ["left_hip", "right_hip"]
    for f in findings:
        assert f.source_sop_instance_uid == str(source.SOPInstanceUID)
        assert f.assessable, f.reason
        assert f.category in ("normal", "osteopenia", "osteoporosis") and -6 < f.t_score < 4


def test_lumbar_ap_and_lateral_come_back_in_one_sr_and_two_heatmaps(round_trip):
    study = round_trip.studies["lumbar"]
    findings = findings_of(study)
    assert [f.site for f in findings] == ["lumbar_spine", "lumbar_spine"]
    assert {f.source_sop_instance_uid for f in findings} == study.source_uids
    assert all(f.assessable for f in findings), [f.reason for f in findings]
    heatmaps = study.of_class(SC_CLASS)
    assert len(heatmaps) == 2
    assert {str(h["ds"].SourceImageSequence[0].ReferencedSOPInstanceUID) for h in heatmaps} == study.source_uids
    assert all(str(r["ds"].StudyInstanceUID) == study.uid for r in study.results)


def test_not_assessable_study_gets_an_sr_with_the_reason_and_no_key_object(round_trip):
    study = round_trip.studies["not_assessable"]
    findings = findings_of(study)
    assert sorted(f.site for f in findings) == ["left_hip", "right_hip"]
    for f in findings:
        assert not f.assessable and f.reason, f
        assert f.category is None and f.source_sop_instance_uid == str(study.datasets[0].SOPInstanceUID)
    assert study.modality("KO") == [] and study.of_class(KO_CLASS) == []
    assert study.of_class(SC_CLASS) == []  # no estimate, no heatmap: the SR says why


def test_every_result_is_valid_dicom_and_dsrdump_renders_the_reports(round_trip):
    require_tool("dsrdump")
    results = [r for s in round_trip.studies.values() for r in s.results]
    assert results
    for r in results:
        assert dciodvfy_errors(r["path"]) == [], (r["tags"].get("Modality"), r["path"])
        if r["tags"].get("SOPClassUID") in (SR_CLASS, KO_CLASS):
            out = subprocess.run(["dsrdump", str(r["path"])], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            if r["tags"]["SOPClassUID"] == SR_CLASS:
                assert "Imaging Measurement Report" in out.stdout, out.stdout[:2000]


def test_no_key_object_without_an_osteoporosis_finding(round_trip):
    for study in round_trip.studies.values():
        if not any(f.category == "osteoporosis" for f in findings_of(study)):
            assert study.modality("KO") == [] and study.of_class(KO_CLASS) == [], study.name


def referenced_uids(kos) -> tuple[set[str], set[str]]:
    """(instances the KOS content items reference, instances its evidence sequence lists)."""
    content = {str(ref.ReferencedSOPInstanceUID) for item in kos.get("ContentSequence", [])
               if item.ValueType in ("IMAGE", "COMPOSITE") for ref in item.ReferencedSOPSequence}
    evidence = {str(ref.ReferencedSOPInstanceUID) for study in kos.get("CurrentRequestedProcedureEvidenceSequence", [])
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    return content, evidence


def test_an_osteoporosis_finding_gets_one_key_object_selecting_its_image(round_trip):
    positive = [(s, [f for f in findings_of(s) if f.category == "osteoporosis"]) for s in round_trip.studies.values()]
    positive = [(s, fs) for s, fs in positive if fs]
    if not positive:
        pytest.skip("the model estimated no site osteoporotic, not even on the phantom with T <= -3.2: "
                    "nothing to select (check the model, not the KOS)")
    if not (REPO / "osteoscreen" / "reports" / "kos.py").exists():
        pytest.skip("the node sends no Key Object Selection yet (osteoscreen/reports/kos.py is missing): "
                    f"{[s.name for s, _ in positive]} would need one")
    for study, findings in positive:
        kos = study.modality("KO")
        assert len(kos) == 1 and kos == study.of_class(KO_CLASS), (study.name, [k["tags"].get("Modality") for k in kos])
        ds = kos[0]["ds"]
        assert str(ds.StudyInstanceUID) == study.uid and str(ds.SeriesInstanceUID) not in {
            str(d.SeriesInstanceUID) for d in study.datasets}
        expected = {f.source_sop_instance_uid for f in findings}
        content, evidence = referenced_uids(ds)
        assert content & study.source_uids == expected, (study.name, content, expected)
        assert expected <= evidence
        # whatever else it selects (the SR) is in the same study in Orthanc
        in_study = study.source_uids | {r["tags"]["SOPInstanceUID"] for r in study.results}
        assert content | evidence <= in_study, (content | evidence) - in_study


def test_node_log_has_no_patient_name_or_id(round_trip):
    log = round_trip.node.log.read_text()
    assert "stored" in log and "screened" in log  # the node did log its work …
    for study in round_trip.studies.values():  # … without names or IDs
        for ds in study.datasets:
            assert str(ds.PatientID) not in log, study.name
            name = str(ds.PatientName)
            assert name not in log and name.split("^")[0] not in log, study.name


def test_resending_a_study_adds_nothing(round_trip):
    """Orthanc (OverwriteInstances) re-stores the pelvis and routes it again; the node sees a
    duplicate and sends nothing new, so Orthanc's results stay exactly as they were. Runs last."""
    orthanc, node = round_trip.orthanc, round_trip.node
    study = round_trip.studies["pelvis"]
    source_uid = str(study.datasets[0].SOPInstanceUID)

    def results_in_orthanc() -> dict[str, list[str]]:
        out = {}
        for s in round_trip.studies.values():
            out[s.name] = sorted(i["tags"]["SOPInstanceUID"] for i in orthanc.instances(s.uid)
                                 if i["tags"]["SOPInstanceUID"] not in s.source_uids)
        return out

    def duplicates() -> int:
        return node.query("SELECT count(*) FROM audit_events WHERE event = 'duplicate' AND sop_instance_uid = :u",
                          u=source_uid)[0][0]

    before = results_in_orthanc()
    assert before["pelvis"] == sorted(r["tags"]["SOPInstanceUID"] for r in study.results)
    jobs_before = node.query("SELECT count(*) FROM jobs")[0][0]
    seen_before = duplicates()
    storescu_to_orthanc(orthanc, study.files)
    assert wait_for(lambda: duplicates() > seen_before, 60), \
        f"the node never received the re-sent pelvis from Orthanc\n{round_trip.diagnostics()}"
    time.sleep(SETTLE_SECONDS + 5)  # a re-report would be queued, screened and sent within this window
    assert node.query("SELECT status FROM studies WHERE study_uid = :u", u=study.uid) == [("screened",)]
    assert node.query("SELECT count(*) FROM jobs")[0][0] == jobs_before
    after = results_in_orthanc()
    assert after == before
    assert len(after["pelvis"]) == len(set(after["pelvis"]))
    assert len(orthanc.instances(study.uid)) == len(study.source_uids) + len(study.results)
