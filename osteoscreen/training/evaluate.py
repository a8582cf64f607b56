"""Screening metrics the way the papers report them.

Per class (one-vs-rest): sensitivity, specificity, PPV, NPV with Wilson 95 % CIs; AUC with a DeLong
95 % CI; accuracy; confusion matrix; for T-scores MAE, Pearson r and Bland-Altman limits; expected
calibration error. Proportions are fractions in [0, 1].
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from ..findings import CLASSES

Z95 = 1.959963984540054


def wilson_ci(k: int, n: int) -> list[float] | None:
    if n == 0:
        return None
    p = k / n
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _midranks(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


def delong_auc(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """AUC and its DeLong variance (DeLong et al. 1988, fast midrank form of Sun & Xu 2014)."""
    pos, neg = scores[y_true == 1], scores[y_true == 0]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v01 = (tz[:m] - tx) / n
    v10 = 1.0 - (tz[m:] - ty) / m
    var = np.var(v01, ddof=1) / m + np.var(v10, ddof=1) / n if m > 1 and n > 1 else float("nan")
    return float(auc), float(var)


def auc_with_ci(y_true: np.ndarray, scores: np.ndarray) -> dict:
    auc, var = delong_auc(y_true, scores)
    if math.isnan(auc):
        return {"auc": None, "auc_ci": None}
    se = math.sqrt(var) if var > 0 else 0.0
    return {"auc": auc, "auc_ci": [max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)]}


def expected_calibration_error(y_onehot: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE with equal-width bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_onehot.argmax(axis=1)).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def evaluate_arrays(true_class: list[str], predicted_class: list[str], probs: np.ndarray | None = None,
                    true_t: np.ndarray | None = None, predicted_t: np.ndarray | None = None) -> dict:
    labels = list(CLASSES)
    unknown = sorted(set(true_class + predicted_class) - set(labels))
    if unknown:
        raise ValueError(f"unknown class label(s): {', '.join(unknown)}")
    y = np.array([labels.index(c) for c in true_class])
    yp = np.array([labels.index(c) for c in predicted_class])
    cm = confusion_matrix(y, yp, labels=range(len(labels)))
    n = int(cm.sum())
    report = {"n": n, "accuracy": float(np.trace(cm) / n) if n else None, "classes": {},
              "confusion_matrix": {"labels": labels, "rows_true_cols_predicted": cm.tolist()}}
    for i, label in enumerate(labels):
        tp, fn = int(cm[i, i]), int(cm[i].sum() - cm[i, i])
        fp, tn = int(cm[:, i].sum() - cm[i, i]), int(n - cm[i].sum() - cm[:, i].sum() + cm[i, i])
        entry = {"n_true": tp + fn, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
        for name, k, d in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                           ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
            entry[name] = k / d if d else None
            entry[f"{name}_ci"] = wilson_ci(k, d)
        if probs is not None:
            entry.update(auc_with_ci((y == i).astype(int), probs[:, i]))
        report["classes"][label] = entry
    if probs is not None:
        report["ece"] = expected_calibration_error(np.eye(len(labels))[y], probs)
    if true_t is not None and predicted_t is not None:
        ok = ~(np.isnan(true_t) | np.isnan(predicted_t))
        t, pt = true_t[ok], predicted_t[ok]
        if len(t) >= 2:
            diff = pt - t
            r = float(stats.pearsonr(t, pt)[0]) if np.std(t) > 0 and np.std(pt) > 0 else None
            report["t_score"] = {"n": int(len(t)), "mae": float(np.abs(diff).mean()), "pearson_r": r,
                                 "bland_altman": {"mean_difference": float(diff.mean()),
                                                  "loa_lower": float(diff.mean() - Z95 * diff.std(ddof=1)),
                                                  "loa_upper": float(diff.mean() + Z95 * diff.std(ddof=1))}}
    return report


def read_predictions(path: Path) -> dict:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path} has no rows")
    for col in ("true_class", "predicted_class"):
        if col not in rows[0]:
            raise ValueError(f"{path} lacks the column {col!r}")
    out = {"true_class": [r["true_class"].strip() for r in rows],
           "predicted_class": [r["predicted_class"].strip() for r in rows]}

    def floats(col):
        return np.array([float(r[col]) if r.get(col, "").strip() else np.nan for r in rows])

    pcols = [f"p_{c}" for c in CLASSES]
    if all(c in rows[0] for c in pcols):
        out["probs"] = np.stack([floats(c) for c in pcols], axis=1)
    if "true_t_score" in rows[0] and "predicted_t_score" in rows[0]:
        out["true_t"], out["predicted_t"] = floats("true_t_score"), floats("predicted_t_score")
    return out


def evaluate_csv(path: Path, plots: Path | None = None) -> dict:
    data = read_predictions(path)
    report = evaluate_arrays(data["true_class"], data["predicted_class"], data.get("probs"),
                             data.get("true_t"), data.get("predicted_t"))
    if plots is not None:
        report["plots"] = write_plots(data, plots)
    return report


def write_plots(data: dict, folder: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    y = np.array([CLASSES.index(c) for c in data["true_class"]])
    probs = data.get("probs")
    if probs is not None:
        fig, ax = plt.subplots(figsize=(5, 5))
        for i, label in enumerate(CLASSES):
            if 0 < (y == i).sum() < len(y):
                fpr, tpr, _ = roc_curve(y == i, probs[:, i])
                ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y == i, probs[:, i]):.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, one vs rest")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
        written.append(_save(fig, folder / "roc.png"))
        fig, ax = plt.subplots(figsize=(5, 5))
        edges = np.linspace(0, 1, 11)
        for i, label in enumerate(CLASSES):
            p, hit = probs[:, i], (y == i)
            idx = np.clip(np.digitize(p, edges) - 1, 0, 9)
            xs = [p[idx == b].mean() for b in range(10) if (idx == b).any()]
            ys = [hit[idx == b].mean() for b in range(10) if (idx == b).any()]
            ax.plot(xs, ys, "o-", label=label)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Calibration")
        ax.legend()
        written.append(_save(fig, folder / "calibration.png"))
    if "true_t" in data:
        t, pt = data["true_t"], data["predicted_t"]
        ok = ~(np.isnan(t) | np.isnan(pt))
        if ok.sum() >= 2:
            mean, diff = (t[ok] + pt[ok]) / 2, pt[ok] - t[ok]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.scatter(mean, diff, s=6, alpha=0.5)
            md, sd = diff.mean(), diff.std(ddof=1)
            for v, style in ((md, "-"), (md - Z95 * sd, "--"), (md + Z95 * sd, "--")):
                ax.axhline(v, color="k", ls=style, lw=0.8)
            ax.set(xlabel="mean of true and estimated T-score", ylabel="estimated − true", title="Bland-Altman")
            written.append(_save(fig, folder / "bland_altman.png"))
    return written


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return str(path)


def format_report(report: dict) -> str:
    def pct(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    lines = [f"n = {report['n']}   accuracy = {pct(report['accuracy'])} %"]
    lines.append(f"{'class':<13}{'sens':>7}{'spec':>7}{'PPV':>7}{'NPV':>7}{'AUC':>8}  AUC 95% CI")
    for label, c in report["classes"].items():
        ci = c.get("auc_ci")
        lines.append(f"{label:<13}{pct(c['sensitivity']):>7}{pct(c['specificity']):>7}{pct(c['ppv']):>7}"
                     f"{pct(c['npv']):>7}{'' if c.get('auc') is None else format(c['auc'], '8.3f'):>8}"
                     f"  {'' if not ci else f'{ci[0]:.3f}-{ci[1]:.3f}'}")
    cm = report["confusion_matrix"]
    lines.append("confusion matrix (rows true, columns predicted): " + ", ".join(cm["labels"]))
    lines += ["  " + " ".join(f"{v:6d}" for v in row) for row in cm["rows_true_cols_predicted"]]
    if "ece" in report:
        lines.append(f"expected calibration error = {report['ece']:.3f}")
    if "t_score" in report:
        t = report["t_score"]
        ba = t["bland_altman"]
        lines.append(f"T-score: MAE {t['mae']:.3f}, r {t['pearson_r'] if t['pearson_r'] is None else round(t['pearson_r'], 3)}, "
                     f"Bland-Altman bias {ba['mean_difference']:+.3f} (LoA {ba['loa_lower']:+.2f} to {ba['loa_upper']:+.2f})")
    return "\n".join(lines)
