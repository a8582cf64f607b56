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
- "gp": a Gaussian process (scikit-learn's GaussianProcessRegressor, Matérn ν = 3/2 kernel plus
  white noise, every hyper-parameter by the marginal likelihood), for an error that does not grow
  linearly with the processing's strength. Its record keeps the standardised training features (the
  support) and their dual coefficients; the class weights enter as per-case noise (a case of an
  over-represented class counts as a noisier one). It replaced kernel ridge with a cross-validated
  grid (kind "kernel", whose records still apply): on 6 draws of 100 labelled studies from the
  synthD pool, hip MAE 0.244 → 0.237 on the pool's other studies, and the likelihood chooses the width
  and the penalty in a second where the grid took ten (docs/CALIBRATION.md).

The feature sets (model.calibration.feature_sets): the last map's 96 pooled features, the
per-channel means and standard deviations of every map (416, network.channel_statistics), and those
beside their mean over the image's crops of the same site type ("channel_stats_image", 832). The
early layers' statistics describe contrast and texture, what edge enhancement and dynamic-range
compression change; both hips of a pelvis went through the same processing, so the other hip's
statistics tell more about it (what the line leaves is half shared between them). On the synthD pool (100 labelled studies), ridge on them left MAE 0.26 on hips
against 0.28 on the pooled features, and the Gaussian process 0.23 (docs/CALIBRATION.md). Two more
(`SCENE_SETS`) set the descriptors of the crop's whole image after the last two
(pipeline.scene: intensity quantiles, a band-pass pyramid, sharpness, grid stripes; 39), weighted
by `SCENE_WEIGHT`: the whole image shows the processing over soft tissue, bone and background, not
only over a few centimetres of bone. Which of the
`CANDIDATES` a site type gets, or none, is decided out of fold by `recalibrate.cross_fit`: its
default (`DEFAULTS`) unless another candidate, or the line alone, has a lower out-of-fold error
that a paired test by study finds significant (`SWITCH_P`): the evidence of a few dozen labelled
crops must be clear before it overrides what the pool draws showed. A site type's correction may be
fitted on its own crops or on the residuals of every site type (scope "all"): a processing chain moves the map statistics
of a lumbar crop much as it moves a hip's, and 100 labelled studies hold about 140 hip crops but
only about 30 of each lumbar view. On 6 draws of 100 labelled studies from the synthD pool, the
fused lumbar MAE on the pool's other studies was 0.433 with per-view fits and 0.400 with ridge on
every site type's crops (docs/CALIBRATION.md).
"""
from __future__ import annotations

import warnings

import numpy as np

from ..model.calibration import SCENE_SETS
from ..pipeline.scene import SCENE_SIZE

MIN_FEATURE_CASES = 20  # labelled crops of a site type below which no feature correction is fitted
ALPHAS = np.logspace(-1, 4, 30)  # ridge penalties RidgeCV chooses from (standardised features)
GP_NU = 1.5  # Matérn smoothness (3/2: once differentiable; 5/2 and the Gaussian kernel did no better)
GP_NOISE_FLOOR = 1e-3  # lower bound of the white-noise level (T-score units²): keeps the solve well conditioned
KINDS = ("ridge", "gp")
# (feature set, regression, scope) triples cross_fit tries for each site type; the scope is what a
# correction is fitted on: "site", the site type's own labelled crops, or "all", every site type's
# (a set reading the whole image's descriptors, SCENE_SETS, stands in for its twin without them when
# the descriptors are at hand; samples extracted before they existed fall back to the twin)
CANDIDATES = (("pooled", "ridge", "site"), ("channel_stats", "ridge", "site"), ("channel_stats_image", "gp", "site"),
              ("channel_stats", "ridge", "all"), ("channel_stats", "gp", "all"),
              ("channel_stats_image_scene", "gp", "site"), ("channel_stats_scene", "gp", "all"))
# What a site type gets unless another candidate (or the line alone) beats it clearly out of fold: the
# Gaussian process on the hips' own crops, reading the other hip of the pelvis too (a lumbar view is
# alone in its image, so there it is the channel statistics' Gaussian process), and for the lumbar
# views, which a site labels far fewer of, the one fitted on every site type's crops. Picking the
# lowest out-of-fold MAE among five candidates on ~30 lumbar crops picked noise: on 7 draws of 100
# labelled studies from the synthD pool the node-level MAE on the pool's other studies was 0.268 that
# way and 0.263 with these defaults, 0.259 once the hips read their pelvis's other hip
# (docs/CALIBRATION.md).
# With the whole image's descriptors (pipeline.scene) after them (SCENE_WEIGHT): on 100 draws of 100
# labelled studies from the synthD pool, node-level MAE 0.2506 → 0.2498 on the evaluation set and
# 0.2609 → 0.2541 on the pool's other studies, lower in 86 of the 100 draws (docs/CALIBRATION.md).
# Without the descriptors (samples extracted before they existed) the same sets without them
# (`FALLBACK_DEFAULTS`).
DEFAULTS = {"hip": ("channel_stats_image_scene", "gp", "site"), "lumbar_ap": ("channel_stats_scene", "gp", "all"),
            "lumbar_lat": ("channel_stats_scene", "gp", "all")}
FALLBACK_DEFAULTS = {name: (SCENE_SETS.get(feature_set, feature_set), kind, scope)
                     for name, (feature_set, kind, scope) in DEFAULTS.items()}
# Weight of each standardised scene descriptor in the kernel's distance, against 1 for a channel
# statistic: 39 descriptors beside 416 or 832 statistics would otherwise hardly move it. √10 (each
# descriptor counted as ten statistics) did better than 1 and √30 on draws 1-10 (docs/CALIBRATION.md).
SCENE_WEIGHT = float(np.sqrt(10.0))
# one-sided significance at which a challenger's lower out-of-fold error (paired by study) replaces the default
SWITCH_P = 0.05


def label(candidate: tuple[str, str, str]) -> str:
    """How a report names a candidate: "channel_stats gp", "channel_stats ridge on all site types"."""
    feature_set, kind, scope = candidate
    return f"{feature_set} {kind}" + (" on all site types" if scope == "all" else "")


def fit_feature_correction(features: np.ndarray, residuals: np.ndarray, weights: np.ndarray,
                           feature_set: str = "pooled", kind: str = "ridge") -> dict | None:
    """Regression of `residuals` (truth − line-corrected estimate) on standardised `features` (of the
    set named `feature_set`), of `kind` ("ridge" or "gp"); None with fewer than MIN_FEATURE_CASES
    cases. The record is what `Calibration.correct` applies (model.calibration.feature_term)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(residuals) < MIN_FEATURE_CASES:
        return None
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)  # a constant feature carries nothing (and no division by 0)
    if feature_set in SCENE_SETS:  # the descriptors come last (feature_sets); the record keeps the weighted scale
        scale[-SCENE_SIZE:] /= SCENE_WEIGHT
    z = (features - mean) / scale
    w = weights / weights.mean()
    record = {"features": feature_set, "kind": kind, "mean": mean.tolist(), "scale": scale.tolist()}
    if kind == "ridge":
        from sklearn.linear_model import RidgeCV
        ridge = RidgeCV(alphas=ALPHAS).fit(z, residuals, sample_weight=w)
        return {**record, "coef": ridge.coef_.tolist(), "intercept": float(ridge.intercept_),
                "alpha": float(ridge.alpha_), "n": int(len(residuals))}
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
    intercept = float(np.average(residuals, weights=w))
    z = np.round(z, 5)  # what the record keeps (a standardised feature to 1e-5 is plenty; the file stays small)
    y = residuals - intercept
    kernel = (ConstantKernel(0.1, (1e-3, 1e2)) * Matern(np.sqrt(z.shape[1]), (1e-1, 1e4), nu=GP_NU)
              + WhiteKernel(0.05, (GP_NOISE_FLOOR, 1.0)))
    with warnings.catch_warnings():  # a noise level at its floor: the features explain the residuals, no failure
        warnings.simplefilter("ignore", ConvergenceWarning)
        found = GaussianProcessRegressor(kernel, random_state=0).fit(z, y).kernel_  # hyper-parameters, unweighted
    signal, noise = found.k1, found.k2.noise_level
    gp = GaussianProcessRegressor(signal, optimizer=None, alpha=noise / w).fit(z, y)  # the class weights
    return {**record, "support": z.tolist(), "dual_coef": np.ravel(gp.alpha_).tolist(),
            "amplitude": float(signal.k1.constant_value), "length_scale": float(signal.k2.length_scale),
            "nu": GP_NU, "noise": float(noise), "intercept": intercept, "n": int(len(residuals))}
