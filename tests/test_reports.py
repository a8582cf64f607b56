"""Tests of the result-object builders (osteoscreen.reports): SR, heatmap SC, and reading the SR back."""
from __future__ import annotations

import subprocess
import sys
from copy import deepcopy
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from osteoscreen.findings import one_decimal
from osteoscreen.findings import REASON_SITE_NOT_FOUND, REASON_TEXT, ModelInfo, SiteFinding
from osteoscreen.reports import codes
from osteoscreen.reports.heatmap import CATEGORY_COLOURS, build_heatmap
from osteoscreen.reports.read import read_sr
from osteoscreen.reports.sr import build_sr

from .conftest import require_tool

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SIZE = 256


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    """A Code Sequence item."""
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def make_dx(patient_name: str = "Test^Patient", charset: str = "ISO_IR 100",
            study_uid: str | None = None) -> pydicom.Dataset:
    """A small but valid Digital X-Ray For Presentation image (AP pelvis)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.PatientName = patient_name
    ds.PatientID = "PID0001"
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "F"
    ds.PatientAge = "074Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240102"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR PELVIS AP"
    ds.Modality = "DX"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "Phantom Imaging"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "PELVIS"
    ds.ViewPosition = "AP"
    ds.ViewCodeSequence = [_code("399348003", "SCT", "antero-posterior")]
    ds.PositionerType = ""
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = [_code("816092008", "SCT", "Pelvis")]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionContextSequence = []
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.DetectorType = "SCINTILLATOR"
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "detector plane"
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ds.PixelData = ((xx * 7 + yy * 5) % 4096).astype(np.uint16).tobytes()
    return ds



MODEL = ModelInfo("osteonet-test", "1.2.0", "0123456789abcdef" * 4)
LEFT_BOX = (90, 150, 170, 230)  # row0, col0, row1, col1 in source pixels
RIGHT_BOX = (90, 26, 170, 106)
SCALE = 0.5  # display pixels per source pixel
STABLE_SKIP = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
               "DateOfSecondaryCapture", "TimeOfSecondaryCapture")


def findings_for(ds: pydicom.Dataset) -> list[SiteFinding]:
    """Two assessable hips (with boxes) and a lumbar spine that was not found."""
    uid, cls = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    return [
        SiteFinding("left_hip", uid, cls, True, "osteoporosis",
                    {"normal": 0.05, "osteopenia": 0.17, "osteoporosis": 0.78}, -2.87, box=LEFT_BOX,
                    regions={"total_hip": -2.87, "femoral_neck": -3.12}),
        SiteFinding("right_hip", uid, cls, True, "osteopenia",
                    {"normal": 0.21, "osteopenia": 0.69, "osteoporosis": 0.1}, -1.73, box=RIGHT_BOX),
        SiteFinding("lumbar_spine", uid, cls, False, reason=REASON_SITE_NOT_FOUND),
    ]


def display_and_heat() -> tuple[np.ndarray, np.ndarray]:
    """A display grid (SCALE of the source) and a Grad-CAM blob centred in the left-hip box."""
    n = round(SIZE * SCALE)
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    display = (0.3 + 0.4 * np.exp(-((yy - n / 2) ** 2 + (xx - n / 2) ** 2) / (n * n / 8))).astype(np.float32)
    r0, c0, r1, c1 = (v * SCALE for v in LEFT_BOX)
    heat = np.exp(-((yy - (r0 + r1) / 2) ** 2 + (xx - (c0 + c1) / 2) ** 2) / (2 * 6.0 ** 2)).astype(np.float32)
    return display, heat


def heatmap_for(ds: pydicom.Dataset, model: ModelInfo = MODEL) -> pydicom.Dataset:
    display, heat = display_and_heat()
    return build_heatmap(ds, display, heat, findings_for(ds), model, display_scale=SCALE)


def saved(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's output lines for a file (the tool is required in CI, skipped elsewhere)."""
    require_tool("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]


def stable_bytes(ds: pydicom.Dataset) -> bytes:
    """The encoded object without the attributes that record when it was made."""
    ds = deepcopy(ds)
    for keyword in STABLE_SKIP:
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def chroma(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel colourfulness: max minus min channel."""
    return rgb.max(axis=-1).astype(int) - rgb.min(axis=-1).astype(int)


@pytest.fixture
def source() -> pydicom.Dataset:
    return make_dx()


def test_fixture_is_valid_dx(tmp_path):
    errors = [line for line in dciodvfy(saved(make_dx(), tmp_path / "dx.dcm")) if "Error" in line]
    assert errors == []


def test_sr_passes_dciodvfy(source, tmp_path):
    sr = build_sr([source], findings_for(source), MODEL, institution_name="Phantom Hospital")
    lines = dciodvfy(saved(sr, tmp_path / "sr.dcm"))
    print("\n".join(lines))
    assert [line for line in lines if "Error" in line] == []


def test_heatmap_passes_dciodvfy(source, tmp_path):
    lines = dciodvfy(saved(heatmap_for(source), tmp_path / "heatmap.dcm"))
    print("\n".join(lines))
    assert [line for line in lines if "Error" in line] == []


def test_dsrdump_renders_sr(source, tmp_path):
    tool = require_tool("dsrdump")
    path = saved(build_sr([source], findings_for(source), MODEL), tmp_path / "sr.dcm")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for text in ('"Osteoporosis"', '"Osteopenia"', '"Estimated T-score")="-2.9"', '"Site not found in the image"',
                 '"Left"', '"Artificial Intelligence"', "Verification Flag   : UNVERIFIED",
                 "Completion Flag     : COMPLETE"):
        assert text in out.stdout


def test_sr_attributes(source):
    sr = build_sr([source], findings_for(source), MODEL, institution_name="Phantom Hospital")
    assert sr.SOPClassUID == SR_STORAGE
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sr.PatientID, sr.AccessionNumber, sr.StudyDescription) == ("PID0001", "ACC0001", "XR PELVIS AP")
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.InstitutionName == "Phantom Hospital"
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == ["99OSTEOSCREEN"]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [ref.ReferencedSOPInstanceUID for ref in evidence] == [source.SOPInstanceUID]
    algorithm = [item for item in sr.ContributingEquipmentSequence if item.get("ManufacturerModelName") == MODEL.name]
    assert algorithm[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert "PredecessorDocumentsSequence" not in sr


def test_sr_is_deterministic(source):
    first = build_sr([source], findings_for(source), MODEL)
    second = build_sr([source], findings_for(source), MODEL)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
    assert stable_bytes(first) == stable_bytes(second)


def test_heatmap_is_deterministic(source):
    first, second = heatmap_for(source), heatmap_for(source)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (second.SOPInstanceUID, second.SeriesInstanceUID)
    assert stable_bytes(first) == stable_bytes(second)


def test_heatmap_of_a_new_report_gets_a_new_uid(source):
    display, heat = display_and_heat()
    def build(report_uid):
        return build_heatmap(source, display, heat, findings_for(source), MODEL, display_scale=SCALE,
                             report_uid=report_uid)
    first, again, later = build("1.2.3.4"), build("1.2.3.4"), build("1.2.3.5")
    assert first.SOPInstanceUID == again.SOPInstanceUID != later.SOPInstanceUID
    assert first.SeriesInstanceUID == later.SeriesInstanceUID  # one heatmap series per model version


def test_model_version_changes_uids(source):
    other = ModelInfo(MODEL.name, "1.3.0", MODEL.checksum)
    sr, sr_other = (build_sr([source], findings_for(source), m) for m in (MODEL, other))
    hm, hm_other = heatmap_for(source), heatmap_for(source, other)
    assert sr.SOPInstanceUID != sr_other.SOPInstanceUID
    assert sr.SeriesInstanceUID != sr_other.SeriesInstanceUID
    assert hm.SOPInstanceUID != hm_other.SOPInstanceUID
    assert hm.SeriesInstanceUID != hm_other.SeriesInstanceUID
    assert len({sr.SOPInstanceUID, sr.SeriesInstanceUID, hm.SOPInstanceUID, hm.SeriesInstanceUID}) == 4


def test_read_sr_round_trips_findings(tmp_path):
    pelvis = make_dx()
    lumbar = make_dx(study_uid=pelvis.StudyInstanceUID)
    expected = findings_for(pelvis) + [SiteFinding(
        "lumbar_spine", str(lumbar.SOPInstanceUID), str(lumbar.SOPClassUID), True, "normal",
        {"normal": 0.9, "osteopenia": 0.08, "osteoporosis": 0.02}, -0.4, box=(10, 100, 240, 160))]
    sr = build_sr([pelvis, lumbar], expected, MODEL)
    back = read_sr(pydicom.dcmread(saved(sr, tmp_path / "sr.dcm")))
    assert [f.to_json() for f in back] == [f.to_json() for f in expected]
    for got, want in zip(back, expected):
        assert (got.source_sop_instance_uid, got.source_sop_class_uid) == (want.source_sop_instance_uid,
                                                                           want.source_sop_class_uid)
        # T-scores are written to one decimal, as DXA reports them
        assert got.t_score == one_decimal(want.t_score) and got.probabilities == want.probabilities
        assert got.regions == ({k: one_decimal(v) for k, v in want.regions.items()} if want.regions else want.regions)
    assert back[2].reason == REASON_SITE_NOT_FOUND and back[2].category is None
    series = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert {s.SeriesInstanceUID for s in series} == {pelvis.SeriesInstanceUID, lumbar.SeriesInstanceUID}


def test_every_reason_has_a_short_code():
    for reason in REASON_TEXT:
        assert len(codes.reason_code(reason).value) <= 16
    with pytest.raises(ValueError):
        codes.reason_code("no_such_reason")


@pytest.mark.parametrize("charset, name, encoded", [
    ("ISO_IR 100", "Müller^Jürgen", "Müller^Jürgen".encode("latin-1")),
    ("ISO_IR 192", "山田^太郎", "山田^太郎".encode("utf-8")),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎", "山田".encode("iso2022_jp")),  # highdicom rejects this
])
def test_patient_names_round_trip(tmp_path, charset, name, encoded):
    source = make_dx(patient_name=name, charset=charset)
    source = pydicom.dcmread(saved(source, tmp_path / "source.dcm"), stop_before_pixels=True)
    for kind, ds in (("sr", build_sr([source], findings_for(source), MODEL)), ("heatmap", heatmap_for(source))):
        path = saved(ds, tmp_path / f"{kind}.dcm")
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == charset
        assert str(back.PatientName) == name
        assert encoded in path.read_bytes()


def test_heatmap_pixels(source):
    display, _ = display_and_heat()
    ds = heatmap_for(source)
    rgb = ds.pixel_array
    rows, cols = display.shape
    assert ds.SOPClassUID == SC_STORAGE and ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert ds.BitsAllocated == 8 and rgb.shape[1:] == (cols, 3) and rgb.shape[0] > rows
    r0, c0, r1, c1 = (round(v * SCALE) for v in LEFT_BOX)
    colour = chroma(rgb[:rows])
    assert colour[(r0 + r1) // 2, (c0 + c1) // 2] > 60  # overlay at the heat peak inside the box
    assert tuple(rgb[(r0 + r1) // 2, c0]) == CATEGORY_COLOURS["osteoporosis"]  # box outline
    assert colour[:20].max() <= 1 and colour[rows - 20:rows].max() <= 1  # grey far from the sites
    band = rgb[rows:]
    assert band.mean() < 60 and (band.min(axis=-1) > 200).any()  # white text on black
    yellow = (band[..., 0] > 200) & (band[..., 1] > 180) & (band[..., 2] < 80)
    assert yellow.any()  # the not-for-diagnostic-use line


def test_heatmap_without_gradcam_has_no_overlay(source):
    display, _ = display_and_heat()
    ds = build_heatmap(source, display, None, findings_for(source), MODEL, display_scale=SCALE)
    r0, c0, r1, c1 = (round(v * SCALE) for v in LEFT_BOX)
    assert chroma(ds.pixel_array[r0 + 5:r1 - 5, c0 + 5:c1 - 5]).max() <= 1


def test_legend_names_grad_cam_only_where_there_is_an_estimate(source):
    from osteoscreen.reports.heatmap import render
    display, heat = display_and_heat()
    refused = [SiteFinding(f.site, f.source_sop_instance_uid, f.source_sop_class_uid, False,
                           reason=REASON_SITE_NOT_FOUND) for f in findings_for(source)]
    with_estimate = render(display, heat, findings_for(source), MODEL, SCALE)
    without = render(display, heat, refused, MODEL, SCALE)
    no_map = render(display, np.zeros_like(heat), findings_for(source), MODEL, SCALE)
    # the text band is one wrapped line per entry: the legend line adds height
    assert with_estimate.shape[0] > without.shape[0] and with_estimate.shape[0] > no_map.shape[0]


def test_heatmap_attributes(source):
    ds = heatmap_for(source)
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.BurnedInAnnotation, ds.ConversionType, list(ds.ImageType)) == ("YES", "WSD", ["DERIVED", "SECONDARY"])
    assert (ds.PatientName, ds.PatientID) == (source.PatientName, source.PatientID)
    ref = ds.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_predecessor_is_referenced(source):
    first = build_sr([source], findings_for(source), MODEL)
    second = build_sr([source], findings_for(source), MODEL, predecessor=first, instance_number=2)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    item = second.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == source.StudyInstanceUID
    series = item.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert (series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
            series.ReferencedSOPSequence[0].ReferencedSOPClassUID) == (first.SOPInstanceUID, SR_STORAGE)


def test_tolerates_sparse_sources(source):
    """Field data: empty Type 2 attributes dropped, non-standard sex, no pixels."""
    for keyword in ("StudyID", "AccessionNumber", "PatientBirthDate", "ReferringPhysicianName"):
        delattr(source, keyword)
    source.PatientSex = "U"
    del source.PixelData
    sr = build_sr([source], findings_for(source), MODEL)
    assert (sr.PatientSex, sr.StudyID, sr.AccessionNumber) == ("", "", "")
    assert heatmap_for(source).PatientSex == ""


def test_reports_import_only_findings():
    code = ("import sys, osteoscreen.reports.sr, osteoscreen.reports.heatmap, osteoscreen.reports.read, "
            "osteoscreen.reports.kos; "
            "print(sorted(m for m in sys.modules if m.startswith('osteoscreen.') "
            "and not m.startswith(('osteoscreen.reports', 'osteoscreen.findings'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _texts(item) -> list[str]:
    out = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        out += _texts(child)
    return out


def test_summary_says_when_views_were_fused():
    ap, lat = make_dx(), make_dx()
    lat.StudyInstanceUID = ap.StudyInstanceUID
    probs = {"normal": 0.1, "osteopenia": 0.3, "osteoporosis": 0.6}
    fused = [SiteFinding("lumbar_spine", str(ds.SOPInstanceUID), str(ds.SOPClassUID), True, "osteoporosis", probs,
                         -2.8, fused_with=[str(other.SOPInstanceUID)]) for ds, other in ((ap, lat), (lat, ap))]
    texts = " ".join(_texts(build_sr([ap, lat], fused, MODEL)))
    assert "Worst site: lumbar spine, osteoporosis, estimated T-score -2.8." in texts
    assert "lumbar spine: one estimate from several views combined" in texts
    single = [SiteFinding("lumbar_spine", str(ap.SOPInstanceUID), str(ap.SOPClassUID), True, "osteoporosis", probs, -2.8)]
    assert "several views" not in " ".join(_texts(build_sr([ap], single, MODEL)))


def test_fused_estimate_names_both_views_as_its_sources(tmp_path):
    ap, lat = make_dx(), make_dx()
    lat.StudyInstanceUID = ap.StudyInstanceUID
    probs = {"normal": 0.1, "osteopenia": 0.3, "osteoporosis": 0.6}
    fused = [SiteFinding("lumbar_spine", str(ds.SOPInstanceUID), str(ds.SOPClassUID), True, "osteoporosis", probs,
                         -2.8, fused_with=[str(other.SOPInstanceUID)]) for ds, other in ((ap, lat), (lat, ap))]
    sr = build_sr([ap, lat], fused, MODEL)
    back = read_sr(sr)
    assert [(f.source_sop_instance_uid, f.fused_with) for f in back] == [
        (str(ap.SOPInstanceUID), [str(lat.SOPInstanceUID)]), (str(lat.SOPInstanceUID), [str(ap.SOPInstanceUID)])]
    assert [line for line in dciodvfy(saved(sr, tmp_path / "fused.dcm")) if "Error" in line] == []
    single = build_sr([ap], fused[:1], MODEL)  # the other view is not in this report: only its own image
    assert read_sr(single)[0].fused_with == []
