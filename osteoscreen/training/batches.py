"""Crops to the network the way the node feeds it: per-crop normalisation, and logits, T outputs,
pooled features and implant logits over a Samples set (train and calibrate both use them)."""
from __future__ import annotations

import numpy as np
import torch

from ..model.inference import TTA_VIEWS, tta_batch
from ..model.network import OsteoNet
from .dataset import Samples


def normalise_batch(raw: torch.Tensor) -> torch.Tensor:
    mu = raw.mean(dim=(2, 3), keepdim=True)
    sd = raw.std(dim=(2, 3), keepdim=True) + 1e-6
    return ((raw - mu) / (2.0 * sd)).clamp(-1, 1)


def _tensors(s: Samples, device):
    targets = np.concatenate([s.t_scores[:, None], s.region_t_scores], axis=1).astype(np.float32)
    return (torch.from_numpy(s.crops)[:, None], torch.from_numpy(s.covariates),
            torch.from_numpy(s.site_types), torch.from_numpy(s.labels), torch.from_numpy(targets))


@torch.no_grad()
def predict_logits(net: OsteoNet, s: Samples, device, batch: int = 256, tta: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (N×3), normalised T outputs (N×K), pooled features (N×F) and implant logits (N), the
    way the node computes them (model.inference: logits and T averaged over the TTA views when `tta`)."""
    net.eval()
    x, cov, st, _, _ = _tensors(s, device)
    logits, ts, embs, implants = [], [], [], []
    for i in range(0, len(s), batch):
        xb, cb, sb = normalise_batch(x[i:i + batch]).to(device), cov[i:i + batch].to(device), st[i:i + batch].to(device)
        fmap = net.features(xb)
        lg, t, implant = net.heads(fmap, cb, sb)
        if tta:
            for view in TTA_VIEWS[1:]:
                lg2, t2 = net(tta_batch(xb, *view), cb, sb)
                lg, t = lg + lg2, t + t2
            lg, t = lg / len(TTA_VIEWS), t / len(TTA_VIEWS)
        logits.append(lg.cpu()), ts.append(t.cpu()), embs.append(fmap.mean(dim=(2, 3)).cpu())
        implants.append(implant.cpu())
    return torch.cat(logits), torch.cat(ts), torch.cat(embs), torch.cat(implants)
