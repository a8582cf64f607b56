"""Load a checkpoint once per process and score batches of site crops, with Grad-CAM.

Checkpoint format (torch.save of a dict): state_dict, arch (OsteoNet kwargs), name, version,
temperature (calibration), t_score_mean/std (regression target scaling), metrics, trained_on.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..findings import ModelInfo
from .network import OsteoNet


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Prediction:
    probabilities: np.ndarray  # N×3, calibrated
    t_scores: np.ndarray  # N
    cams: np.ndarray  # N×S×S in [0, 1]
    embeddings: np.ndarray  # N×F pooled features (for out-of-distribution checks)


class LoadedModel:
    def __init__(self, path: Path | str, device: str = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model checkpoint {self.path} not found")
        ckpt = torch.load(self.path, map_location="cpu", weights_only=False)
        self.device = pick_device(device)
        self.net = OsteoNet(**ckpt["arch"])
        self.net.load_state_dict(ckpt["state_dict"])
        self.net.to(self.device).eval()
        self.temperature = float(ckpt.get("temperature", 1.0))
        self.t_mean = float(ckpt.get("t_score_mean", 0.0))
        self.t_std = float(ckpt.get("t_score_std", 1.0))
        self.checkpoint = ckpt
        self.info = ModelInfo(name=ckpt.get("name", "osteoscreen-osteonet"), version=ckpt.get("version", "0"),
                              checksum=file_sha256(self.path))

    def predict(self, crops: np.ndarray, covariates: np.ndarray, site_types: np.ndarray,
                batch_size: int = 32) -> Prediction:
        """crops: N×S×S normalised; covariates: N×7; site_types: N ints."""
        probs, ts, cams, embs = [], [], [], []
        for start in range(0, len(crops), batch_size):
            sl = slice(start, start + batch_size)
            p, t, c, e = self._predict_batch(crops[sl], covariates[sl], site_types[sl])
            probs.append(p), ts.append(t), cams.append(c), embs.append(e)
        if not probs:
            s = crops.shape[-1] if crops.ndim == 3 else 0
            return Prediction(np.zeros((0, 3)), np.zeros(0), np.zeros((0, s, s)), np.zeros((0, 0)))
        return Prediction(np.concatenate(probs), np.concatenate(ts), np.concatenate(cams), np.concatenate(embs))

    def _predict_batch(self, crops, covariates, site_types):
        x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))[:, None].to(self.device)
        cov = torch.from_numpy(np.asarray(covariates, dtype=np.float32)).to(self.device)
        st = torch.from_numpy(np.asarray(site_types, dtype=np.int64)).to(self.device)
        with torch.no_grad():
            fmap = self.net.features(x)
        fmap = fmap.detach().requires_grad_(True)
        logits, t_norm = self.net.head(fmap, cov, st)
        predicted = logits.argmax(dim=1)
        score = logits.gather(1, predicted[:, None]).sum()
        (grads,) = torch.autograd.grad(score, fmap)
        with torch.no_grad():
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * fmap).sum(dim=1, keepdim=True))
            cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-8)
            cam = cam / peak[:, None, None]
            probs = torch.softmax(logits / self.temperature, dim=1)
            t = t_norm * self.t_std + self.t_mean
        return (probs.cpu().numpy(), t.cpu().numpy(), cam.cpu().numpy(),
                fmap.detach().mean(dim=(2, 3)).cpu().numpy())
