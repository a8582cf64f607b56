"""Realised performance: the node's latest reports against the DXA results matched to them
(`osteoscreen db performance`, the dashboard's Performance page).

The unit is a study site with a DXA T-score: the matched study's latest report's estimate for that
site (admin.queries' latest findings; lumbar AP + lateral are one fused site) against the DXA. A site is
positive when its estimated category is one of `output.positive_categories`; the truth is positive
when the DXA T-score's WHO class is. Sites the report marked not assessable are counted apart
(n_not_assessable, by reason), never as negatives; DXA sites the radiograph did not show (a lumbar
DXA of a hip study) are counted as n_without_estimate. Hips compare the total-hip T-score: the
findings keep no femoral-neck estimate, so the DXA femoral-neck columns are stored (and label
calibration rows) but not compared here.

Every figure comes from training.evaluate, the code behind `osteoscreen evaluate`: binary_metrics
(sensitivity, specificity, PPV, NPV with Wilson CIs), evaluate_arrays (T-score MAE, bias = mean of
estimate − DXA, i.e. the Bland-Altman mean difference, and the three-class confusion matrix) and
interval_coverage (share of DXA T-scores inside the reported prediction interval).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import date

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..findings import SITES, who_category
from ..store.models import Finding, Outcome, Study
from ..training.evaluate import binary_metrics, evaluate_arrays, interval_coverage
from . import queries
from .outcomes import SITE_COLUMNS, STATUSES, matched_by_study

SITE_TYPES = {"left_hip": "hip", "right_hip": "hip", "lumbar_spine": "lumbar_spine"}
GROUPINGS = ("scanner", "site_type", "month")
UNKNOWN_SCANNER = "unknown"
NECK_NOTE = ("hips compare total-hip T-scores only: the findings keep no femoral-neck estimate, so the "
             "DXA femoral-neck T-scores are stored (and label calibration rows) but not compared")


@dataclass
class Pair:
    study_uid: str
    site: str
    scanner: str
    month: str  # of the DXA date, YYYY-MM
    dxa_t: float
    assessable: bool
    category: str | None
    t_score: float | None
    low: float | None
    high: float | None
    reason: str | None

    @property
    def site_type(self) -> str:
        return SITE_TYPES[self.site]

    def key(self, grouping: str) -> str:
        return getattr(self, grouping)


def pairs(session: Session, *, since: date | None = None, until: date | None = None,
          scanner: str | None = None) -> tuple[list[Pair], dict]:
    """The compared study sites of the matched outcomes whose DXA date lies in [since, until]."""
    found, later = matched_by_study(session)
    chosen = {uid: o for uid, o in found.items()
              if (since is None or o.dxa_date >= since.isoformat())
              and (until is None or o.dxa_date <= until.isoformat())}
    ids = _ids_chunked(session, list(chosen))  # a study retention removed is gone
    screenings = queries._screenings(session, [(sid, None) for sid in ids.values()], [])
    scanners = _scanners(session, list(ids.values()))
    out: list[Pair] = []
    without = 0
    for s in screenings:
        o = chosen[s.study_uid]
        for site in SITES:
            dxa = getattr(o, SITE_COLUMNS[site])
            if dxa is None:
                continue
            r = s.sites.get(site)
            if r is None:
                without += 1
                continue
            key = scanners.get((s.study_uid, site, r.sop_instance_uid)) or UNKNOWN_SCANNER
            if scanner is not None and _norm(key) != _norm(scanner):
                continue
            out.append(Pair(s.study_uid, site, key, o.dxa_date[:7], dxa, r.assessable and r.category is not None,
                            r.category, r.t_score, r.t_score_low, r.t_score_high, r.reason))
    counts = {"outcomes": len(chosen), "studies_removed": len(chosen) - len(ids), "later_dxa_set_aside": later,
              "without_estimate": without}
    return out, counts


def _norm(key: str) -> str:
    """A scanner key compared as the findings record it (Manufacturer|ModelName), case-insensitively."""
    return "|".join(p.strip() for p in key.split("|")).casefold()


def _ids_chunked(session: Session, uids: list[str]) -> dict[str, int]:
    out = {}
    for i in range(0, len(uids), 500):
        out.update({uid: sid for uid, sid in session.execute(
            select(Study.study_uid, Study.id).where(Study.study_uid.in_(uids[i:i + 500])))})
    return out


def _scanners(session: Session, study_ids: list[int]) -> dict[tuple, str | None]:
    """(study_uid, site, image) → the scanner of that finding in the study's latest report."""
    out = {}
    for chunk in queries._chunks(study_ids):
        for uid, site, sop, scanner in session.execute(
                select(Study.study_uid, Finding.site, Finding.sop_instance_uid, Finding.scanner)
                .join(Study, Study.id == Finding.study_id)
                .where(Finding.study_id.in_(chunk), Finding.job_id == queries._newest_job_of(Finding.study_id))):
            out[(uid, site, sop)] = scanner
    return out


def figures(group: list[Pair], positive_categories: list[str]) -> dict:
    """The figures of one group of study sites (evaluate's code, see the module doc)."""
    scored = [p for p in group if p.assessable]
    refused = [p for p in group if not p.assessable]
    out: dict = {"n": len(scored), "n_not_assessable": len(refused),
                 "not_assessable_reasons": dict(Counter(p.reason or "unknown" for p in refused).most_common())}
    true_class = [who_category(p.dxa_t) for p in scored]
    predicted = [p.category for p in scored]
    binary = binary_metrics([c in positive_categories for c in true_class],
                            [c in positive_categories for c in predicted])
    out.update({k: binary[k] for k in ("tp", "fp", "tn", "fn")})
    out["n_dxa_positive"] = binary["n_true"]
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        out[name], out[f"{name}_ci"] = binary[name], binary[f"{name}_ci"]
    out.update(mae=None, bias=None, pearson_r=None, t_score_n=0, accuracy=None, confusion_matrix=None, interval=None)
    if not scored:
        return out
    nan = float("nan")
    true_t = np.array([p.dxa_t for p in scored], dtype=float)
    est_t = np.array([nan if p.t_score is None else p.t_score for p in scored], dtype=float)
    intervals = np.array([[nan if p.low is None else p.low, nan if p.high is None else p.high] for p in scored])
    report = evaluate_arrays(true_class, predicted, None, true_t, est_t)
    out["accuracy"], out["confusion_matrix"] = report["accuracy"], report["confusion_matrix"]
    t = report.get("t_score")
    if t is not None:  # evaluate reports T-score agreement from two rows on
        out.update(mae=t["mae"], bias=t["bland_altman"]["mean_difference"], pearson_r=t["pearson_r"],
                   t_score_n=t["n"])
    out["interval"] = interval_coverage(true_t, intervals)
    return out


def performance(session: Session, *, positive_categories: list[str], by: str | None = None,
                since: date | None = None, until: date | None = None, scanner: str | None = None) -> dict:
    """Figures of the whole selection (top level) and per scanner group, site type (and DXA month)."""
    if by not in (None, "month"):
        raise ValueError(f"performance by {by!r}: only by month (of the DXA date)")
    if since and until and since > until:
        raise ValueError(f"since {since} is after until {until}")
    selected, counts = pairs(session, since=since, until=until, scanner=scanner)
    status = dict.fromkeys(STATUSES, 0)
    for value in session.scalars(select(Outcome.match_status)):
        status[value] = status.get(value, 0) + 1
    report = {"positive_categories": list(positive_categories), "unit": "study site with a DXA T-score",
              "since": since.isoformat() if since else None, "until": until.isoformat() if until else None,
              "scanner": scanner, "outcomes": status, **{f"n_{k}": v for k, v in counts.items()},
              **figures(selected, positive_categories), "femoral_neck": NECK_NOTE, "groups": {}}
    for grouping in GROUPINGS:
        if grouping == "month" and by != "month":
            continue
        members: dict[str, list[Pair]] = defaultdict(list)
        for p in selected:
            members[p.key(grouping)].append(p)
        report["groups"][grouping] = {k: figures(v, positive_categories) for k, v in sorted(members.items())}
    return report


def table_rows(report: dict) -> list[tuple[str, str, dict]]:
    """(grouping, group, figures): the whole selection first, then each group (terminal and dashboard)."""
    return [("all", "", report)] + [(grouping.replace("_", " "), key, fig)
                                    for grouping, groups in report["groups"].items() for key, fig in groups.items()]
