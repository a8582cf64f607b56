"""Synthetic DX studies with known per-site T-scores: the project's training and test data.

`make_study` returns one patient's study in memory; `synthesize` writes many studies as DICOM files
plus a `manifest.csv` with the truth. The T-score shows only in the pixels (see `phantoms`); the
header carries routing words and the covariates age, sex, size and weight.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from ..findings import SITES, who_category
from .dicom_writer import ImageInfo, PatientInfo, StudyInfo, build_dataset, write_dataset
from .phantoms import Patient, draw_patient, expose, render, upsample_mask

__all__ = ["SynthImage", "SiteTruth", "make_study", "synthesize", "MANIFEST_COLUMNS", "KINDS"]

KINDS = {"hip": ("ap",), "lumbar": ("ap", "lat"), "chest": ("pa", "ap")}  # kind → supported views
DEFAULT_VIEWS = {"hip": ("ap",), "lumbar": ("ap", "lat"), "chest": ("pa",)}
MANIFEST_COLUMNS = [
    "path", "kind", "view", "study_instance_uid", "sop_instance_uid", "true_class", "true_t_score",
    "left_hip_t_score", "right_hip_t_score", "lumbar_spine_t_score",
    "left_hip_class", "right_hip_class", "lumbar_spine_class",
    "left_hip_box", "right_hip_box", "lumbar_spine_box", "age", "sex", "bmi",
]


@dataclass
class SiteTruth:
    t_score: float
    category: str
    box: tuple[int, int, int, int]  # row0, col0, row1, col1 in source pixels, exclusive ends
    mask: np.ndarray | None  # the site's bone on the source grid (whole femur; L1-L4 bodies), or None


@dataclass
class SynthImage:
    dataset: pydicom.Dataset  # complete, with PixelData, uncompressed
    kind: str
    view: str  # "ap" | "lat" | "pa"
    sites: dict[str, SiteTruth]


def _check(kind: str, views) -> tuple[str, ...]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    views = tuple(views) if views else DEFAULT_VIEWS[kind]
    bad = [v for v in views if v not in KINDS[kind]]
    if bad or not views:
        raise ValueError(f"{kind} phantoms support views {KINDS[kind]}, got {views}")
    return views


def _study_info(kind: str, patient: Patient, rng: np.random.Generator, patient_index: int, uid_seed: str) -> StudyInfo:
    """Header identity of a phantom: synthetic names and IDs, dates consistent with the age."""
    study_date = date(2023, 1, 2) + timedelta(days=int(rng.integers(0, 3 * 365)))
    birth = date(study_date.year - patient.age, study_date.month, 1) - timedelta(days=int(rng.integers(1, 365)))
    age = study_date.year - birth.year - ((study_date.month, study_date.day) < (birth.month, birth.day))
    info = PatientInfo(name=f"PHANTOM^{kind.upper()}{patient_index:04d}", patient_id=f"SYN{kind[0].upper()}{patient_index:06d}",
                       birth_date=birth, sex=patient.sex, age_years=age, size_m=patient.height_m,
                       weight_kg=patient.weight_kg)
    time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    return StudyInfo(study_uid=generate_uid(entropy_srcs=[uid_seed, "study"]), study_date=study_date,
                     study_time=time, accession=f"SYN{int(uid_seed) % 10 ** 9:09d}", patient=info)


def _make(kind: str, rng: np.random.Generator, views, photometric, patient_index: int, masks: bool) -> list[SynthImage]:
    views = _check(kind, views)
    if photometric not in (None, "MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    uid_seed = str(int(rng.integers(2 ** 62)))
    patient = draw_patient(rng)
    study = _study_info(kind, patient, rng, patient_index, uid_seed)
    images = []
    for number, view in enumerate(views, start=1):
        rendered = render(kind, view, patient, rng, masks=masks)
        exposure, boxes = expose(rendered, rng, photometric=photometric)
        info = ImageInfo(kind=kind, view=view, series_uid=generate_uid(entropy_srcs=[uid_seed, "series", view]),
                         sop_uid=generate_uid(entropy_srcs=[uid_seed, "image", view]), series_number=number,
                         instance_number=1, spacing_mm=exposure.spacing_mm, bits_stored=exposure.bits_stored,
                         photometric=exposure.photometric)
        ds = build_dataset(exposure.pixels, study, info)
        sites = {}
        for site in SITES:
            if site not in boxes:
                continue
            mask = rendered.sites[site][1]
            t = patient.t_scores[site]
            sites[site] = SiteTruth(t_score=t, category=who_category(t), box=boxes[site],
                                    mask=None if mask is None else upsample_mask(mask, exposure.pixels.shape))
        images.append(SynthImage(dataset=ds, kind=kind, view=view, sites=sites))
    return images


def make_study(kind: str, rng: np.random.Generator, *, views: tuple[str, ...] | None = None,
               photometric: str | None = None, patient_index: int = 0) -> list[SynthImage]:
    """One patient's study: one SynthImage per view (hip: ap; lumbar: ap, lat; chest: pa), with
    the site masks on the source grid."""
    return _make(kind, rng, views, photometric, patient_index, masks=True)


def _fmt_box(box) -> str:
    return " ".join(str(int(v)) for v in box)


def _manifest_row(image: SynthImage, path: str) -> dict:
    ds = image.dataset
    row = {c: "" for c in MANIFEST_COLUMNS}
    row.update(path=path, kind=image.kind, view=image.view, study_instance_uid=str(ds.StudyInstanceUID),
               sop_instance_uid=str(ds.SOPInstanceUID), age=int(str(ds.PatientAge)[:3]), sex=str(ds.PatientSex),
               bmi=f"{float(ds.PatientWeight) / float(ds.PatientSize) ** 2:.1f}")
    for site, truth in image.sites.items():
        row[f"{site}_t_score"] = f"{truth.t_score:.3f}"
        row[f"{site}_class"] = truth.category
        row[f"{site}_box"] = _fmt_box(truth.box)
    if image.sites:
        worst = min(image.sites.values(), key=lambda t: t.t_score)
        row["true_class"], row["true_t_score"] = worst.category, f"{worst.t_score:.3f}"
    return row


def synthesize(kind: str, count: int, out: Path, *, seed: int = 0, views=None,
               transfer_syntax: str = ExplicitVRLittleEndian, progress: bool = True) -> Path:
    """Write `count` studies under `out` (file names from a counter) and `out/manifest.csv`.

    Study i is drawn from numpy's generator seeded with (seed, i): the same seed gives the same
    pixels, truth and UIDs, and any study can be regenerated on its own."""
    _check(kind, views)
    if count < 0:
        raise ValueError("count must be >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for i in tqdm(range(count), desc=f"synthesising {kind} studies", unit="study", disable=not progress):
            images = _make(kind, np.random.default_rng([seed, i]), views, None, i + 1, masks=False)
            for image in images:
                name = f"{kind}_{i + 1:05d}_{image.view}.dcm"
                write_dataset(image.dataset, out / name, transfer_syntax)
                writer.writerow(_manifest_row(image, name))
    return manifest
