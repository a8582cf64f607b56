"""Synthetic DX studies with known per-site T-scores: the project's training and test data.

`make_study` returns one patient's study in memory; `synthesize` writes many studies as DICOM files
plus a `manifest.csv` with the truth. The T-score shows only in the pixels (see `phantoms`); the
header carries routing words, the covariates age, sex, size and weight, and the scanner profile's
equipment identity (Manufacturer, ManufacturerModelName, StationName; see `profiles`).

Beyond bone density a study may carry: a scanner profile (drawn from `TRAINING_PROFILES` unless
given; `HELD_OUT_PROFILE` only on request), metal implants at the screening sites (`implants`,
`implant_rate`), foreign bodies away from the sites (`foreign_body_rate`), lumbar findings
(osteophytes, a wedge compression fracture, scoliosis; random at small rates unless forced), and for
each hip a femoral-neck T-score next to the total-hip one.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from tqdm import tqdm

from ..findings import SITES, who_category
from .anatomy import Patient, draw_neck_t, draw_patient
from .dicom_writer import ImageInfo, PatientInfo, StudyInfo, build_dataset, write_dataset
from .exposure import _box, expose, render, upsample_mask
from .implants import HIP_IMPLANT_KINDS, draw_foreign_bodies, draw_fusion, draw_hip_implant
from .lumbar import LUMBAR_FINDINGS, StudyExtras, draw_lumbar_findings
from .profiles import HELD_OUT_PROFILE, PROFILES, TRAINING_PROFILES, ScannerProfile, draw_profile, get_profile

__all__ = ["SynthImage", "SiteTruth", "make_study", "synthesize", "MANIFEST_COLUMNS", "KINDS", "ScannerProfile",
           "PROFILES", "TRAINING_PROFILES", "HELD_OUT_PROFILE", "LUMBAR_FINDINGS", "HIP_IMPLANT_KINDS"]

KINDS = {"hip": ("ap",), "lumbar": ("ap", "lat"), "chest": ("pa", "ap"), "leg": ("ap",)}  # kind → supported views
DEFAULT_VIEWS = {"hip": ("ap",), "lumbar": ("ap", "lat"), "chest": ("pa",), "leg": ("ap",)}
KIND_LETTERS = {"hip": "H", "lumbar": "L", "chest": "C", "leg": "T"}  # in patient IDs and accessions
KIND_SITES = {"hip": ("left_hip", "right_hip"), "lumbar": ("lumbar_spine",), "chest": (), "leg": ()}
MANIFEST_COLUMNS = [
    "path", "kind", "view", "study_instance_uid", "sop_instance_uid", "true_class", "true_t_score",
    "left_hip_t_score", "right_hip_t_score", "lumbar_spine_t_score",
    "left_hip_class", "right_hip_class", "lumbar_spine_class",
    "left_hip_box", "right_hip_box", "lumbar_spine_box", "age", "sex", "bmi",
    # appended later; older consumers ignore them
    "scanner_profile", "left_hip_implant", "right_hip_implant", "lumbar_spine_implant", "foreign_body",
    "lumbar_findings", "left_hip_neck_t_score", "right_hip_neck_t_score", "left_hip_neck_box", "right_hip_neck_box",
    "bone_mask",
]


@dataclass
class SiteTruth:
    t_score: float  # the site's T (hips: total hip)
    category: str
    box: tuple[int, int, int, int]  # row0, col0, row1, col1 in source pixels, exclusive ends
    mask: np.ndarray | None  # the site's bone on the source grid (whole femur; L1-L4 bodies), or None
    implant: bool = False  # metal at the site
    implant_kind: str = ""  # hips: tha | dhs | screws; lumbar: pedicle_screws
    regions: dict[str, float] = field(default_factory=dict)  # hips: {"femoral_neck": T, "total_hip": T}
    neck_box: tuple[int, int, int, int] | None = None  # hips: the DXA femoral-neck box, source pixels
    region_boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # femoral_neck, greater_trochanter


@dataclass
class SynthImage:
    dataset: pydicom.Dataset  # complete, with PixelData, uncompressed
    kind: str
    view: str  # "ap" | "lat" | "pa"
    sites: dict[str, SiteTruth]
    profile: str = ""  # scanner profile name
    foreign_body: bool = False  # at least one foreign body in the image
    lumbar_findings: tuple[str, ...] = ()  # lumbar studies: e.g. ("osteophytes", "compression:L2")
    bone_mask: np.ndarray | None = None  # every bone on the source grid (make_study only)


def _check(kind: str, views) -> tuple[str, ...]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    views = tuple(views) if views else DEFAULT_VIEWS[kind]
    bad = [v for v in views if v not in KINDS[kind]]
    if bad or not views:
        raise ValueError(f"{kind} phantoms support views {KINDS[kind]}, got {views}")
    return views


def _check_rate(name: str, rate: float) -> float:
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {rate}")
    return float(rate)


def _implant_request(implants) -> dict[str, str | None] | None:
    """("left_hip", "right_hip:dhs", "lumbar_spine") → {site: hip implant kind or None}."""
    if implants is None:
        return None
    if isinstance(implants, str):
        implants = (implants,)
    out = {}
    for item in implants:
        site, _, what = str(item).partition(":")
        if site not in SITES:
            raise ValueError(f"implant site must be one of {SITES}, got {site!r}")
        if what and (site == "lumbar_spine" or what not in HIP_IMPLANT_KINDS):
            raise ValueError(f"hip implants are {HIP_IMPLANT_KINDS} (lumbar: pedicle screws only), got {item!r}")
        out[site] = what or None
    return out


def _study_info(kind: str, patient: Patient, rng: np.random.Generator, patient_index: int, uid_seed: str) -> StudyInfo:
    """Header identity of a phantom: synthetic names and IDs, dates consistent with the age."""
    study_date = date(2023, 1, 2) + timedelta(days=int(rng.integers(0, 3 * 365)))
    birth = date(study_date.year - patient.age, study_date.month, 1) - timedelta(days=int(rng.integers(1, 365)))
    age = study_date.year - birth.year - ((study_date.month, study_date.day) < (birth.month, birth.day))
    info = PatientInfo(name=f"PHANTOM^{kind.upper()}{patient_index:04d}", patient_id=f"SYN{KIND_LETTERS[kind]}{patient_index:06d}",
                       birth_date=birth, sex=patient.sex, age_years=age, size_m=patient.height_m,
                       weight_kg=patient.weight_kg)
    time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    return StudyInfo(study_uid=generate_uid(entropy_srcs=[uid_seed, "study"]), study_date=study_date,
                     study_time=time, accession=f"SY{KIND_LETTERS[kind]}{int(uid_seed.partition(':')[2]) % 10 ** 9:09d}", patient=info)


def _extras(kind: str, rng: np.random.Generator, implants, implant_rate: float, lumbar_findings) -> StudyExtras:
    """Implants and lumbar findings of one study. Every parameter is drawn whatever the rates, so the
    rest of the study does not depend on them."""
    request = _implant_request(implants)
    fitted = {}
    for site in ("left_hip", "right_hip", "lumbar_spine"):
        chance = rng.random()
        if site == "lumbar_spine":
            spec = draw_fusion(rng)
        else:
            spec = draw_hip_implant(rng, (request or {}).get(site))
        wanted = chance < implant_rate if request is None else site in request
        if wanted and site in KIND_SITES[kind]:
            fitted[site] = spec
    findings = draw_lumbar_findings(rng, lumbar_findings)
    return StudyExtras(implants=fitted, lumbar=findings if kind == "lumbar" else None)


def _make(kind: str, rng: np.random.Generator, views, photometric, patient_index: int, masks: bool, *,
          profile=None, profiles=None, implants=None, implant_rate: float = 0.0, foreign_body_rate: float = 0.0,
          lumbar_findings=None) -> list[SynthImage]:
    views = _check(kind, views)
    if photometric not in (None, "MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    implant_rate = _check_rate("implant_rate", implant_rate)
    foreign_body_rate = _check_rate("foreign_body_rate", foreign_body_rate)
    chosen = None if profile is None else get_profile(profile)
    # the kind is part of the UIDs' entropy: `--kind hip --seed 7` and `--kind lumbar --seed 7` draw the
    # same number here, and must not become one study at the node
    uid_seed = f"{kind}:{int(rng.integers(2 ** 62))}"
    patient = draw_patient(rng)
    study = _study_info(kind, patient, rng, patient_index, uid_seed)
    drawn = draw_profile(rng, profiles)  # drawn always: same seed, same rest
    prof = chosen or drawn
    patient.neck_t = draw_neck_t(patient, rng)
    extras = _extras(kind, rng, implants, implant_rate, lumbar_findings)
    findings = extras.lumbar.labels if extras.lumbar is not None else ()
    images = []
    for number, view in enumerate(views, start=1):
        foreign = draw_foreign_bodies(rng, foreign_body_rate)
        rendered = render(kind, view, patient, rng, masks=masks, extras=extras, foreign=foreign)
        exposure, boxes = expose(rendered, rng, photometric=photometric, profile=prof)
        info = ImageInfo(kind=kind, view=view, series_uid=generate_uid(entropy_srcs=[uid_seed, "series", view]),
                         sop_uid=generate_uid(entropy_srcs=[uid_seed, "image", view]), series_number=number,
                         instance_number=1, spacing_mm=exposure.spacing_mm, bits_stored=exposure.bits_stored,
                         photometric=exposure.photometric, manufacturer=prof.manufacturer, model_name=prof.model_name,
                         station_name=prof.station_name, detector_type=prof.detector_type, window=exposure.window)
        ds = build_dataset(exposure.pixels, study, info)
        shape = exposure.pixels.shape
        sites = {}
        for site in SITES:
            if site not in boxes:
                continue
            mask = rendered.sites[site][1]
            t = patient.t_scores[site]
            spec = extras.implants.get(site)
            truth = SiteTruth(t_score=t, category=who_category(t), box=boxes[site],
                              mask=None if mask is None else upsample_mask(mask, shape), implant=spec is not None,
                              implant_kind="" if spec is None else getattr(spec, "kind", "pedicle_screws"))
            if site in patient.neck_t:
                truth.regions = {"femoral_neck": patient.neck_t[site], "total_hip": t}
                truth.region_boxes = {name: _box(pts, exposure.spacing_mm, shape)
                                      for name, pts in rendered.regions.get(site, {}).items()}
                truth.neck_box = truth.region_boxes.get("femoral_neck")
            sites[site] = truth
        images.append(SynthImage(dataset=ds, kind=kind, view=view, sites=sites, profile=prof.name,
                                 foreign_body=rendered.foreign_bodies > 0, lumbar_findings=findings,
                                 bone_mask=None if rendered.bone is None else upsample_mask(rendered.bone, shape)))
    return images


def make_study(kind: str, rng: np.random.Generator, *, views: tuple[str, ...] | None = None,
               photometric: str | None = None, patient_index: int = 0,
               profile: ScannerProfile | str | None = None, implants: tuple[str, ...] | None = None,
               implant_rate: float = 0.0, foreign_body_rate: float = 0.0,
               lumbar_findings: tuple[str, ...] | None = None) -> list[SynthImage]:
    """One patient's study: one SynthImage per view (hip: ap; lumbar: ap, lat; chest: pa), with
    the site masks on the source grid.

    profile: a ScannerProfile or its name; None draws one of TRAINING_PROFILES from `rng`.
    implants: sites to fit with metal, e.g. ("left_hip",), ("right_hip:dhs",), ("lumbar_spine",)
      (hip kinds: tha, dhs, screws; drawn when not named); None: each site with probability
      `implant_rate`.
    foreign_body_rate: probability that an image carries 1-3 foreign bodies (away from the sites).
    lumbar_findings: None draws them at small rates; else exactly these: "osteophytes",
      "compression" or "compression:L2", "scoliosis" (an empty tuple: none)."""
    return _make(kind, rng, views, photometric, patient_index, masks=True, profile=profile, implants=implants,
                 implant_rate=implant_rate, foreign_body_rate=foreign_body_rate, lumbar_findings=lumbar_findings)


def _fmt_box(box) -> str:
    return " ".join(str(int(v)) for v in box)


def _manifest_row(image: SynthImage, path: str) -> dict:
    ds = image.dataset
    row = {c: "" for c in MANIFEST_COLUMNS}
    row.update(path=path, kind=image.kind, view=image.view, study_instance_uid=str(ds.StudyInstanceUID),
               sop_instance_uid=str(ds.SOPInstanceUID), age=int(str(ds.PatientAge)[:3]), sex=str(ds.PatientSex),
               bmi=f"{float(ds.PatientWeight) / float(ds.PatientSize) ** 2:.1f}", scanner_profile=image.profile,
               foreign_body=int(image.foreign_body), lumbar_findings=";".join(image.lumbar_findings))
    for site, truth in image.sites.items():
        row[f"{site}_t_score"] = f"{truth.t_score:.3f}"
        row[f"{site}_class"] = truth.category
        row[f"{site}_box"] = _fmt_box(truth.box)
        row[f"{site}_implant"] = int(truth.implant)
        if "femoral_neck" in truth.regions:
            row[f"{site}_neck_t_score"] = f"{truth.regions['femoral_neck']:.3f}"
        if truth.neck_box is not None:
            row[f"{site}_neck_box"] = _fmt_box(truth.neck_box)
    if image.sites:
        worst = min(image.sites.values(), key=lambda t: t.t_score)
        row["true_class"], row["true_t_score"] = worst.category, f"{worst.t_score:.3f}"
    return row


def write_mask_png(mask: np.ndarray, path: Path) -> None:
    """A boolean mask as a 1-bit PNG (a 3000² mask is a few kB)."""
    from PIL import Image
    Image.fromarray(np.asarray(mask, dtype=bool)).save(path, optimize=True)


def synthesize(kind: str, count: int, out: Path, *, seed: int = 0, views=None,
               transfer_syntax: str = ExplicitVRLittleEndian, progress: bool = True,
               profiles=None, implant_rate: float = 0.0, foreign_body_rate: float = 0.0,
               lumbar_findings: tuple[str, ...] | None = None, bone_masks: bool = False) -> Path:
    """Write `count` studies under `out` (file names from a counter) and `out/manifest.csv`.

    bone_masks: also write each image's whole-bone mask as `<image>_bone.png` on the image's pixel
    grid (manifest column `bone_mask`); `osteoscreen train --cam-guidance` uses it. Masks draw
    nothing from the generator, so the images are the same with or without them.

    Study i is drawn from numpy's generator seeded with (seed, i): the same seed gives the same
    pixels, truth and UIDs, and any study can be regenerated on its own. `profiles` (names or
    ScannerProfiles; None: TRAINING_PROFILES) are drawn uniformly per study; `implant_rate`,
    `foreign_body_rate` and `lumbar_findings` as in `make_study`."""
    _check(kind, views)
    if count < 0:
        raise ValueError("count must be >= 0")
    if profiles is not None:
        if isinstance(profiles, (str, ScannerProfile)):
            profiles = (profiles,)
        profiles = tuple(get_profile(p) for p in profiles)
        if not profiles:
            raise ValueError("profiles must name at least one scanner profile")
    _check_rate("implant_rate", implant_rate)
    _check_rate("foreign_body_rate", foreign_body_rate)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # written as manifest.csv.partial and renamed once every study is on disk: an interrupted run
    # leaves no manifest that looks complete (scripts skip a set whose manifest exists)
    manifest, partial = out / "manifest.csv", out / "manifest.csv.partial"
    manifest.unlink(missing_ok=True)
    with open(partial, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for i in tqdm(range(count), desc=f"synthesising {kind} studies", unit="study", disable=not progress):
            images = _make(kind, np.random.default_rng([seed, i]), views, None, i + 1, masks=bone_masks,
                           profiles=profiles, implant_rate=implant_rate, foreign_body_rate=foreign_body_rate,
                           lumbar_findings=lumbar_findings)
            for image in images:
                name = f"{kind}_{i + 1:05d}_{image.view}.dcm"
                write_dataset(image.dataset, out / name, transfer_syntax)
                row = _manifest_row(image, name)
                if bone_masks and image.bone_mask is not None:
                    row["bone_mask"] = name.replace(".dcm", "_bone.png")
                    write_mask_png(image.bone_mask, out / row["bone_mask"])
                writer.writerow(row)
    partial.replace(manifest)
    return manifest
