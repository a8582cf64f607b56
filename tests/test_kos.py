"""Tests of the Key Object Selection document that flags a study's positive images (reports.kos)."""
from __future__ import annotations

import subprocess

import highdicom as hd
import pydicom
import pytest

from osteoscreen.findings import REASON_SITE_NOT_FOUND, ModelInfo, SiteFinding
from osteoscreen.reports import codes
from osteoscreen.reports.kos import build_kos
from osteoscreen.reports.sr import build_sr

from .conftest import dciodvfy_errors, require_tool
from .test_reports import MODEL, SR_STORAGE, make_dx, saved

KOS_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
PROBS = {"normal": 0.05, "osteopenia": 0.15, "osteoporosis": 0.8}


def finding(ds: pydicom.Dataset, site: str, category: str | None, t_score: float | None = None,
            **kw) -> SiteFinding:
    assessable = kw.pop("assessable", category is not None)
    return SiteFinding(site, str(ds.SOPInstanceUID), str(ds.SOPClassUID), assessable, category,
                       PROBS if assessable else None, t_score, **kw)


@pytest.fixture
def study() -> dict:
    """A pelvis with an osteoporotic left hip, a second pelvis that is osteopenic, and a normal lumbar
    AP; all of one study. Only the first image is positive under the default categories."""
    pelvis = make_dx()
    other = make_dx(study_uid=pelvis.StudyInstanceUID)
    lumbar = make_dx(study_uid=pelvis.StudyInstanceUID)
    findings = [
        finding(pelvis, "left_hip", "osteoporosis", -2.87, regions={"total_hip": -2.87, "femoral_neck": -3.1}),
        finding(pelvis, "right_hip", "osteopenia", -1.73),
        finding(other, "left_hip", "osteopenia", -2.1),
        finding(other, "right_hip", None, reason=REASON_SITE_NOT_FOUND),
        finding(lumbar, "lumbar_spine", "normal", 0.4),
    ]
    sources = [pelvis, other, lumbar]
    return {"sources": sources, "findings": findings, "sr": build_sr(sources, findings, MODEL)}


def content_items(kos: pydicom.Dataset, value_type: str) -> list[pydicom.Dataset]:
    return [item for item in kos.ContentSequence if item.ValueType == value_type]


def referenced(kos: pydicom.Dataset, value_type: str) -> list[tuple[str, str]]:
    """(SOP class, SOP instance) of each content item of `value_type` (IMAGE or COMPOSITE)."""
    return [(str(item.ReferencedSOPSequence[0].ReferencedSOPClassUID),
             str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)) for item in content_items(kos, value_type)]


def evidence(kos: pydicom.Dataset) -> set[str]:
    return {str(ref.ReferencedSOPInstanceUID) for study in kos.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def description(kos: pydicom.Dataset) -> str:
    texts = [item for item in content_items(kos, "TEXT") if item.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert len(texts) == 1
    return str(texts[0].TextValue)


def ref(ds: pydicom.Dataset) -> tuple[str, str]:
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def test_no_kos_without_a_positive_site(study):
    sources, findings = study["sources"], study["findings"]
    negative = [f for f in findings if f.category != "osteoporosis"]
    assert build_kos(sources, negative, MODEL, sr=study["sr"]) is None
    # An osteoporosis category on a site that was not assessable does not count.
    refused = negative + [finding(sources[0], "left_hip", "osteoporosis", -3.0, assessable=False,
                                  reason=REASON_SITE_NOT_FOUND)]
    assert build_kos(sources, refused, MODEL) is None
    # The categories decide: the same findings are positive when osteopenia counts.
    assert build_kos(sources, negative, MODEL, positive_categories=("osteopenia", "osteoporosis")) is not None


def test_kos_references_exactly_the_positive_images_and_the_sr(study):
    pelvis, other, lumbar = study["sources"]
    sr = study["sr"]
    kos = build_kos(study["sources"], study["findings"], MODEL, sr=sr, institution_name="Phantom Hospital")
    assert kos.SOPClassUID == KOS_STORAGE and kos.Modality == "KO"
    assert kos.StudyInstanceUID == pelvis.StudyInstanceUID
    assert kos.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in (pelvis, other, lumbar, sr)}
    assert (kos.SeriesNumber, kos.SeriesDescription) == (9903, "osteoscreen positive findings")
    assert kos.InstitutionName == "Phantom Hospital"
    assert referenced(kos, "IMAGE") == [ref(pelvis)]
    assert referenced(kos, "COMPOSITE") == [(SR_STORAGE, str(sr.SOPInstanceUID))]
    assert evidence(kos) == {str(pelvis.SOPInstanceUID), str(sr.SOPInstanceUID)}
    # Osteopenia counting too: the second pelvis joins, the normal lumbar spine never does.
    wider = build_kos(study["sources"], study["findings"], MODEL, sr=sr,
                      positive_categories=("osteopenia", "osteoporosis"))
    assert referenced(wider, "IMAGE") == [ref(pelvis), ref(other)]
    assert evidence(wider) == {str(pelvis.SOPInstanceUID), str(other.SOPInstanceUID), str(sr.SOPInstanceUID)}
    # Without an SR: the images alone.
    alone = build_kos(study["sources"], study["findings"], MODEL)
    assert referenced(alone, "IMAGE") == [ref(pelvis)] and referenced(alone, "COMPOSITE") == []


def test_kos_title_description_and_observer(study):
    kos = build_kos(study["sources"], study["findings"], MODEL, sr=study["sr"])
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    lines = description(kos).splitlines()
    assert lines == ["left hip: osteoporosis, estimated T-score -2.9", codes.DISCLAIMER]
    observer = [item for item in content_items(kos, "CODE") if item.ConceptNameCodeSequence[0].CodeValue == "121005"]
    assert observer[0].ConceptCodeSequence[0].CodeValue == "121007"  # Device: the algorithm
    wider = build_kos(study["sources"], study["findings"], MODEL, positive_categories=("osteopenia", "osteoporosis"))
    # One line per site, its worst finding: the left hip appears once (osteoporosis beats osteopenia).
    assert description(wider).splitlines() == ["left hip: osteoporosis, estimated T-score -2.9",
                                                "right hip: osteopenia, estimated T-score -1.7", codes.DISCLAIMER]
    algorithm = [item for item in kos.ContributingEquipmentSequence if item.get("ManufacturerModelName") == MODEL.name]
    assert codes.DISCLAIMER in algorithm[0].ContributionDescription


def test_fused_lumbar_views_are_one_line_and_both_images():
    ap = make_dx()
    lat = make_dx(study_uid=ap.StudyInstanceUID)
    fused = [finding(ds, "lumbar_spine", "osteoporosis", -3.2, fused_with=[str(o.SOPInstanceUID)])
             for ds, o in ((ap, lat), (lat, ap))]
    kos = build_kos([ap, lat], fused, MODEL)
    assert referenced(kos, "IMAGE") == [ref(ap), ref(lat)]
    assert description(kos).splitlines() == [
        "lumbar spine: osteoporosis, estimated T-score -3.2 (one estimate from 2 views combined)", codes.DISCLAIMER]


def test_kos_passes_dciodvfy(study, tmp_path):
    for name, kos in (("with-sr", build_kos(study["sources"], study["findings"], MODEL, sr=study["sr"],
                                            institution_name="Phantom Hospital")),
                      ("images-only", build_kos(study["sources"], study["findings"], MODEL,
                                                positive_categories=("osteopenia", "osteoporosis")))):
        assert dciodvfy_errors(saved(kos, tmp_path / f"{name}.dcm")) == [], name


def test_kos_reads_back_with_dcmtk_and_highdicom(study, tmp_path):
    tool = require_tool("dsrdump")
    path = saved(build_kos(study["sources"], study["findings"], MODEL, sr=study["sr"]), tmp_path / "kos.dcm")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Key Object Selection Document" in out.stdout and '"Of Interest"' in out.stdout
    doc = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    pelvis = study["sources"][0]
    assert [str(item.referenced_sop_instance_uid) for item in doc.content.get_references()] == [
        str(pelvis.SOPInstanceUID), str(study["sr"].SOPInstanceUID)]
    assert doc.resolve_reference(str(pelvis.SOPInstanceUID)) == (
        str(pelvis.StudyInstanceUID), str(pelvis.SeriesInstanceUID), str(pelvis.SOPInstanceUID))


def test_kos_uids_are_deterministic(study):
    sources, findings = study["sources"], study["findings"]
    first = build_kos(sources, findings, MODEL, sr=study["sr"])
    second = build_kos(sources, findings, MODEL, sr=study["sr"])
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
    # Source order does not matter; a predecessor or another model version makes a new object.
    reordered = build_kos(sources[::-1], findings, MODEL, sr=study["sr"])
    assert reordered.SOPInstanceUID == first.SOPInstanceUID
    later = build_kos(sources, findings, MODEL, sr=study["sr"], predecessor_sr_uid=str(study["sr"].SOPInstanceUID))
    assert later.SOPInstanceUID != first.SOPInstanceUID and later.SeriesInstanceUID == first.SeriesInstanceUID
    other = build_kos(sources, findings, ModelInfo(MODEL.name, "9.9.9", MODEL.checksum))
    assert other.SOPInstanceUID != first.SOPInstanceUID and other.SeriesInstanceUID != first.SeriesInstanceUID
    fewer = build_kos(sources[:1], findings[:2], MODEL)
    assert fewer.SOPInstanceUID != first.SOPInstanceUID
    uids = {first.SOPInstanceUID, first.SeriesInstanceUID, study["sr"].SOPInstanceUID, study["sr"].SeriesInstanceUID}
    assert len(uids) == 4  # never the SR's


@pytest.mark.parametrize("charset, name, encoded", [
    ("ISO_IR 100", "Müller^Jürgen", "Müller^Jürgen".encode("latin-1")),
    ("ISO_IR 192", "山田^太郎", "山田^太郎".encode("utf-8")),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "山田".encode("iso2022_jp")),
])
def test_patient_names_round_trip(tmp_path, charset, name, encoded):
    source = make_dx(patient_name=name, charset=charset)
    source = pydicom.dcmread(saved(source, tmp_path / "source.dcm"), stop_before_pixels=True)
    findings = [finding(source, "left_hip", "osteoporosis", -3.0)]
    kos = build_kos([source], findings, MODEL, sr=build_sr([source], findings, MODEL))
    path = saved(kos, tmp_path / "kos.dcm")
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == charset
    assert str(back.PatientName) == name
    assert encoded in path.read_bytes()
    assert (back.PatientID, back.AccessionNumber, back.StudyDescription) == ("PID0001", "ACC0001", "XR PELVIS AP")


def test_patient_comes_from_the_first_source(study):
    """The header is the first source's, as in the SR, even when that image is not positive."""
    pelvis, other, lumbar = study["sources"]
    lumbar.PatientName = "Other^Spelling"
    kos = build_kos([lumbar, pelvis, other], study["findings"], MODEL)
    assert str(kos.PatientName) == "Other^Spelling"
    assert referenced(kos, "IMAGE") == [ref(pelvis)]
    assert evidence(kos) == {str(pelvis.SOPInstanceUID)}  # the header's image is not evidence


def test_tolerates_sparse_sources(study):
    pelvis = study["sources"][0]
    for keyword in ("StudyID", "AccessionNumber", "PatientBirthDate", "ReferringPhysicianName"):
        delattr(pelvis, keyword)
    pelvis.PatientSex = "U"
    del pelvis.PixelData
    kos = build_kos(study["sources"], study["findings"], MODEL)
    assert (kos.PatientSex, kos.StudyID, kos.AccessionNumber) == ("", "", "")


def test_positive_finding_of_an_unknown_image_is_an_error(study):
    stranger = make_dx(study_uid=study["sources"][0].StudyInstanceUID)
    with pytest.raises(ValueError, match="not among the sources"):
        build_kos(study["sources"], study["findings"] + [finding(stranger, "left_hip", "osteoporosis", -3.0)], MODEL)
    with pytest.raises(ValueError):
        build_kos([], study["findings"], MODEL)
    elsewhere = make_dx()  # another study
    other_sr = build_sr([elsewhere], [finding(elsewhere, "left_hip", "normal", 0.1)], MODEL)
    with pytest.raises(ValueError, match="another study"):
        build_kos(study["sources"], study["findings"], MODEL, sr=other_sr)
