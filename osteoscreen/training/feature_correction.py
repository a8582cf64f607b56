"""The T-score correction that reads the image's features, not only the estimate.

A scanner's processing chain does not shift every estimate by the same amount: how strongly it
enhances edges or compresses the dynamic range varies from image to image, and so does the error it
causes. A line `a + b·T` (recalibrate.fit_line) removes the average shift but leaves that
image-to-image part, which is why its MAE stays flat however many cases a site labels
(docs/CALIBRATION.md). The pooled features the out-of-distribution gate already reads see the
processing, so the residual left by the line is regressed on them: ridge regression per site type
(scikit-learn's RidgeCV; its penalty, chosen by generalised cross-validation, shrinks toward "no
feature correction", i.e. toward the line), fitted on the line's residuals with the class weights
that keep a low-BMD-enriched DXA set from moving it (last-layer re-fitting in the sense of Kirichenko
et al. 2023, on top of a frozen network).

Whether a site type gets it is the data's choice: `recalibrate.cross_fit` keeps it only where its
out-of-fold MAE beats the line's (few labelled lumbar crops often do not support 96 coefficients).
"""
from __future__ import annotations

import numpy as np

MIN_FEATURE_CASES = 20  # labelled crops of a site type below which no feature correction is fitted
ALPHAS = np.logspace(-1, 4, 30)  # ridge penalties RidgeCV chooses from (standardised features)


def fit_feature_correction(features: np.ndarray, residuals: np.ndarray, weights: np.ndarray) -> dict | None:
    """Ridge of `residuals` (truth − line-corrected estimate) on standardised `features`; None with
    fewer than MIN_FEATURE_CASES cases. The record is what `Calibration.correct` applies
    (model.calibration.feature_term)."""
    from sklearn.linear_model import RidgeCV
    if len(residuals) < MIN_FEATURE_CASES:
        return None
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature carries nothing (and no division by 0)
    ridge = RidgeCV(alphas=ALPHAS).fit((features - mean) / scale, residuals, sample_weight=weights / weights.mean())
    return {"mean": mean.tolist(), "scale": scale.tolist(), "coef": ridge.coef_.tolist(),
            "intercept": float(ridge.intercept_), "alpha": float(ridge.alpha_), "n": int(len(residuals))}

