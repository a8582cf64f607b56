"""Screening metrics the way the papers report them.

Per class (one-vs-rest): sensitivity, specificity, PPV, NPV with Wilson 95 % CIs; AUC with a DeLong
95 % CI; accuracy; confusion matrix; for T-scores MAE, Pearson r and Bland-Altman limits; expected
calibration error. Proportions are fractions in [0, 1]. Rows without all three probabilities
count for the confusion-matrix metrics but are left out of AUC and ECE (their number is reported).

`compare_csv` adds a paired comparison of two prediction files of the same cases: DeLong's test
of the AUC difference per class and a paired-t interval for the difference in T-score MAE.
"""
from __future__ import annotations

import csv
from collections import Counter
import math
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from ..findings import CLASSES

Z95 = 1.959963984540054
KEY_COLUMNS = ("group", "site")  # what pairs the rows of two prediction files
EXTRA_KEY_COLUMNS = ("site_type", "view")  # used as well where both files have them (lumbar AP vs LAT)


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


def _structural_components(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components by midranks (Sun & Xu 2014), O((m+n) log(m+n)).

    v10[i] = mean over negatives j of psi(x_i, y_j) for each positive i, v01[j] = mean over
    positives i of psi(x_i, y_j) for each negative j, with psi = 1 if x > y, 1/2 if equal, else 0.
    """
    pos, neg = scores[y_true == 1], scores[y_true == 0]
    m, n = len(pos), len(neg)
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return float(auc), v10, v01


def delong_auc(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """AUC and its DeLong variance (DeLong et al. 1988, fast midrank form of Sun & Xu 2014)."""
    m, n = int((y_true == 1).sum()), int((y_true == 0).sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    auc, v10, v01 = _structural_components(y_true, scores)
    var = np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n if m > 1 and n > 1 else float("nan")
    return auc, float(var)


def delong_paired(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both AUCs and their 2x2 DeLong covariance for two scores of the same cases (paired).

    S = S10 / m + S01 / n, where S10 (S01) is the sample covariance of the two models' structural
    components over the positives (negatives); var(AUC_A - AUC_B) = S[0,0] + S[1,1] - 2 S[0,1].
    """
    y_true = np.asarray(y_true)
    m, n = int((y_true == 1).sum()), int((y_true == 0).sum())
    if m < 2 or n < 2:
        raise ValueError("the DeLong test needs at least two positive and two negative cases")
    auc_a, v10_a, v01_a = _structural_components(y_true, np.asarray(scores_a, dtype=float))
    auc_b, v10_b, v01_b = _structural_components(y_true, np.asarray(scores_b, dtype=float))
    cov = np.cov(np.stack([v10_a, v10_b])) / m + np.cov(np.stack([v01_a, v01_b])) / n
    return np.array([auc_a, auc_b]), cov


def delong_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """Paired two-sided DeLong test of AUC_A = AUC_B: difference A - B, its SE, 95 % CI, z and p."""
    aucs, cov = delong_paired(y_true, scores_a, scores_b)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(var) if var > 1e-15 else 0.0
    if se > 0:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    else:  # identical rankings (or both perfect): no evidence of a difference unless the AUCs differ
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": diff, "se": se,
            "ci": [diff - Z95 * se, diff + Z95 * se], "z": None if math.isinf(z) else float(z), "p_value": p,
            "n_positive": int((np.asarray(y_true) == 1).sum()), "n_negative": int((np.asarray(y_true) == 0).sum())}


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


def interval_coverage(true_t: np.ndarray, intervals: np.ndarray) -> dict | None:
    """Share of true T-scores inside their prediction intervals (Wilson CI) and the mean width, over
    the rows that have an interval; None when none has."""
    intervals = np.asarray(intervals, dtype=float)
    ok = np.isfinite(intervals).all(axis=1) & np.isfinite(true_t)
    if not ok.any():
        return None
    inside = (intervals[ok, 0] <= true_t[ok]) & (true_t[ok] <= intervals[ok, 1])
    k, n = int(inside.sum()), int(ok.sum())
    return {"n": n, "coverage": k / n, "coverage_ci": wilson_ci(k, n),
            "mean_width": float(np.mean(intervals[ok, 1] - intervals[ok, 0])), "rows_without_interval": int((~ok).sum())}


def binary_metrics(true_positive, predicted_positive) -> dict:
    """One positive-vs-negative split (a class one vs rest, or a set of positive categories against the
    rest, as `db performance` uses): counts, sensitivity, specificity, PPV, NPV with Wilson 95 % CIs."""
    t, p = np.asarray(true_positive, dtype=bool), np.asarray(predicted_positive, dtype=bool)
    tp, fp, tn, fn = (int(v.sum()) for v in (t & p, ~t & p, ~t & ~p, t & ~p))
    entry = {"n_true": tp + fn, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, d in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                       ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        entry[name] = k / d if d else None
        entry[f"{name}_ci"] = wilson_ci(k, d)
    return entry


def evaluate_arrays(true_class: list[str], predicted_class: list[str], probs: np.ndarray | None = None,
                    true_t: np.ndarray | None = None, predicted_t: np.ndarray | None = None,
                    intervals: np.ndarray | None = None) -> dict:
    """intervals: N×2 prediction intervals of predicted_t (NaN where none): their coverage is
    reported under t_score.interval."""
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
    # AUC and ECE use only the rows with all three probabilities; the count left out is reported
    has_p = np.zeros(n, dtype=bool) if probs is None else np.isfinite(np.asarray(probs, dtype=float)).all(axis=1)
    report["skipped_missing_probabilities"] = int(n - has_p.sum())
    for i, label in enumerate(labels):
        entry = binary_metrics(y == i, yp == i)
        if probs is not None:
            entry.update(auc_with_ci((y[has_p] == i).astype(int), probs[has_p, i]))
        report["classes"][label] = entry
    if probs is not None and has_p.any():
        report["ece"] = expected_calibration_error(np.eye(len(labels))[y[has_p]], probs[has_p])
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
            if intervals is not None:
                coverage = interval_coverage(np.asarray(true_t, float), np.asarray(intervals, float))
                if coverage:
                    report["t_score"]["interval"] = coverage
    return report


def read_predictions(path: Path) -> dict:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path} has no rows")
    for col in ("true_class", "predicted_class"):
        if col not in rows[0]:
            raise ValueError(f"{path} lacks the column {col!r}")
    declined = []
    if "assessable" in rows[0]:  # `osteoscreen score` output: refused sites carry a reason, not a class
        declined = [r for r in rows if r["assessable"].strip() in ("0", "false", "False")]
        rows = [r for r in rows if r not in declined]
    if not rows:  # every site refused: a result in itself, reported as such
        return {"true_class": [], "predicted_class": [], "not_assessable": {
            "n": len(declined), "reasons": dict(sorted(Counter(r.get("reason", "").strip() for r in declined).items()))}}
    out = {"true_class": [r["true_class"].strip() for r in rows],
           "predicted_class": [r["predicted_class"].strip() for r in rows]}
    if all(c in rows[0] for c in KEY_COLUMNS):
        out["keys"] = {c: [r[c].strip() for r in rows] for c in KEY_COLUMNS + EXTRA_KEY_COLUMNS if c in rows[0]}

    def floats(col):
        return np.array([float(r[col]) if r.get(col, "").strip() else np.nan for r in rows])

    pcols = [f"p_{c}" for c in CLASSES]
    if all(c in rows[0] for c in pcols):
        out["probs"] = np.stack([floats(c) for c in pcols], axis=1)
    if "true_t_score" in rows[0] and "predicted_t_score" in rows[0]:
        out["true_t"], out["predicted_t"] = floats("true_t_score"), floats("predicted_t_score")
    if "t_score_low" in rows[0] and "t_score_high" in rows[0]:
        out["intervals"] = np.stack([floats("t_score_low"), floats("t_score_high")], axis=1)
    for region in ("femoral_neck",):
        if f"true_{region}_t_score" in rows[0] and f"predicted_{region}_t_score" in rows[0]:
            out.setdefault("regions", {})[region] = (floats(f"true_{region}_t_score"), floats(f"predicted_{region}_t_score"))
    if "assessable" in (declined[0] if declined else rows[0]):
        out["not_assessable"] = {"n": len(declined),
                                 "reasons": dict(sorted(Counter(r.get("reason", "").strip() for r in declined).items()))}
    return out


def evaluate_csv(path: Path, plots: Path | None = None) -> dict:
    data = read_predictions(path)
    if not data["true_class"]:
        return {"n": 0, "accuracy": None, "classes": {}, "confusion_matrix": {"labels": list(CLASSES),
                "rows_true_cols_predicted": [[0] * len(CLASSES) for _ in CLASSES]},
                "not_assessable": data["not_assessable"]}
    report = evaluate_arrays(data["true_class"], data["predicted_class"], data.get("probs"),
                             data.get("true_t"), data.get("predicted_t"), data.get("intervals"))
    if "not_assessable" in data:
        report["not_assessable"] = data["not_assessable"]
    for region, (true, pred) in data.get("regions", {}).items():
        known = ~np.isnan(true) & ~np.isnan(pred)
        if known.sum() >= 3:
            report.setdefault("regions", {})[region] = {
                "n": int(known.sum()), "mae": float(np.abs(pred[known] - true[known]).mean()),
                "pearson_r": float(np.corrcoef(true[known], pred[known])[0, 1])}
    if plots is not None:
        report["plots"] = write_plots(data, plots)
    return report


def pair_rows(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Indices that pair the rows of two prediction files, and how they were paired.

    By the key columns group,site when both files have them, with site_type and view added where
    both files have those too (a key still repeated within a file, such as the AP and lateral views
    of one lumbar spine without a site_type column, pairs by its order of appearance), else by row
    order. Raises ValueError when the rows do not pair one to one or the paired truth disagrees."""
    if "keys" in a and "keys" in b:
        cols = [c for c in KEY_COLUMNS + EXTRA_KEY_COLUMNS if c in a["keys"] and c in b["keys"]]

        def numbered(keys):
            seen: dict = {}
            out = {}
            for i, k in enumerate(zip(*(keys[c] for c in cols))):
                seen[k] = seen.get(k, 0) + 1
                out[(*k, seen[k])] = i
            return out
        ka, kb = numbered(a["keys"]), numbered(b["keys"])
        only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
        if only_a or only_b:
            example = ", ".join(f"{c}={v!r}" for c, v in zip(cols, (only_a or only_b)[0]))
            raise ValueError(f"the files do not hold the same cases: {len(only_a)} key(s) only in A, "
                             f"{len(only_b)} only in B (e.g. {example})")
        order = list(ka)
        ia, ib = np.array([ka[k] for k in order]), np.array([kb[k] for k in order])
        pairing = ",".join(cols)
    else:
        if len(a["true_class"]) != len(b["true_class"]):
            raise ValueError(f"without {','.join(KEY_COLUMNS)} columns in both files rows pair by order, "
                             f"but A has {len(a['true_class'])} rows and B {len(b['true_class'])}")
        ia = ib = np.arange(len(a["true_class"]))
        pairing = "row order"
    bad = [i for i, j in zip(ia, ib) if a["true_class"][i] != b["true_class"][j]]
    if "true_t" in a and "true_t" in b:
        ta, tb = a["true_t"][ia], b["true_t"][ib]
        off = ~((np.isnan(ta) & np.isnan(tb)) | (np.abs(ta - tb) <= 5e-3))
        bad = sorted(set(bad) | set(ia[off].tolist()))
    if bad:
        raise ValueError(f"true labels disagree in {len(bad)} paired row(s) (first: data row {bad[0] + 1} of A); "
                         "the two files must score the same cases")
    return ia, ib, pairing


def compare_arrays(a: dict, b: dict) -> dict:
    """Paired comparison of two prediction sets (dicts as read_predictions returns, same cases).

    Per class, one vs rest on p_<class>: AUC A, AUC B, A - B with its DeLong SE, 95 % CI and
    two-sided p. T-scores: MAE A, MAE B and the mean paired difference of absolute errors with a
    paired-t 95 % CI and p."""
    ia, ib, pairing = pair_rows(a, b)
    y = np.array([CLASSES.index(a["true_class"][i]) for i in ia])
    out: dict = {"pairing": pairing, "n_paired": int(len(ia)),
                 "accuracy_a": float(np.mean([a["predicted_class"][i] == a["true_class"][i] for i in ia])),
                 "accuracy_b": float(np.mean([b["predicted_class"][j] == b["true_class"][j] for j in ib])),
                 "auc_method": "DeLong et al. 1988 paired test, midrank algorithm of Sun & Xu 2014; "
                               "difference = A - B, one vs rest on p_<class>",
                 "classes": {}}
    if "probs" in a and "probs" in b:
        pa, pb = a["probs"][ia], b["probs"][ib]
        ok = np.isfinite(pa).all(axis=1) & np.isfinite(pb).all(axis=1)
        out["skipped_missing_probabilities"] = int((~ok).sum())
        for i, label in enumerate(CLASSES):
            yi = (y[ok] == i).astype(int)
            try:
                out["classes"][label] = delong_test(yi, pa[ok, i], pb[ok, i])
            except ValueError as exc:
                out["classes"][label] = {"auc_a": None, "auc_b": None, "difference": None, "se": None,
                                         "ci": None, "z": None, "p_value": None, "n_positive": int(yi.sum()),
                                         "n_negative": int(len(yi) - yi.sum()), "note": str(exc)}
    else:
        out["skipped_missing_probabilities"] = int(len(ia))
    if all(k in a and k in b for k in ("true_t", "predicted_t")):
        t, ta, tb = a["true_t"][ia], a["predicted_t"][ia], b["predicted_t"][ib]
        ok = np.isfinite(t) & np.isfinite(ta) & np.isfinite(tb)
        if ok.sum() >= 2:
            ea, eb = np.abs(ta[ok] - t[ok]), np.abs(tb[ok] - t[ok])
            d = ea - eb
            k = int(ok.sum())
            se = float(d.std(ddof=1) / math.sqrt(k))
            mean = float(d.mean())
            tcrit = float(stats.t.ppf(0.975, k - 1))
            if se > 0:
                p = float(2 * stats.t.sf(abs(mean / se), k - 1))
            else:
                p = 1.0 if mean == 0 else 0.0
            out["t_score"] = {"n": k, "mae_a": float(ea.mean()), "mae_b": float(eb.mean()),
                              "difference": mean, "se": se, "ci": [mean - tcrit * se, mean + tcrit * se],
                              "p_value": p,
                              "method": "paired t on per-row absolute errors |A - true| - |B - true|; "
                                        "difference = MAE A - MAE B"}
    return out


def compare_csv(path_a: Path, path_b: Path, plots: Path | None = None) -> dict:
    """A's normal report with the paired comparison against B under "comparison"."""
    report = evaluate_csv(path_a, plots)
    comparison = compare_arrays(read_predictions(path_a), read_predictions(path_b))
    report["comparison"] = {"a": str(path_a), "b": str(path_b), **comparison}
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
        ok = np.isfinite(probs).all(axis=1)
        probs, y = probs[ok], y[ok]
    if probs is not None and len(y):
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
