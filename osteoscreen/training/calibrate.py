"""`osteoscreen calibrate`: one calibration for one scanner (or scanner group) from its own images.

Rows without T-scores adapt without labels: the out-of-distribution gate is re-referenced to the
scanner's crops (`adapt.refit_gate`) and, with `batchnorm`, the BatchNorm statistics are
re-estimated first (`adapt.adapt_batchnorm`). Rows with DXA T-scores recalibrate
(`recalibrate`: per-site-type T-score corrections, linear and, where they beat it out of fold, on
the image features; temperature or predictive probabilities; and the residuals of Mondrian
conformal intervals), all cross-fitted by study. Without labels the
calibration keeps the model's own corrections and intervals, and says that their coverage at this
scanner is unverified.

The report (printed, and kept in the calibration) gives n per site type and the figures before
(the model as the node runs it today) and after (out of fold), with 95 % CIs.
"""
from __future__ import annotations

import copy
import getpass
import socket
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..findings import CLASSES
from ..model.calibration import SITE_TYPE_NAMES, Calibration, feature_sets
from ..model.inference import LoadedModel, mahalanobis
from .adapt import DEFAULT_SITE_TYPE_SHARES, adapt_batchnorm, refit_gate
from .dataset import REGION_OUTPUTS, Samples, extract_samples
from .evaluate import evaluate_arrays, wilson_ci
from .recalibrate import FOLDS, Labelled, bins_of, cross_fit, fit_corrections, fit_feature_corrections, \
    fit_temperature_weighted, class_weights, residuals_by_bin
from .batches import normalise_batch, predict_outputs

MIN_CROPS = 20  # crops (after the localiser) for any adaptation
MIN_LABELLED_STUDIES = 20  # labelled studies for a supervised recalibration


class NotEnoughData(ValueError):
    """Too few usable cases for what was asked (the CLI exits 2)."""


def network_outputs(model: LoadedModel, s: Samples, device: str = "cpu", net=None) -> dict:
    """What calibrate reads of a network (the model's, or `net` with adapted BatchNorm) on the crops
    of `s`, TTA-averaged: class logits, site and sub-region T estimates (uncorrected), the gate's
    features and the feature corrections' feature sets (model.calibration.feature_sets)."""
    o = predict_outputs(net or model.net, s, torch.device(device), tta=model.tta)
    t = o.t_norm.numpy().astype(np.float64) * model.t_std + model.t_mean
    return {"logits": o.logits.numpy().astype(np.float64), "t": t[:, 0],
            "regions": {r: t[:, k + 1] for k, r in enumerate(REGION_OUTPUTS) if t.shape[1] > k + 1},
            "features": o.features.numpy().astype(np.float64),  # the gate's
            "feature_sets": feature_sets(o.features.numpy().astype(np.float64),
                                         o.channel_stats.numpy().astype(np.float64), s.site_types, s.images,
                                         s.scenes)}


def subset_outputs(out: dict, idx: np.ndarray, s: Samples) -> dict:
    """network_outputs of the crops `idx`, whose samples are `s`: the image pairing of the feature
    sets is made again within them."""
    pooled = out["features"][idx]
    return {"logits": out["logits"][idx], "t": out["t"][idx], "regions": {r: v[idx] for r, v in out["regions"].items()},
            "features": pooled,
            "feature_sets": feature_sets(pooled, out["feature_sets"]["channel_stats"][idx], s.site_types, s.images,
                                         s.scenes)}


def _refused(features: np.ndarray, site_types: np.ndarray, gate: dict) -> np.ndarray:
    out = np.zeros(len(features), dtype=bool)
    for st, (mean, precision, threshold) in gate.items():
        m = site_types == st
        if m.any():
            out[m] = mahalanobis(features[m], mean, precision) > threshold
    return out


def _bootstrap_ci(values: np.ndarray, groups: np.ndarray, stat, seed: int = 0, n: int = 500) -> list[float] | None:
    """95 % percentile CI of stat(values) resampling studies (a study's crops are not independent)."""
    if len(values) < 3:
        return None
    unique = np.unique(groups)
    index = {g: np.where(groups == g)[0] for g in unique}
    rng = np.random.default_rng(seed)
    draws = [stat(values[np.concatenate([index[g] for g in rng.choice(unique, len(unique))])]) for _ in range(n)]
    return [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]


def figures(t_true, t_pred, probs, intervals, groups, refused=None) -> dict:
    """MAE and bias (bootstrap CIs by study), osteoporosis AUC (DeLong CI), ECE, interval coverage
    (Wilson CI) of one set of estimates: the same evaluation code `osteoscreen evaluate` runs."""
    err = t_pred - t_true
    report = evaluate_arrays([CLASSES[i] for i in _labels(t_true)], [CLASSES[i] for i in np.argmax(probs, 1)],
                             probs, t_true, t_pred, intervals)
    osteo = report["classes"]["osteoporosis"]
    out = {"n": int(len(t_true)), "mae": float(np.abs(err).mean()),
           "mae_ci": _bootstrap_ci(np.abs(err), groups, np.mean), "bias": float(err.mean()),
           "bias_ci": _bootstrap_ci(err, groups, np.mean), "osteoporosis_auc": osteo.get("auc"),
           "osteoporosis_auc_ci": osteo.get("auc_ci"), "osteoporosis_sensitivity": osteo.get("sensitivity"),
           "ece": report.get("ece"), "accuracy": report["accuracy"],
           "interval": report.get("t_score", {}).get("interval")}
    if refused is not None:
        out["refused"] = int(refused.sum())
    return out


def _labels(t: np.ndarray) -> np.ndarray:
    return np.where(t <= -2.5, 2, np.where(t < -1.0, 1, 0))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _before(model: LoadedModel, out: dict, lab: np.ndarray, s: Samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The estimates the node gives today: the model under its own calibration."""
    own = model.calibration
    t = out["t"][lab]
    probs = _softmax(out["logits"][lab] / model.temperature)
    intervals = np.full((int(lab.sum()), 2), np.nan)
    if own is not None:
        t = own.correct(t, s.site_types[lab], features={k: v[lab] for k, v in out["feature_sets"].items()})
        if own.probabilities == "predictive":
            probs = own.class_probabilities(t, bins_of(s.site_types[lab]))
        intervals = own.intervals(t, bins_of(s.site_types[lab]), model.interval_level)
    return t, probs, intervals


def calibrate(manifests: list[Path], model_path: Path, *, scanner: str | None = None, level: float = 0.9,
              batchnorm: bool = False, batchnorm_prior: float = 16.0, device: str = "cpu", progress: bool = True,
              seed: int = 0, samples: Samples | None = None, adapt_gate: bool = True,
              outputs: dict | None = None) -> Calibration:
    """Fit a calibration from the manifests' images (or ready `samples`); raises NotEnoughData.
    adapt_gate=False keeps the model's gate (a model's own calibration, fitted on its validation data).
    outputs: network_outputs of the model on `samples`, already at hand (a benchmark that calibrates
    many draws of one pool computes them once); not with batchnorm, which changes them."""
    model = LoadedModel(model_path, device=device, interval_level=level)
    if samples is None:
        try:
            samples, _ = extract_samples(manifests, progress=progress, unlabelled=True)
        except ValueError as exc:
            raise NotEnoughData(str(exc)) from None
    if outputs is not None and (batchnorm or len(outputs["t"]) != len(samples)):
        raise ValueError("outputs: the unadapted network's outputs on every row of samples")
    usable = np.where(samples.implants == 0)[0]  # metal hides the bone
    samples = samples.subset(usable)
    if len(samples) < MIN_CROPS:
        raise NotEnoughData(f"only {len(samples)} usable site crops; calibrate needs at least {MIN_CROPS} "
                            f"(about {MIN_CROPS // 2} pelvis or lumbar studies) from this scanner")
    lab = np.isfinite(samples.t_scores)
    labelled_studies = np.unique(samples.groups[lab])
    if 0 < len(labelled_studies) < MIN_LABELLED_STUDIES:
        raise NotEnoughData(f"only {len(labelled_studies)} studies with DXA T-scores; a supervised recalibration "
                            f"needs at least {MIN_LABELLED_STUDIES} (leave the T-score columns empty to adapt "
                            "without labels)")
    dev = torch.device(device)
    before = (subset_outputs(outputs, usable, samples) if outputs is not None
              else network_outputs(model, samples, device))
    net = copy.deepcopy(model.net)
    buffers = None
    if batchnorm:
        shares = model.checkpoint.get("site_type_shares") or DEFAULT_SITE_TYPE_SHARES
        crops = normalise_batch(torch.from_numpy(samples.crops)[:, None]).to(dev)
        buffers = adapt_batchnorm(net, crops, samples.site_types, batchnorm_prior, shares)
    after = network_outputs(model, samples, device, net) if batchnorm else before
    gate, gate_notes = (refit_gate(after["features"], samples.site_types, model.ood, seed=seed) if adapt_gate
                        else ({}, {}))
    new_gate = {**model.ood, **{int(k): (np.asarray(v["mean"]), np.asarray(v["precision"]), v["threshold"])
                                for k, v in gate.items()}}
    refused_before = _refused(before["features"], samples.site_types, model.ood)
    refused_after = _refused(after["features"], samples.site_types, new_gate)

    n = {"scanners": sorted(set(samples.scanners) - {""}), "crops": int(len(samples)), "labelled_crops": int(lab.sum()),
         "labelled_studies": int(len(labelled_studies)),
         "unlabelled_studies": int(len(np.setdiff1d(np.unique(samples.groups), labelled_studies))),
         "by_site_type": {name: {"crops": int((samples.site_types == st).sum()),
                                 "labelled": int((lab & (samples.site_types == st)).sum())}
                          for st, name in enumerate(SITE_TYPE_NAMES)}}
    report = {"unlabelled": {
        "refused_before": {SITE_TYPE_NAMES[st]: _rate(refused_before, samples.site_types == st) for st in range(3)},
        # the refit gate's own crops: its threshold comes from their cross-validated distances
        "refused_after_in_sample": {SITE_TYPE_NAMES[st]: _rate(refused_after, samples.site_types == st) for st in range(3)},
        "gate": {SITE_TYPE_NAMES[st]: v for st, v in gate_notes.items()},
        "batchnorm": {"adapted": bool(batchnorm), "pseudo_count": batchnorm_prior if batchnorm else None}}}
    own = model.calibration
    cal = Calibration(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), model=model.identity(),
                      scanner=scanner or (_scanner_of(samples) if adapt_gate else None), n=n, dates=_dates(samples),
                      batchnorm={"pseudo_count": batchnorm_prior, "buffers": buffers} if buffers else None,
                      ood=gate or None, created_by=f"{getpass.getuser()}@{socket.gethostname()}")
    if lab.any():
        d = Labelled(t_pred=after["t"][lab], t_true=samples.t_scores[lab].astype(np.float64),
                     site_types=samples.site_types[lab], logits=after["logits"][lab], groups=samples.groups[lab],
                     labels=samples.labels[lab], region_pred={r: v[lab] for r, v in after["regions"].items()},
                     region_true={r: samples.region_t_scores[lab, k].astype(np.float64)
                                  for k, r in enumerate(REGION_OUTPUTS)},
                     features={k: v[lab] for k, v in after["feature_sets"].items()})
        shares = model.checkpoint.get("class_shares")
        cf = cross_fit(d, level, shares, seed)
        everything = np.arange(len(d.t_true))
        cal.t_correction = fit_corrections(d, everything, shares)
        cal.feature_correction = fit_feature_corrections(d, everything, cal, cf.feature_choice, shares)
        cal.temperature = fit_temperature_weighted(d.logits, d.labels, class_weights(d.labels, shares))
        cal.residuals = residuals_by_bin(d, cf.corrected)
        ece = {mode: figures(d.t_true, cf.corrected, p, cf.intervals, d.groups)["ece"]
               for mode, p in cf.probabilities.items() if np.isfinite(p).all()}
        cal.probabilities = "predictive" if ece.get("predictive", 1) < ece.get("temperature", 1) else "classifier"
        mode = "predictive" if cal.probabilities == "predictive" else "temperature"
        t_b, p_b, iv_b = _before(model, before, lab, samples)
        report["labelled"] = {"before": _by_type(d, t_b, p_b, iv_b, refused_before[lab]),
                              "after_cross_validated": _by_type(d, cf.corrected, cf.probabilities[mode], cf.intervals,
                                                                refused_after[lab]),
                              "ece_by_probability_mode": ece, "probabilities": cal.probabilities,
                              "interval_level": level, "folds": int(min(FOLDS, len(labelled_studies))),
                              "corrections": cal.t_correction, "feature_correction": cf.feature_report,
                              "temperature": cal.temperature}
        if cf.fused is not None:
            f = cf.fused
            report["labelled"]["after_cross_validated"]["lumbar_fused"] = figures(
                d.t_true[f["ap"]], f["t"], f["probabilities"][mode], f["intervals"], d.groups[f["ap"]])
    elif own is not None:  # no labels: the model's own corrections and intervals, unverified here
        cal.t_correction, cal.residuals = dict(own.t_correction), dict(own.residuals)
        cal.feature_correction = dict(own.feature_correction)
        cal.probabilities = own.probabilities
        cal.temperature = own.temperature
        report["inherited_from_model"] = ("no DXA T-scores: T-score corrections and intervals are the model's own "
                                          "(its validation data); their coverage at this scanner is unverified")
    cal.report = report
    cal.id = cal.content_id()
    return cal


def _rate(flags: np.ndarray, mask: np.ndarray) -> dict:
    k, n = int(flags[mask].sum()), int(mask.sum())
    return {"n": n, "refused": k, "rate": k / n if n else None, "rate_ci": wilson_ci(k, n)}


def _by_type(d: Labelled, t, probs, intervals, refused) -> dict:
    out = {"all": figures(d.t_true, t, probs, intervals, d.groups, refused)}
    for st, name in enumerate(SITE_TYPE_NAMES):
        m = d.site_types == st
        if m.sum() >= 3:
            out[name] = figures(d.t_true[m], t[m], probs[m], intervals[m], d.groups[m], refused[m])
    return out


def _scanner_of(s: Samples) -> str | None:
    keys = sorted(set(s.scanners) - {""})
    return keys[0] if len(keys) == 1 else (" + ".join(keys) if keys else None)


def _dates(s: Samples) -> dict:
    dates = sorted(d for d in s.study_dates if d)
    return {"first": dates[0], "last": dates[-1]} if dates else {}


def format_calibration_report(cal: Calibration) -> str:
    """The report as a person reads it."""
    lines = [f"calibration {cal.id} for {cal.scanner or 'any scanner'} "
             f"(model {cal.model.get('name')} {cal.model.get('version')})",
             f"cases: {cal.n.get('labelled_studies', 0)} labelled and {cal.n.get('unlabelled_studies', 0)} unlabelled "
             f"studies, {cal.n.get('crops', 0)} site crops"]
    for name, c in cal.n.get("by_site_type", {}).items():
        lines.append(f"  {name:<11} {c['crops']:4d} crops, {c['labelled']:4d} with a DXA T-score")
    u = cal.report.get("unlabelled", {})
    if u:
        lines.append("out-of-distribution refusals (site crops): before -> after (in sample)")
        for name, before in u["refused_before"].items():
            after = u["refused_after_in_sample"][name]
            if before["n"]:
                lines.append(f"  {name:<11} {100 * before['rate']:5.1f} % -> {100 * after['rate']:5.1f} %   (n {before['n']})")
    lab = cal.report.get("labelled")
    if lab:
        lines.append(f"labelled cases, before (the model as the node runs it) and after ({lab['folds']}-fold "
                     f"cross-validated), 95 % CIs:")
        for part, b in lab["before"].items():
            a = lab["after_cross_validated"][part]
            lines.append(f"  {part:<11} n {a['n']:4d}  MAE {_ci(b, 'mae')} -> {_ci(a, 'mae')}   "
                         f"bias {_ci(b, 'bias', '+.2f')} -> {_ci(a, 'bias', '+.2f')}")
            lines.append(f"  {'':<11}         AUC {_ci(b, 'osteoporosis_auc', '.3f')} -> {_ci(a, 'osteoporosis_auc', '.3f')}"
                         f"   ECE {_num(b.get('ece'))} -> {_num(a.get('ece'))}   coverage "
                         f"{_cov(b)} -> {_cov(a)}")
        if "lumbar_fused" in lab["after_cross_validated"]:
            f = lab["after_cross_validated"]["lumbar_fused"]
            lines.append(f"  lumbar_fused n {f['n']:4d}  MAE {_ci(f, 'mae')}  coverage {_cov(f)}")
        for name, c in lab.get("feature_correction", {}).items():
            # (a report of 2026-12-02 has one candidate: used true/false and mae_features)
            maes = c.get("mae", {"pooled ridge": c.get("mae_features")})
            used = c["used"] if isinstance(c["used"], str) else ("pooled ridge" if c["used"] else None)
            # (reports before 2026-12-03's defaults have no "default": the lowest MAE won)
            switched = "default" in c and used != c["default"]
            lines.append(f"  {name:<11} feature correction: {used or 'none (the line alone)'}"
                         + (f" (clearly better than the default, {c['default'] or 'the line alone'})" if switched else "")
                         + "; out-of-fold MAE "
                         + ", ".join([f"{c['mae_line']:.3f} with the line alone",
                                      *(f"{v:.3f} {k}" for k, v in maes.items() if v is not None)]))
        lines.append(f"probabilities: {lab['probabilities']} (cross-validated ECE "
                     + ", ".join(f"{k} {v:.3f}" for k, v in lab["ece_by_probability_mode"].items()) + ")")
    if "inherited_from_model" in cal.report:
        lines.append(cal.report["inherited_from_model"])
    return "\n".join(lines)


def _num(v, fmt=".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _ci(d: dict, key: str, fmt: str = ".3f") -> str:
    ci = d.get(f"{key}_ci")
    return _num(d.get(key), fmt) + (f" ({format(ci[0], fmt)} to {format(ci[1], fmt)})" if ci else "")


def _cov(d: dict) -> str:
    iv = d.get("interval")
    return "n/a" if not iv else f"{100 * iv['coverage']:.1f} %"


def embed_own_calibration(model_path: Path, manifests: list[Path], out: Path, *, version: str | None = None,
                          level: float = 0.9, progress: bool = True, seed: int = 0) -> Calibration:
    """The model's own calibration (any scanner, gate and BatchNorm kept) from labelled cases of its
    training scanners, written with the model into a new checkpoint `out`."""
    cal = calibrate(manifests, model_path, scanner=None, level=level, progress=progress, seed=seed, adapt_gate=False)
    if not cal.n.get("labelled_studies"):
        raise NotEnoughData("the model's own calibration needs cases with DXA T-scores")
    ckpt = torch.load(model_path, map_location="cpu", weights_only=False)
    ckpt["calibration"] = cal.to_json()
    if version:
        ckpt["version"] = version
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    return cal
