"""Write phantom radiographs as Digital X-Ray Image Storage – For Presentation objects.

Every attribute the DX IOD (PS3.3 A.26) makes mandatory is present so that `dciodvfy` reports no
errors; the header carries the routing words a PACS would send (BodyPartExamined, ViewPosition,
descriptions) and the covariates the model reads (age, sex, size, weight), never the T-score.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom import uid as uids
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
LOSSLESS = {uids.RLELossless, uids.JPEGLossless, uids.JPEGLosslessSV1, uids.JPEGLSLossless,
            uids.JPEG2000Lossless, uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL}

# kind → (BodyPartExamined, anatomic region code, study description, series description stem)
REGIONS = {
    "hip": ("PELVIS", codes.SCT.Pelvis, "XR PELVIS AP", "XR PELVIS"),
    "lumbar": ("LSPINE", codes.SCT.LumbarSpine, "XR LUMBAR SPINE 2 VIEWS", "XR LUMBAR SPINE"),
    "chest": ("CHEST", codes.SCT.Chest, "XR CHEST PA", "XR CHEST"),
    "leg": ("LEG", codes.SCT.LowerLeg, "XR TIBIA FIBULA AP", "XR TIBIA FIBULA"),
}
# view → (ViewPosition, view code, series description word, PatientOrientation)
VIEWS = {
    "ap": ("AP", codes.SCT.AnteroPosterior, "AP", ["L", "F"]),
    "pa": ("PA", codes.SCT.PosteroAnterior, "PA", ["L", "F"]),
    # Left lateral (left side to the detector), displayed with the patient facing image left.
    "lat": ("LL", codes.SCT.LeftLateral, "LAT", ["P", "F"]),
}


@dataclass
class PatientInfo:
    name: str
    patient_id: str
    birth_date: date
    sex: str  # "F" | "M"
    age_years: int
    size_m: float
    weight_kg: float


@dataclass
class StudyInfo:
    study_uid: str
    study_date: date
    study_time: str  # HHMMSS
    accession: str
    patient: PatientInfo


@dataclass
class ImageInfo:
    kind: str  # hip | lumbar | chest
    view: str  # ap | lat | pa
    series_uid: str
    sop_uid: str
    series_number: int
    instance_number: int
    spacing_mm: float
    bits_stored: int
    photometric: str  # MONOCHROME1 | MONOCHROME2 (bone bright either way once displayed)
    manufacturer: str = "osteoscreen"  # the scanner profile's equipment identity (General Equipment)
    model_name: str = "synthetic phantom"
    station_name: str = ""  # written when not empty
    detector_type: str = "SCINTILLATOR"  # DIRECT | SCINTILLATOR | STORAGE
    software: str = "osteoscreen.synth"
    window: tuple[float, float] | None = None  # (centre, width); None: 0.5-99.5 % of the stored values


def _code_item(code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _window(pixels: np.ndarray) -> tuple[float, float]:
    """A display window over the 0.5–99.5 % range, as a modality's processing would set it."""
    lo, hi = np.percentile(pixels[::4, ::4], [0.5, 99.5])
    width = max(float(hi - lo), 2.0)
    return round(float(lo + hi) / 2.0, 1), round(width, 1)


def _patient_modules(ds: Dataset, study: StudyInfo) -> None:
    p = study.patient
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date.strftime("%Y%m%d")
    ds.PatientSex = p.sex
    ds.PatientAge = f"{p.age_years:03d}Y"
    ds.PatientSize = f"{p.size_m:.2f}"
    ds.PatientWeight = f"{p.weight_kg:.1f}"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date.strftime("%Y%m%d")
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.accession[-8:]
    ds.AccessionNumber = study.accession


def _series_modules(ds: Dataset, image: ImageInfo) -> None:
    body_part, _, study_description, series_stem = REGIONS[image.kind]
    ds.StudyDescription = study_description
    ds.Modality = "DX"
    ds.SeriesInstanceUID = image.series_uid
    ds.SeriesNumber = image.series_number
    ds.SeriesDescription = f"{series_stem} {VIEWS[image.view][2]}"
    ds.ProtocolName = study_description
    ds.BodyPartExamined = body_part
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = image.manufacturer
    ds.ManufacturerModelName = image.model_name
    if image.station_name:
        ds.StationName = image.station_name
    ds.SoftwareVersions = image.software
    ds.InstitutionName = "SYNTHETIC"


def _image_modules(ds: Dataset, pixels: np.ndarray, study: StudyInfo, image: ImageInfo) -> None:
    view_position, view_code, _, orientation = VIEWS[image.view]
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.InstanceNumber = image.instance_number
    ds.PatientOrientation = orientation
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = study.study_time
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = study.study_time
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = [_code_item(REGIONS[image.kind][1])]
    ds.ViewPosition = view_position
    ds.ViewCodeSequence = [_code_item(view_code)]
    ds.PositionerType = "COLUMN"
    ds.DetectorType = image.detector_type
    spacing = f"{image.spacing_mm:.4f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "synthetic phantom: no magnification"
    ds.EstimatedRadiographicMagnificationFactor = "1.0"
    ds.AcquisitionContextSequence = []
    # Image Pixel + DX Image modules.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = image.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = image.bits_stored
    ds.HighBit = image.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    # +1: higher values mean more X-ray intensity (less attenuation): bone is dark in the stored
    # values, which is the MONOCHROME1 case; MONOCHROME2 stores bone bright.
    ds.PixelIntensityRelationshipSign = 1 if image.photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if image.photometric == "MONOCHROME1" else "IDENTITY"
    ds.LossyImageCompression = "00"
    center, width = image.window if image.window is not None else _window(pixels)
    ds.WindowCenter = f"{center:g}"
    ds.WindowWidth = f"{width:g}"
    ds.WindowCenterWidthExplanation = "AUTO"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def build_dataset(pixels: np.ndarray, study: StudyInfo, image: ImageInfo) -> Dataset:
    """A complete, uncompressed DX For Presentation dataset around stored `pixels` (uint16)."""
    if pixels.dtype != np.uint16 or pixels.ndim != 2:
        raise ValueError("pixels must be a 2-D uint16 array")
    if int(pixels.max()) >= 2 ** image.bits_stored:
        raise ValueError(f"pixel values exceed BitsStored={image.bits_stored}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = image.sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = image.sop_uid
    _patient_modules(ds, study)
    _series_modules(ds, image)
    _image_modules(ds, pixels, study, image)
    return ds


def write_dataset(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> None:
    """Save `ds` in `transfer_syntax`; compressed syntaxes go through pydicom's encoders (JPEG 2000
    lossless needs pylibjpeg-openjpeg). Raises ValueError when the syntax cannot be encoded."""
    uid = UID(transfer_syntax)
    if not uid.is_valid or not uid.is_transfer_syntax:
        raise ValueError(f"{transfer_syntax!r} is not a transfer syntax UID pydicom knows")
    out = copy.deepcopy(ds)  # a shallow copy would share file_meta with the caller's dataset
    try:
        if uid.is_compressed:
            out.compress(uid)
            if uid not in LOSSLESS:
                out.LossyImageCompression = "01"
        else:
            out.file_meta.TransferSyntaxUID = uid
            if not uid.is_little_endian:  # pydicom writes OW bytes as they are: swap them here
                out.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save_as(path, enforce_file_format=True)
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
        raise ValueError(f"cannot write pixel data as {uid.name} ({uid}): {exc}") from exc
