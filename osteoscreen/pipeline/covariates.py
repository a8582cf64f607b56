"""Clinical covariates read from the header: age, sex, BMI. Missing stays missing (an explicit
indicator for the model), never a silent default."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset


@dataclass
class Covariates:
    age_years: float | None
    sex: str | None  # "F" | "M" | None
    bmi: float | None

    def vector(self) -> list[float]:
        """Model input: scaled values plus a missing-indicator for each."""
        return [
            (self.age_years or 0.0) / 100.0, float(self.age_years is None),
            float(self.sex == "F"), float(self.sex == "M"), float(self.sex is None),
            (self.bmi or 0.0) / 40.0, float(self.bmi is None),
        ]


N_COVARIATES = 7


def _parse_date(value) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _age(ds: Dataset) -> float | None:
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY":
        n = int(text[:3])
        return n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[text[3]]
    born, seen = _parse_date(ds.get("PatientBirthDate")), _parse_date(ds.get("StudyDate") or ds.get("ContentDate"))
    if born and seen and seen >= born:
        return (seen - born).days / 365.25
    return None


def _bmi(ds: Dataset) -> float | None:
    try:
        weight, size = float(ds.get("PatientWeight") or 0), float(ds.get("PatientSize") or 0)
    except (TypeError, ValueError):
        return None
    if 20 <= weight <= 350 and 1.0 <= size <= 2.5:
        return weight / (size * size)
    return None


def read_covariates(ds: Dataset) -> Covariates:
    age = _age(ds)
    if age is not None and not 0 <= age <= 130:
        age = None
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return Covariates(age_years=age, sex=sex if sex in ("F", "M") else None, bmi=_bmi(ds))
