"""Crops to the network the way the node feeds it: per-crop normalisation, and logits, T outputs,
pooled features and implant logits over a Samples set (train and calibrate both use them)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..model.inference import TTA_VIEWS, tta_batch
from ..model.network import OsteoNet, channel_statistics
from .dataset import Samples


def normalise_batch(raw: torch.Tensor) -> torch.Tensor:
    mu = raw.mean(dim=(2, 3), keepdim=True)
    sd = raw.std(dim=(2, 3), keepdim=True) + 1e-6
    return ((raw - mu) / (2.0 * sd)).clamp(-1, 1)


def _tensors(s: Samples, device):
    targets = np.concatenate([s.t_scores[:, None], s.region_t_scores], axis=1).astype(np.float32)
    return (torch.from_numpy(s.crops)[:, None], torch.from_numpy(s.covariates),
            torch.from_numpy(s.site_types), torch.from_numpy(s.labels), torch.from_numpy(targets))


@dataclass
class Outputs:
    """The network's outputs over a Samples set, the way the node computes them."""

    logits: torch.Tensor  # N×3 (averaged over the TTA views when asked)
    t_norm: torch.Tensor  # N×K normalised T outputs (likewise)
    features: torch.Tensor  # N×F pooled features of the last map (what the gate reads)
    implant: torch.Tensor  # N implant logits
    channel_stats: torch.Tensor  # N×416 per-channel means and SDs of the maps (network.channel_statistics)


@torch.no_grad()
def predict_outputs(net: OsteoNet, s: Samples, device, batch: int = 256, tta: bool = False) -> Outputs:
    """Everything of `predict_logits`, and the channel statistics the site calibration reads (of the
    unaugmented view, as model.inference computes them)."""
    net.eval()
    x, cov, st, _, _ = _tensors(s, device)
    logits, ts, embs, implants, stats = [], [], [], [], []
    for i in range(0, len(s), batch):
        xb, cb, sb = normalise_batch(x[i:i + batch]).to(device), cov[i:i + batch].to(device), st[i:i + batch].to(device)
        taps: list[torch.Tensor] = []
        fmap = net.features(xb, taps)
        lg, t, implant = net.heads(fmap, cb, sb)
        if tta:
            for view in TTA_VIEWS[1:]:
                lg2, t2 = net(tta_batch(xb, *view), cb, sb)
                lg, t = lg + lg2, t + t2
            lg, t = lg / len(TTA_VIEWS), t / len(TTA_VIEWS)
        logits.append(lg.cpu()), ts.append(t.cpu()), embs.append(fmap.mean(dim=(2, 3)).cpu())
        implants.append(implant.cpu()), stats.append(channel_statistics(taps + [fmap]).cpu())
    return Outputs(*(torch.cat(v) for v in (logits, ts, embs, implants, stats)))


def predict_logits(net: OsteoNet, s: Samples, device, batch: int = 256, tta: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (N×3), normalised T outputs (N×K), pooled features (N×F) and implant logits (N), the
    way the node computes them (model.inference: logits and T averaged over the TTA views when `tta`)."""
    out = predict_outputs(net, s, device, batch, tta)
    return out.logits, out.t_norm, out.features, out.implant
