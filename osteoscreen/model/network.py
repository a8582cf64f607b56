"""OsteoNet: a small residual CNN with a non-local block, covariates, and two heads.

- Non-local (self-attention) block at 16×16: S0 could not train at all without global context,
  which compensates for exposure differences between radiographs.
- Covariates (age, sex, BMI with missing indicators) and the site type join the pooled features:
  S2 and Kim et al. gained 2-4 % AUC from them.
- Heads: three WHO classes and estimated T-scores (multi-task, S1): the site's T-score first, then
  one per DXA sub-region the site reports (for hips the femoral neck; the site value is the total
  hip). A checkpoint's `arch["n_t_outputs"]` says how many. With `arch["implant_head"]` a third
  head gives the logit that metal lies in the crop (a quality gate learned from labelled crops).
The network is split so that Grad-CAM needs gradients only from the class score down to the 16×16
map after the non-local block (`early_features`): the layers before it run once, without autograd.
That map localises better than the last, 8×8 one (on phantoms the share of CAM mass on bone rose
from 0.38 to 0.50 for lumbar AP views, 0.68 to 0.75 for hips; training/cam_check.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018); starts as the identity (zero-init BN)."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # b, hw, c'
        k = self.phi(x).flatten(2)  # b, c', hw
        v = self.g(x).flatten(2).transpose(1, 2)  # b, hw, c'
        attn = torch.softmax(q @ k / (q.shape[-1] ** 0.5), dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.out(y)


class OsteoNet(nn.Module):
    def __init__(self, n_covariates: int = 7, n_site_types: int = 3, widths=(16, 32, 64, 96), n_t_outputs: int = 1,
                 implant_head: bool = False):
        super().__init__()
        self.arch = {"n_covariates": n_covariates, "n_site_types": n_site_types, "widths": list(widths),
                     "n_t_outputs": n_t_outputs, "implant_head": implant_head}
        w0, w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())  # 64
        self.stage1 = ResidualBlock(w0, w1, 2)  # 32
        self.stage2 = ResidualBlock(w1, w2, 2)  # 16
        self.context = NonLocalBlock(w2)
        self.stage3 = ResidualBlock(w2, w3, 2)  # 8
        self.n_site_types = n_site_types
        joint = w3 + n_covariates + n_site_types
        self.trunk = nn.Sequential(nn.Linear(joint, 64), nn.ReLU(), nn.Dropout(0.2))
        self.classifier = nn.Linear(64, 3)
        self.regressor = nn.Linear(64, n_t_outputs)
        self.implant = nn.Linear(64, 1) if implant_head else None

    def early_features(self, x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
        """The 16×16 map after the non-local block: the Grad-CAM layer. `taps`, if given, receives
        the stem's and stage 1's maps on the way (for `channel_statistics`)."""
        stem = self.stem(x)
        s1 = self.stage1(stem)
        if taps is not None:
            taps.extend([stem, s1])
        return self.context(self.stage2(s1))

    def features(self, x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
        early = self.early_features(x, taps)
        if taps is not None:
            taps.append(early)
        return self.stage3(early)

    def _joint(self, fmap, covariates, site_type):
        pooled = fmap.mean(dim=(2, 3))
        onehot = F.one_hot(site_type.long(), self.n_site_types).to(pooled.dtype)
        return self.trunk(torch.cat([pooled, covariates.to(pooled.dtype), onehot], dim=1))

    def head(self, fmap: torch.Tensor, covariates: torch.Tensor, site_type: torch.Tensor):
        """Class logits (N×3) and normalised T-scores (N×n_t_outputs)."""
        z = self._joint(fmap, covariates, site_type)
        return self.classifier(z), self.regressor(z)

    def heads(self, fmap: torch.Tensor, covariates: torch.Tensor, site_type: torch.Tensor):
        """Class logits, normalised T-scores and the implant logit (N; zeros without that head)."""
        z = self._joint(fmap, covariates, site_type)
        implant = self.implant(z)[:, 0] if self.implant is not None else torch.zeros(len(z), device=z.device)
        return self.classifier(z), self.regressor(z), implant

    def forward(self, x, covariates, site_type):
        return self.head(self.features(x), covariates, site_type)


def channel_statistics(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per channel, the spatial mean and standard deviation of each map (stem, stage 1, the Grad-CAM
    map, the last map): N × 2·Σchannels (416 for the default widths). The early layers' statistics
    describe an image's contrast and texture, which is what a scanner's processing chain changes;
    the site calibration's feature correction reads them (training/feature_correction.py)."""
    return torch.cat([torch.cat([m.mean(dim=(2, 3)), m.std(dim=(2, 3))], dim=1) for m in maps], dim=1)
