"""Supervised recalibration on local DXA-labelled cases: T-score corrections, temperature, intervals.

All of it is cross-fitted by study (K folds): each case's corrected estimate comes from a fit that
did not see its study, so the residuals that calibrate the conformal intervals, and the figures the
report shows, are out-of-fold, and the reported coverage means something (a correction fitted on
the very cases that calibrate its intervals would make them too narrow; Silva-Rodríguez 2025).

- **T-score correction** per site type: ``T' = a + b·T`` by least squares of the DXA T-score on the
  estimate, the slope shrunk toward 1 with a prior worth `SLOPE_PRIOR` cases (the intercept needs
  few cases, the slope many; SITE-ADAPTATION.md). Sub-region outputs (femoral neck) get their own fit
  where the labels have them. Then, per site type, a regression of what the line leaves on image
  features the network computes (`feature_correction`): of its `CANDIDATES` (feature set, ridge or
  Gaussian process, fitted on the site type's crops or on every site type's) the site type's default,
  unless another candidate or the line alone is significantly better out of fold.
- **Prevalence.** Sets sent to DXA are enriched for low BMD. The fits weight each WHO class to the
  share it had in the model's training (uniform when the checkpoint does not say), so what they learn
  is the scanner's shift, not the referral pattern.
- **Probabilities**: a re-fitted temperature (class-weighted likelihood), and the alternative of
  reading the class probabilities off the calibrated predictive distribution of the T-score
  (crepes' conformal predictive system: P(T ≤ −2.5), P(T < −1.0)), which keeps class and T-score
  consistent. Whichever has the lower cross-validated ECE is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..findings import CLASSES
from ..model.calibration import SCENE_SETS, SITE_TYPE_NAMES, Calibration
from .feature_correction import (CANDIDATES, DEFAULTS, FALLBACK_DEFAULTS, MIN_FEATURE_CASES, SWITCH_P,
                                 fit_feature_correction, label)

SLOPE_PRIOR = 50.0  # pseudo-cases pulling the slope toward 1
MIN_CORRECTION_CASES = 10  # fewer labelled crops of a site type: no correction for it (identity)
# 10 folds: each out-of-fold residual comes from a fit on 90 % of the studies, close to the final fit
# on all of them (with 5, the intervals of a flexible feature correction came out conservative:
# 93.6 % coverage at 90 % on synthD; CV+ of Barber et al. 2021 uses K = 10 likewise)
FOLDS = 10


@dataclass
class Labelled:
    """Per labelled crop: the model's estimates and the truth (arrays of equal length)."""

    t_pred: np.ndarray  # site T estimate, uncorrected (after any adaptation)
    t_true: np.ndarray
    site_types: np.ndarray
    logits: np.ndarray  # N×3, TTA-averaged, before temperature
    groups: np.ndarray  # study of each crop
    labels: np.ndarray  # WHO class index of t_true
    region_pred: dict  # name → N estimates (NaN where none)
    region_true: dict  # name → N truths (NaN where unknown)
    features: dict | None = None  # feature set name → N×F image features (FEATURE_SETS); None: no feature correction


def class_weights(labels: np.ndarray, shares=None) -> np.ndarray:
    """Per-case weights giving each WHO class its training share (uniform by default)."""
    shares = np.full(len(CLASSES), 1 / len(CLASSES)) if shares is None else np.asarray(shares, float)
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(float)
    present = counts > 0
    target = shares * present / (shares * present).sum()
    w = np.where(present, target / np.maximum(counts, 1), 0.0)
    return w[labels] * len(labels)


def fit_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict:
    """Weighted least squares of y on x with the slope shrunk toward 1 (SLOPE_PRIOR pseudo-cases)."""
    w = w / w.mean()
    xm, ym = np.average(x, weights=w), np.average(y, weights=w)
    sxx = float(np.sum(w * (x - xm) ** 2))
    sxy = float(np.sum(w * (x - xm) * (y - ym)))
    prior = SLOPE_PRIOR * sxx / len(x)  # the prior's weight in the same units as sxx
    slope = (sxy + prior) / (sxx + prior) if sxx > 0 else 1.0
    return {"intercept": float(ym - slope * xm), "slope": float(slope), "n": int(len(x))}


def fit_corrections(d: Labelled, idx: np.ndarray, shares=None) -> dict:
    """Corrections per site type (and sub-region) from the cases `idx`."""
    out = {}
    w_all = class_weights(d.labels[idx], shares)
    for st, name in enumerate(SITE_TYPE_NAMES):
        m = d.site_types[idx] == st
        if m.sum() >= MIN_CORRECTION_CASES:
            out[name] = fit_line(d.t_pred[idx][m], d.t_true[idx][m], w_all[m])
        for region, pred in d.region_pred.items():
            known = m & np.isfinite(d.region_true[region][idx]) & np.isfinite(pred[idx])
            if known.sum() >= MIN_CORRECTION_CASES:
                out[f"{name}:{region}"] = fit_line(pred[idx][known], d.region_true[region][idx][known], w_all[known])
    return out


def fit_feature_corrections(d: Labelled, idx: np.ndarray, line: Calibration, choice: dict,
                            shares=None) -> dict:
    """Feature corrections from the cases `idx`, fitted on the residuals that `line`'s linear
    corrections leave: for each site type in `choice`, its candidate (feature set, kind, scope),
    fitted on that site type's crops or, with scope "all", on those of every site type."""
    out = {}
    if d.features is None:
        return out
    w = class_weights(d.labels[idx], shares)
    residuals = d.t_true[idx] - line.correct(d.t_pred[idx], d.site_types[idx])
    shared: dict = {}  # a scope-"all" fit is the same for every site type that chose it
    for st, name in enumerate(SITE_TYPE_NAMES):
        m = d.site_types[idx] == st
        if name not in choice or not m.any():
            continue
        feature_set, kind, scope = choice[name]
        if scope == "all":
            if (feature_set, kind) not in shared:
                shared[feature_set, kind] = fit_feature_correction(d.features[feature_set][idx], residuals, w,
                                                                   feature_set, kind)
            fit = shared[feature_set, kind] and {**shared[feature_set, kind], "fitted_on": "all site types"}
        else:
            fit = fit_feature_correction(d.features[feature_set][idx][m], residuals[m], w[m], feature_set, kind)
        if fit:
            # its term corrects the femoral neck of the same crop too (after the neck's own line): on 3
            # draws of 100 labelled synthD studies neck MAE 0.45 -> 0.30, against 0.31 for a Gaussian
            # process of its own on the neck's residuals (docs/CALIBRATION.md)
            out[name] = {**fit, "sub_regions": True}
    return out


def fit_temperature_weighted(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Temperature scaling with a class-weighted likelihood."""
    lg, y = torch.from_numpy(logits).double(), torch.from_numpy(labels)
    w = torch.from_numpy(weights).double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = (F.cross_entropy(lg / log_t.exp(), y, reduction="none") * w).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def folds_by_group(groups: np.ndarray, k: int = FOLDS, seed: int = 0) -> np.ndarray:
    """A fold number per crop; a study's crops share one."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {g: int(i % k) for g, i in zip(unique[order], range(len(unique)))}
    return np.array([fold_of[g] for g in groups])


def fused_pairs(groups: np.ndarray, site_types: np.ndarray) -> list[tuple[int, int]]:
    """(AP crop, lateral crop) of each study that has both lumbar views."""
    ap = {g: i for i, (g, st) in enumerate(zip(groups, site_types)) if st == 1}
    return [(ap[g], i) for i, (g, st) in enumerate(zip(groups, site_types)) if st == 2 and g in ap]


def residuals_by_bin(d: Labelled, corrected: np.ndarray) -> dict[str, list[float]]:
    """Signed residuals (truth − corrected estimate) per interval bin, fused lumbar studies included
    (their estimate is the mean of the two views', as the node fuses them)."""
    out = {name: (d.t_true[d.site_types == st] - corrected[d.site_types == st]).tolist()
           for st, name in enumerate(SITE_TYPE_NAMES) if (d.site_types == st).any()}
    pairs = fused_pairs(d.groups, d.site_types)
    if pairs:
        a, b = np.array(pairs).T
        out["lumbar_fused"] = (d.t_true[a] - (corrected[a] + corrected[b]) / 2).tolist()
    return out


def bins_of(site_types: np.ndarray) -> list[str]:
    return [SITE_TYPE_NAMES[int(st)] for st in site_types]


@dataclass
class CrossFit:
    corrected: np.ndarray  # out-of-fold corrected site T per crop
    region_corrected: dict  # name → out-of-fold corrected region T
    probabilities: dict  # mode ("temperature" | "predictive") → N×3 out-of-fold probabilities
    intervals: np.ndarray  # N×2 out-of-fold intervals (residuals of the other folds), NaN where none
    fused: dict | None  # out-of-fold fused lumbar estimates: index pairs, T, intervals, probabilities
    feature_choice: dict  # site type → (feature set, kind, scope) of the feature correction chosen out of fold
    feature_report: dict  # site type → n, out-of-fold MAE with the line alone and with each candidate, the default, p-values against it, the one used


def candidates_at_hand(features: dict | None) -> list:
    """The CANDIDATES whose feature set `features` holds; a set reading the whole image's descriptors
    replaces its twin without them (SCENE_SETS) when both are at hand."""
    if features is None:
        return []
    twins = {(SCENE_SETS[c[0]], *c[1:]) for c in CANDIDATES if c[0] in SCENE_SETS and c[0] in features}
    return [c for c in CANDIDATES if c[0] in features and c not in twins]


def cross_fit(d: Labelled, level: float, shares=None, seed: int = 0) -> CrossFit:
    """Everything the report shows, out of fold: the correction, temperature and intervals of each
    fold are fitted on the other folds."""
    n = len(d.t_true)
    fold = folds_by_group(d.groups, min(FOLDS, len(np.unique(d.groups))), seed)
    corrected, region_corrected = np.full(n, np.nan), {r: np.full(n, np.nan) for r in d.region_pred}
    candidates = candidates_at_hand(d.features)
    with_features = {c: np.full(n, np.nan) for c in candidates}
    probs = {"temperature": np.full((n, 3), np.nan), "predictive": np.full((n, 3), np.nan)}
    for k in np.unique(fold):
        train, test = np.where(fold != k)[0], np.where(fold == k)[0]
        cal = Calibration(created="", model={"weights_sha256": ""}, t_correction=fit_corrections(d, train, shares))
        corrected[test] = cal.correct(d.t_pred[test], d.site_types[test])
        for c in candidates:
            fits = fit_feature_corrections(d, train, cal, {name: c for name in SITE_TYPE_NAMES}, shares)
            with_c = Calibration(created="", model={"weights_sha256": ""}, t_correction=cal.t_correction,
                                 feature_correction=fits)
            with_features[c][test] = with_c.correct(d.t_pred[test], d.site_types[test],
                                                    features={c[0]: d.features[c[0]][test]})
        for r, pred in d.region_pred.items():
            region_corrected[r][test] = cal.correct(pred[test], d.site_types[test], r)
        temp = fit_temperature_weighted(d.logits[train], d.labels[train], class_weights(d.labels[train], shares))
        z = np.exp(d.logits[test] / temp - (d.logits[test] / temp).max(1, keepdims=True))
        probs["temperature"][test] = z / z.sum(1, keepdims=True)
    feature_choice, feature_report = _choose_feature_corrections(d, corrected, with_features)
    for st, name in enumerate(SITE_TYPE_NAMES):
        if name in feature_choice:
            corrected[d.site_types == st] = with_features[feature_choice[name]][d.site_types == st]
    # second pass: intervals and predictive probabilities of fold k from the other folds' residuals
    intervals = np.full((n, 2), np.nan)
    for k in np.unique(fold):
        train, test = np.where(fold != k)[0], np.where(fold == k)[0]
        sub = _subset(d, train)
        cal = Calibration(created="", model={"weights_sha256": ""}, residuals=residuals_by_bin(sub, corrected[train]))
        intervals[test] = cal.intervals(corrected[test], bins_of(d.site_types[test]), level)
        probs["predictive"][test] = cal.class_probabilities(corrected[test], bins_of(d.site_types[test]))
    fused = _cross_fit_fused(d, fold, corrected, probs, level)
    return CrossFit(corrected, region_corrected, probs, intervals, fused, feature_choice, feature_report)


def _choose_feature_corrections(d: Labelled, line: np.ndarray, with_features: dict) -> tuple[dict, dict]:
    """Per site type with at least MIN_FEATURE_CASES labelled crops (fewer cannot tell anything
    apart): its default candidate (`DEFAULTS`, or `FALLBACK_DEFAULTS` without the whole image's
    descriptors; the line alone where neither's features are at hand), unless a challenger, another candidate or the line alone, has a lower out-of-fold MAE with
    one-sided p < SWITCH_P (Wilcoxon signed-rank test on the per-study mean absolute errors; of
    several such, the one with the lowest MAE)."""
    chosen, report = {}, {}
    for st, name in enumerate(SITE_TYPE_NAMES):
        m = d.site_types == st
        if m.sum() < MIN_FEATURE_CASES or not with_features:
            continue
        options = {None: line[m], **{c: v[m] for c, v in with_features.items()
                                     if np.isfinite(v[m]).all() and not np.allclose(v[m], line[m])}}
        errors = {c: _per_study_errors(d.t_true[m] - v, d.groups[m]) for c, v in options.items()}
        mae = {c: float(np.abs(d.t_true[m] - v).mean()) for c, v in options.items()}
        default = next((c for c in (DEFAULTS.get(name), FALLBACK_DEFAULTS.get(name)) if c in options), None)
        p_values = {c: _p_lower(errors[c], errors[default]) for c in options if c != default}
        beaten = [c for c, p in p_values.items() if p < SWITCH_P and mae[c] < mae[default]]
        used = min(beaten, key=mae.get) if beaten else default
        report[name] = {"n": int(m.sum()), "mae_line": mae[None],
                        "mae": {label(c): v for c, v in mae.items() if c is not None},
                        "default": label(default) if default else None,
                        "p_against_default": {(label(c) if c else "line alone"): p for c, p in p_values.items()},
                        "used": label(used) if used else None}
        if used:
            chosen[name] = used
    return chosen, report


def _per_study_errors(residuals: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean absolute error of each study's crops (a study's two hips are not independent)."""
    _, inverse = np.unique(groups, return_inverse=True)
    return np.bincount(inverse, np.abs(residuals)) / np.bincount(inverse)


def _p_lower(challenger: np.ndarray, default: np.ndarray) -> float:
    """One-sided p of the challenger's per-study errors being lower than the default's."""
    from scipy.stats import wilcoxon
    if np.allclose(challenger, default):
        return 1.0
    return float(wilcoxon(challenger, default, alternative="less").pvalue)


def _cross_fit_fused(d: Labelled, fold, corrected, probs, level) -> dict | None:
    pairs = fused_pairs(d.groups, d.site_types)
    if not pairs:
        return None
    a, b = (np.array(v) for v in zip(*pairs))
    t = (corrected[a] + corrected[b]) / 2
    intervals = np.full((len(a), 2), np.nan)
    predictive = np.full((len(a), 3), np.nan)
    for k in np.unique(fold[a]):
        train = np.where(fold != k)[0]
        cal = Calibration(created="", model={"weights_sha256": ""},
                          residuals=residuals_by_bin(_subset(d, train), corrected[train]))
        m = fold[a] == k
        intervals[m] = cal.intervals(t[m], ["lumbar_fused"] * int(m.sum()), level)
        predictive[m] = cal.class_probabilities(t[m], ["lumbar_fused"] * int(m.sum()))
    lp = np.log(np.clip(probs["temperature"][a], 1e-6, 1)) + np.log(np.clip(probs["temperature"][b], 1e-6, 1))
    temperature = np.exp(lp / 2 - (lp / 2).max(1, keepdims=True))
    return {"ap": a, "lat": b, "t": t, "intervals": intervals,
            "probabilities": {"temperature": temperature / temperature.sum(1, keepdims=True), "predictive": predictive}}


def _subset(d: Labelled, idx: np.ndarray) -> Labelled:
    return Labelled(d.t_pred[idx], d.t_true[idx], d.site_types[idx], d.logits[idx], d.groups[idx], d.labels[idx],
                    {r: v[idx] for r, v in d.region_pred.items()}, {r: v[idx] for r, v in d.region_true.items()},
                    None if d.features is None else {k: v[idx] for k, v in d.features.items()})
