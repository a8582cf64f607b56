"""Training augmentation: what vendors' processing, exposure and pose do to the same anatomy.

None of it carries bone density, so the model should not learn from it (the held-out scanner
profile measures whether it did). Masks, where given, take the same pose change as their crops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of an N×1×H×W batch through the FFT (reflect-padded, so edges do not wrap);
    about 5× faster than a convolution on a CPU for these single-channel batches."""
    pad = min(int(3 * sigma) + 1, x.shape[-1] - 1, x.shape[-2] - 1)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    fy = torch.fft.fftfreq(xp.shape[-2], dtype=x.dtype).view(-1, 1)
    fx = torch.fft.rfftfreq(xp.shape[-1], dtype=x.dtype).view(1, -1)
    transfer = torch.exp(-2 * math.pi ** 2 * sigma ** 2 * (fy ** 2 + fx ** 2))
    out = torch.fft.irfft2(torch.fft.rfft2(xp) * transfer, s=xp.shape[-2:])
    return out[..., pad:pad + x.shape[-2], pad:pad + x.shape[-1]]


def processing_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What vendors' image processing does to the same anatomy, drawn at random per crop (raw [0, 1]):
    a monotone look-up table (gamma or S-curve), multi-scale dynamic-range compression, unsharp-mask
    edge enhancement, detector blur, and faint periodic grid-line residue. None of it carries bone
    density, so the model should not learn from it (the held-out scanner profile measures whether
    it did)."""
    b = x.shape[0]

    def u(lo, hi, shape=(b, 1, 1, 1)):
        return torch.empty(shape).uniform_(lo, hi, generator=gen)

    def pick(p):
        return (torch.rand(b, 1, 1, 1, generator=gen) < p).to(x.dtype)

    # look-up table: an S-curve on half of the crops (a gamma follows in `augment`)
    slope, centre = u(4.0, 10.0), u(0.35, 0.65)
    lo_s, hi_s = torch.sigmoid(-slope * centre), torch.sigmoid(slope * (1 - centre))
    s_curve = (torch.sigmoid(slope * (x - centre)) - lo_s) / (hi_s - lo_s)
    m = pick(0.5)
    x = m * s_curve + (1 - m) * x
    # dynamic-range compression: subtract part of a wide blur
    small = _gaussian(F.avg_pool2d(x, 4), float(u(6.0, 20.0, (1,))) / 4)  # a wide blur, computed small
    wide = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    x = x - pick(0.7) * u(0.0, 0.9) * (wide - wide.mean(dim=(2, 3), keepdim=True))
    # edge enhancement (unsharp mask) and detector blur
    x = x + pick(0.7) * u(0.0, 1.5) * (x - _gaussian(x, float(u(1.0, 4.0, (1,)))))
    if float(torch.rand(1, generator=gen)) < 0.5:
        x = _gaussian(x, float(u(0.4, 1.2, (1,))))
    # grid-line residue: faint stripes along rows or columns
    period, phase = u(2.2, 8.0), u(0.0, 6.283)
    coords = torch.arange(x.shape[-1], dtype=x.dtype).view(1, 1, 1, -1)
    stripes = torch.sin(6.283 * coords / period + phase)
    if float(torch.rand(1, generator=gen)) < 0.5:
        stripes = stripes.transpose(2, 3)
    x = x + pick(0.3) * u(0.0, 0.03) * stripes * x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3) * 10
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


def augment(raw: torch.Tensor, gen: torch.Generator, masks: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scanner processing (`processing_jitter`), exposure (gamma), S0's 2σ windowing jitter, small
    affine pose changes and noise. `masks` (N×1×S×S bone fractions), when given, take the same pose
    change, so that they stay on the bone of the augmented crops."""
    b = raw.shape[0]
    raw = processing_jitter(raw, gen)
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(-0.35, 0.35, generator=gen))
    x = raw.clamp_min(1e-4) ** gamma
    mu = x.mean(dim=(2, 3), keepdim=True)
    sd = x.std(dim=(2, 3), keepdim=True) + 1e-6
    eps = torch.empty(b, 1, 1, 1).uniform_(-0.5, 0.5, generator=gen)
    x = ((x - mu) / ((2.0 + eps) * sd)).clamp(-1, 1)
    angle = torch.empty(b).uniform_(-0.12, 0.12, generator=gen)
    scale = torch.empty(b).uniform_(0.9, 1.1, generator=gen)
    shift = torch.empty(b, 2).uniform_(-0.06, 0.06, generator=gen)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks, grid, padding_mode="border", align_corners=False)
    return x + 0.03 * torch.randn(x.shape, generator=gen), masks
