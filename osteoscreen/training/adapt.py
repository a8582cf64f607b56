"""Unsupervised adaptation to a scanner: BatchNorm statistics and the out-of-distribution gate.

- **BatchNorm statistics** (Schneider et al., NeurIPS 2020): the running mean and variance of every
  BatchNorm layer re-estimated on the scanner's own crops, layer by layer in forward order (each
  layer sees its input through the layers already adapted), and mixed with the source statistics as
  a prior worth `pseudo_count` crops, so that a few dozen images move them only part of the way.
  The crops are weighted so that the site types (hip, lumbar AP, lumbar lateral) keep the shares
  they had in training: a scanner that sends mostly hips must not bend the statistics the lumbar
  views pass through (the label-shift failure of test-time BatchNorm, Vianna 2024, in another guise).
- **The gate** (the Mahalanobis distance of pooled features per site type) is re-referenced to the
  adapted features of the local crops: their mean, a covariance mixed with the source's, and a
  threshold from cross-validated local distances, so that the scanner's own images stop looking
  foreign while other anatomy still does.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..model.inference import mahalanobis
from ..model.network import OsteoNet

# Training's site-type shares when a checkpoint does not record them (the shipped models': two hips
# per pelvis, one crop per lumbar view).
DEFAULT_SITE_TYPE_SHARES = (2 / 3, 1 / 6, 1 / 6)
OOD_QUANTILE, OOD_MARGIN = 0.995, 1.15  # as training.train sets the source gate


def batchnorm_layers(net: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The network's BatchNorm layers, in forward order (module registration order in OsteoNet)."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _weights(site_types: np.ndarray, shares) -> torch.Tensor:
    """Per-crop weights that give each present site type its training share (renormalised)."""
    site_types = np.asarray(site_types)
    present = [t for t in range(len(shares)) if (site_types == t).any()]
    total = sum(shares[t] for t in present)
    w = np.zeros(len(site_types))
    for t in present:
        m = site_types == t
        w[m] = shares[t] / total / m.sum()
    return torch.as_tensor(w, dtype=torch.float64)


@torch.no_grad()
def adapt_batchnorm(net: OsteoNet, crops: torch.Tensor, site_types: np.ndarray, pseudo_count: float = 16.0,
                    shares=DEFAULT_SITE_TYPE_SHARES, batch: int = 128) -> dict[str, list[float]]:
    """Re-estimate `net`'s BatchNorm statistics on normalised crops (N×1×S×S) in place and return the
    new buffers by name. Each layer's target mean and variance are the site-type-weighted moments of
    its input over crops and positions; they are mixed with the source's as
    (pseudo_count·source + n·target) / (pseudo_count + n), moments mixed as a mixture's are."""
    net.eval()
    weights = _weights(site_types, shares)
    n = float(len(crops))
    mix = n / (n + pseudo_count)
    for name, layer in batchnorm_layers(net):
        sums = {"w": 0.0, "m1": 0.0, "m2": 0.0, "batch": None}  # batch: the weights of the crops in flight

        def capture(module, inputs, _output, sums=sums):
            x, w = inputs[0].double(), sums["batch"][:, None]  # x: N×C×H×W
            sums["m1"] = sums["m1"] + (w * x.mean(dim=(2, 3))).sum(0)
            sums["m2"] = sums["m2"] + (w * (x ** 2).mean(dim=(2, 3))).sum(0)
            sums["w"] += float(w.sum())

        hook = layer.register_forward_hook(capture)
        try:
            for i in range(0, len(crops), batch):
                sums["batch"] = weights[i:i + batch]
                net.features(crops[i:i + batch])
        finally:
            hook.remove()
        mean_t, m2_t = sums["m1"] / sums["w"], sums["m2"] / sums["w"]
        mean_s = layer.running_mean.double()
        m2_s = layer.running_var.double() + mean_s ** 2
        mean = (1 - mix) * mean_s + mix * mean_t
        var = ((1 - mix) * m2_s + mix * m2_t - mean ** 2).clamp_min(1e-8)
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
    return {f"{name}.{buf}": getattr(layer, buf).detach().cpu().tolist()
            for name, layer in batchnorm_layers(net) for buf in ("running_mean", "running_var")}


def refit_gate(features: np.ndarray, site_types: np.ndarray, source: dict[int, tuple], pseudo_count: float = 96.0,
               folds: int = 5, min_crops: int = 20, seed: int = 0) -> tuple[dict, dict]:
    """The gate re-referenced per site type with at least `min_crops` local crops: mean of the local
    (adapted) features; covariance (pseudo_count·source + n·local)/(pseudo_count + n) with the local
    one Ledoit-Wolf shrunk; threshold = the 0.995 quantile × 1.15 of cross-validated local distances
    (each crop's distance to a reference fitted without its fold), as training sets the source gate.
    Returns the gate (checkpoint format, keyed by site type index as text) and, per site type, the
    numbers behind it; site types with fewer crops keep the source gate (not in the result)."""
    from sklearn.covariance import LedoitWolf
    rng = np.random.default_rng(seed)
    gate, notes = {}, {}
    for st, (_, source_precision, source_threshold) in source.items():
        x = features[np.asarray(site_types) == st].astype(np.float64)
        if len(x) < min_crops:
            continue
        source_cov = np.linalg.inv(source_precision)

        def fit(rows):
            local = LedoitWolf().fit(rows)
            w = len(rows) / (len(rows) + pseudo_count)
            cov = (1 - w) * source_cov + w * local.covariance_
            return local.location_, np.linalg.inv(cov)

        fold = rng.permutation(len(x)) % folds
        cv = np.concatenate([mahalanobis(x[fold == k], *fit(x[fold != k])) for k in range(folds)])
        mean, precision = fit(x)
        threshold = float(np.quantile(cv, OOD_QUANTILE) * OOD_MARGIN)
        gate[str(int(st))] = {"mean": mean.tolist(), "precision": precision.tolist(), "threshold": threshold,
                              "validation_median": float(np.median(cv))}
        notes[int(st)] = {"n": int(len(x)), "threshold": threshold, "source_threshold": float(source_threshold),
                          "cv_median_distance": float(np.median(cv))}
    return gate, notes
