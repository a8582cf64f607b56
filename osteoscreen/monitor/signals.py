"""The drift watch's statistics: one window of a scanner group against a reference window.

A window is what the node recorded of some screened studies: each image's acquisition values
(equipment.acquisition) and each site's finding. Every signal is one univariate two-sample test,
as CheXstray and "Failing Loudly" (black-box shift detection) do it:

- metadata: pixel spacing, exposure index and kVp (Kolmogorov-Smirnov); bits stored and photometric
  interpretation (chi-square);
- appearance: the out-of-distribution score (distance over the gate's threshold; KS);
- outputs: each class probability and the T-score (KS);
- gate: assessable or not, by reason (chi-square).

A signal with too few values in either window, or with one category only, is not tested. The
decision is Bonferroni-corrected over the signals tested: a check raises `drift` at family-wise
level `alpha`. Nothing here reads the database; `monitor.watch` does, and `bench/drift.py` feeds the
same functions from the pipeline directly.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ..findings import CLASSES

NUMERIC_METADATA = ("pixel_spacing", "exposure_index", "kvp")
CATEGORICAL_METADATA = ("bits_stored", "photometric")
MIN_VALUES = 10  # fewest values per window for a signal to be tested
SIGNAL_GROUPS = {  # signal → what kind of change it is (the dashboard and the docs group by it)
    **{name: "metadata" for name in (*NUMERIC_METADATA, *CATEGORICAL_METADATA)},
    "ood_score": "appearance",
    **{f"p_{c}": "outputs" for c in CLASSES}, "t_score": "outputs",
    "gate": "gate",
}


@dataclass
class SiteRecord:
    """One site's finding as the drift watch sees it."""

    assessable: bool
    reason: str | None = None
    probabilities: dict | None = None
    t_score: float | None = None
    ood_score: float | None = None


@dataclass
class Window:
    """What some screened studies of one group showed: per study, its images' acquisition values
    (equipment.acquisition) and its sites' findings.

    Every signal has one value per study: a patient's two hips, or a lumbar AP and lateral view, are
    not independent samples, and the tests assume independent ones (counting each site as one gave
    false alarms on a stable stream)."""

    studies: list[tuple[list[dict], list[SiteRecord]]] = field(default_factory=list)
    first: str | None = None  # ISO times of its first and last study (for the report)
    last: str | None = None

    def add(self, images: list[dict], sites: list[SiteRecord]) -> None:
        self.studies.append((images, sites))

    def __len__(self) -> int:
        return len(self.studies)

    def numeric(self, name: str) -> np.ndarray:
        values = []
        for images, sites in self.studies:
            if name in NUMERIC_METADATA:
                found = [im.get(name) for im in images if im.get(name) is not None]
                values.append(found[0] if found else None)
                continue
            if name == "ood_score":
                found = [s.ood_score for s in sites if s.ood_score is not None]
            elif name == "t_score":
                found = [s.t_score for s in sites if s.assessable and s.t_score is not None]
            elif name.startswith("p_") and name[2:] in CLASSES:
                found = [(s.probabilities or {}).get(name[2:]) for s in sites if s.assessable]
                found = [v for v in found if v is not None]
            else:
                raise KeyError(name)
            values.append(float(np.mean(found)) if found else None)
        return np.array([v for v in values if v is not None], dtype=float)

    def categories(self, name: str) -> list[str]:
        out = []
        for images, sites in self.studies:
            if name == "gate":  # the study's first refusal, or assessable
                if sites:
                    out.append(next((s.reason or "unknown" for s in sites if not s.assessable), "assessable"))
                continue
            found = [im.get(name) for im in images if im.get(name) is not None]
            if found:
                out.append(str(found[0]))
        return out


@dataclass
class SignalTest:
    signal: str
    test: str  # ks | chi2
    statistic: float
    p_value: float
    n_reference: int
    n_recent: int
    summary: dict  # reference vs recent: medians (numeric) or shares (categorical)

    def to_json(self) -> dict:
        return {"signal": self.signal, "kind": SIGNAL_GROUPS[self.signal], "test": self.test,
                "statistic": round(self.statistic, 4), "p_value": float(f"{self.p_value:.4g}"),
                "n_reference": self.n_reference, "n_recent": self.n_recent, "summary": self.summary}


def _ks(name: str, ref: np.ndarray, rec: np.ndarray) -> SignalTest | None:
    if len(ref) < MIN_VALUES or len(rec) < MIN_VALUES:
        return None
    if np.ptp(np.concatenate([ref, rec])) == 0:  # one value everywhere: nothing moved
        return SignalTest(name, "ks", 0.0, 1.0, len(ref), len(rec),
                          {"reference_median": float(ref[0]), "recent_median": float(rec[0])})
    result = stats.ks_2samp(ref, rec)
    return SignalTest(name, "ks", float(result.statistic), float(result.pvalue), len(ref), len(rec),
                      {"reference_median": round(float(np.median(ref)), 4),
                       "recent_median": round(float(np.median(rec)), 4)})


def _chi2(name: str, ref: list[str], rec: list[str]) -> SignalTest | None:
    if len(ref) < MIN_VALUES or len(rec) < MIN_VALUES:
        return None
    a, b = Counter(ref), Counter(rec)
    labels = sorted(set(a) | set(b))
    shares = {"reference": {k: round(a[k] / len(ref), 3) for k in labels},
              "recent": {k: round(b[k] / len(rec), 3) for k in labels}}
    if len(labels) < 2:
        return SignalTest(name, "chi2", 0.0, 1.0, len(ref), len(rec), shares)
    table = np.array([[a[k] for k in labels], [b[k] for k in labels]])
    statistic, p, _, _ = stats.chi2_contingency(table)
    return SignalTest(name, "chi2", float(statistic), float(p), len(ref), len(rec), shares)


def compare(reference: Window, recent: Window) -> list[SignalTest]:
    """Every signal that both windows have enough of, tested."""
    tests = []
    for name in (*NUMERIC_METADATA, "ood_score", *(f"p_{c}" for c in CLASSES), "t_score"):
        tests.append(_ks(name, reference.numeric(name), recent.numeric(name)))
    for name in (*CATEGORICAL_METADATA, "gate"):
        tests.append(_chi2(name, reference.categories(name), recent.categories(name)))
    return [t for t in tests if t is not None]


def moved(tests: list[SignalTest], alpha: float) -> list[str]:
    """The signals whose p-value is below alpha / (number tested): Bonferroni at family-wise alpha."""
    if not tests:
        return []
    limit = alpha / len(tests)
    return [t.signal for t in tests if t.p_value < limit]
