"""The T-score correction that reads the image's features, not only the estimate.

A scanner's processing chain does not shift every estimate by the same amount: how strongly it
enhances edges or compresses the dynamic range varies from image to image, and so does the error it
causes. A line `a + b·T` (recalibrate.fit_line) removes the average shift but leaves that
image-to-image part, which is why its MAE stays flat however many cases a site labels
(docs/CALIBRATION.md). The network's own features see the processing, so
the residual left by the line is regressed on them, per site type, with the class weights that keep
a low-BMD-enriched DXA set from moving it (last-layer re-fitting in the sense of Kirichenko et al.
2023, on top of a frozen network). Two regressions (`KINDS`), both shrinking toward "no feature
correction", i.e. toward the line:
- "ridge": linear, scikit-learn's RidgeCV (penalty by generalised cross-validation);
- "kernel": kernel ridge with a Gaussian kernel (scikit-learn's KernelRidge; penalty and width by
  cross-validation grouped by study), for an error that does not grow linearly with the
  processing's strength. Its record keeps the standardised training features (the support).

Two feature sets (model.calibration.FEATURE_SETS): the last map's 96 pooled features, and the
per-channel means and standard deviations of every map (416, network.channel_statistics). The
early layers' statistics describe contrast and texture, what edge enhancement and dynamic-range
compression change. On the synthD pool (100 labelled studies), ridge on them left MAE 0.26 on hips
against 0.28 on the pooled features, and kernel ridge 0.24 (docs/CALIBRATION.md). Which of the
`CANDIDATES` a site type gets, or none, is the data's choice: `recalibrate.cross_fit` keeps the one
with the lowest out-of-fold MAE, and none where the line's is lower (few labelled lumbar crops often
do not support hundreds of coefficients).
"""
from __future__ import annotations

import numpy as np

MIN_FEATURE_CASES = 20  # labelled crops of a site type below which no feature correction is fitted
ALPHAS = np.logspace(-1, 4, 30)  # ridge penalties RidgeCV chooses from (standardised features)
KERNEL_ALPHAS = np.logspace(-2, 2, 9)  # kernel ridge penalties
KERNEL_WIDTHS = (0.1, 0.3, 1.0, 3.0)  # Gaussian kernel gamma × number of features (standardised features)
KINDS = ("ridge", "kernel")
# (feature set, regression) pairs cross_fit tries for each site type
CANDIDATES = (("pooled", "ridge"), ("channel_stats", "ridge"), ("channel_stats", "kernel"))


def label(candidate: tuple[str, str]) -> str:
    """How a report names a candidate: "channel_stats kernel"."""
    return " ".join(candidate)


def fit_feature_correction(features: np.ndarray, residuals: np.ndarray, weights: np.ndarray,
                           feature_set: str = "pooled", kind: str = "ridge",
                           groups: np.ndarray | None = None) -> dict | None:
    """Regression of `residuals` (truth − line-corrected estimate) on standardised `features` (of the
    set named `feature_set`), of `kind` ("ridge" or "kernel"; the kernel's hyper-parameters are
    cross-validated by `groups`, the study of each crop); None with fewer than MIN_FEATURE_CASES
    cases. The record is what `Calibration.correct` applies (model.calibration.feature_term)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(residuals) < MIN_FEATURE_CASES:
        return None
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature carries nothing (and no division by 0)
    z = (features - mean) / scale
    w = weights / weights.mean()
    record = {"features": feature_set, "kind": kind, "mean": mean.tolist(), "scale": scale.tolist()}
    if kind == "ridge":
        from sklearn.linear_model import RidgeCV
        ridge = RidgeCV(alphas=ALPHAS).fit(z, residuals, sample_weight=w)
        return {**record, "coef": ridge.coef_.tolist(), "intercept": float(ridge.intercept_),
                "alpha": float(ridge.alpha_), "n": int(len(residuals))}
    from sklearn.kernel_ridge import KernelRidge
    from sklearn.model_selection import GridSearchCV, GroupKFold
    intercept = float(np.average(residuals, weights=w))
    groups = np.arange(len(residuals)) if groups is None else np.asarray(groups)
    search = GridSearchCV(KernelRidge(kernel="rbf"),  # (MIN_FEATURE_CASES crops hold at least 2 studies)
                          {"alpha": KERNEL_ALPHAS, "gamma": [g / z.shape[1] for g in KERNEL_WIDTHS]},
                          cv=GroupKFold(min(5, len(np.unique(groups)))), scoring="neg_mean_absolute_error")
    z = np.round(z, 5)  # what the record keeps (a standardised feature to 1e-5 is plenty; the file stays small)
    search.fit(z, residuals - intercept, groups=groups, sample_weight=w)
    best = search.best_estimator_
    return {**record, "support": z.tolist(), "dual_coef": np.ravel(best.dual_coef_).tolist(),
            "gamma": float(best.gamma), "alpha": float(best.alpha), "intercept": intercept,
            "n": int(len(residuals))}
