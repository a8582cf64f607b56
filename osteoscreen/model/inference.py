"""Load a checkpoint once per process and score batches of site crops, with Grad-CAM.

Checkpoint format (torch.save of a dict): state_dict, arch (OsteoNet kwargs), name, version,
temperature (calibration), t_score_mean/std (regression target scaling), metrics, trained_on, and
optionally t_outputs (names of the T-score outputs after the site's own, e.g. ["femoral_neck"]),
tta (test-time augmentation on/off, as the metrics were measured), ood (per site type: mean,
precision matrix and threshold of the Mahalanobis distance of pooled features on training crops)
and calibration (the model's own, `model.calibration`: T-score corrections and interval residuals
from its validation data).

`LoadedModel.with_calibration` gives the same model under a site's calibration (its own BatchNorm
statistics, gate, temperature, corrections and intervals); `ScannerModels` picks, per image, the
calibration configured for its scanner.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..findings import ModelInfo
from ..equipment import ScannerKeyError, ScannerKeys
from .calibration import SITE_TYPE_NAMES, Calibration, CalibrationError, feature_sets, weights_hash
from .network import OsteoNet, channel_statistics

log = logging.getLogger("osteoscreen.model")


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


# Test-time augmentation: the crop seen slightly zoomed and shifted (what training jittered);
# logits are averaged before temperature scaling, so calibration is fitted on the same path.
TTA_VIEWS = ((1.0, 0.0, 0.0), (0.94, 0.0, 0.0), (1.06, 0.0, 0.0), (1.0, 0.04, 0.04), (1.0, -0.04, -0.04))


def tta_batch(x: torch.Tensor, scale: float, dy: float, dx: float) -> torch.Tensor:
    """The crop batch x (N×1×S×S) resampled at `scale` (>1 zooms out) and shifted by (dy, dx) of half the side."""
    if scale == 1.0 and dy == 0.0 and dx == 0.0:
        return x
    theta = torch.tensor([[scale, 0.0, dx], [0.0, scale, dy]], dtype=x.dtype, device=x.device)
    grid = torch.nn.functional.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)


def mahalanobis(embeddings: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = embeddings - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))


@dataclass
class Prediction:
    probabilities: np.ndarray  # N×3, calibrated
    t_scores: np.ndarray  # N, the site's T-score (for hips: total hip)
    cams: np.ndarray  # N×S×S in [0, 1]
    embeddings: np.ndarray  # N×F pooled features (for out-of-distribution checks)
    region_t_scores: dict[str, np.ndarray] | None = None  # sub-region name → N (NaN where not reported)
    ood_distance: np.ndarray | None = None  # N, Mahalanobis distance to the training crops of that site type
    ood_threshold: np.ndarray | None = None  # N, the distance above which a crop is out of distribution
    implant_probability: np.ndarray | None = None  # N, from the implant head where the model has one
    channel_stats: np.ndarray | None = None  # N×416 per-channel means and SDs of the maps (network.channel_statistics)

    def out_of_distribution(self) -> np.ndarray:
        if self.ood_distance is None or self.ood_threshold is None:
            return np.zeros(len(self.t_scores), dtype=bool)
        return self.ood_distance > self.ood_threshold


PRECISIONS = ("fp32", "mixed")


class LoadedModel:
    def __init__(self, path: Path | str, device: str = "auto", threads: int | None = None,
                 precision: str = "fp32", interval_level: float = 0.9):
        """threads: torch's CPU thread count for this process (None leaves it alone). A study's few
        crops run fastest on one thread; torch's default of one per core costs ~100× on a loaded
        2-core machine (docs/BENCHMARKS.md).
        precision: "fp32", or "mixed": the network runs under torch.autocast in bfloat16, for GPU
        throughput. Outputs are float32 either way; the estimates differ from fp32 in the second or
        third decimal (tests/test_model.py). Not float16: Grad-CAM's gradients would underflow and the
        non-local block's products could overflow; a GPU without native bfloat16 (before Ampere) stays
        fp32. On a CPU, mixed is bfloat16 too, and slower than fp32 on most."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if threads:
            torch.set_num_threads(threads)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model checkpoint {self.path} not found")
        ckpt = torch.load(self.path, map_location="cpu", weights_only=False)
        self.device = pick_device(device)
        self.net = OsteoNet(**ckpt["arch"])
        self.net.load_state_dict(ckpt["state_dict"])
        self.net.to(self.device).eval()
        self.precision = precision
        self.autocast_dtype = None
        if precision == "mixed":
            if self.device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
                self.autocast_dtype = torch.bfloat16
            else:
                log.warning("model_precision mixed: this GPU has no native bfloat16; running fp32")
        self.temperature = float(ckpt.get("temperature", 1.0))
        self.t_mean = float(ckpt.get("t_score_mean", 0.0))
        self.t_std = float(ckpt.get("t_score_std", 1.0))
        self.region_names = list(ckpt.get("t_outputs", []))
        self.tta = bool(ckpt.get("tta", False))
        self.ood = {int(k): (np.asarray(v["mean"], np.float64), np.asarray(v["precision"], np.float64),
                             float(v["threshold"])) for k, v in (ckpt.get("ood") or {}).items()}
        self.checkpoint = ckpt
        self.info = ModelInfo(name=ckpt.get("name", "osteoscreen-osteonet"), version=ckpt.get("version", "0"),
                              checksum=file_sha256(self.path))
        if not 0.5 <= interval_level < 1.0:
            raise ValueError(f"interval_level must be in [0.5, 1), got {interval_level}")
        self.interval_level = interval_level
        self.weights_sha256 = weights_hash(ckpt["state_dict"])
        self.calibration: Calibration | None = None
        if ckpt.get("calibration"):
            own = Calibration.from_json(ckpt["calibration"], f"{self.path.name}'s own calibration")
            self._check(own)
            self.calibration = own
        self.site_calibrated = False  # True on a view made by with_calibration
        self._variants: dict[str, LoadedModel] = {}

    def _check(self, cal: Calibration) -> None:
        if cal.model.get("weights_sha256") != self.weights_sha256:
            raise CalibrationError(f"calibration {cal.id} was fitted for model {cal.model.get('name')} "
                                   f"{cal.model.get('version')} (weights {str(cal.model.get('weights_sha256'))[:12]}), "
                                   f"not for {self.info.name} {self.info.version} (weights {self.weights_sha256[:12]})")

    def identity(self) -> dict:
        """What a calibration records of the model it was fitted for."""
        return {"name": self.info.name, "version": self.info.version, "weights_sha256": self.weights_sha256}

    def with_calibration(self, cal: Calibration) -> "LoadedModel":
        """This model under `cal`: the weights shared in substance (a copy of the small network with
        the calibration's BatchNorm statistics), its gate, temperature, corrections and intervals.
        One view per calibration id is kept."""
        if cal.id in self._variants:
            return self._variants[cal.id]
        self._check(cal)
        view = copy.copy(self)
        view._variants = {}
        if cal.batchnorm:
            view.net = copy.deepcopy(self.net)
            buffers = dict(view.net.named_buffers())
            for name, values in cal.batchnorm["buffers"].items():
                if name not in buffers:
                    raise CalibrationError(f"calibration {cal.id}: the network has no buffer {name}")
                buffers[name].copy_(torch.as_tensor(values, dtype=buffers[name].dtype))
            view.net.eval()
        if cal.ood:
            view.ood = {int(k): (np.asarray(v["mean"], np.float64), np.asarray(v["precision"], np.float64),
                                 float(v["threshold"])) for k, v in cal.ood.items()}
        if cal.temperature:
            view.temperature = float(cal.temperature)
        view.calibration = cal
        view.site_calibrated = True
        self._variants[cal.id] = view
        return view

    def for_dataset(self, ds) -> "LoadedModel | None":
        """The model that scores an image: this one (ScannerModels chooses by scanner)."""
        return self

    def predict(self, crops: np.ndarray, covariates: np.ndarray, site_types: np.ndarray,
                batch_size: int = 32, lap: Callable[[str], None] | None = None, images=None,
                scenes=None) -> Prediction:
        """crops: N×S×S normalised; covariates: N×7; site_types: N ints; images: N keys of the image
        each crop comes from (None: every crop its own), which a calibration's feature correction
        may read across (calibration.feature_sets); scenes: N×K descriptors of each crop's whole image
        (pipeline.scene), which a calibration may read too (`Calibration.reads_scenes`; without them
        such a calibration raises ValueError). lap(stage), if given, is called as each stage
        ends ("infer", "gradcam"): how bench/inference.py times them."""
        site_types = np.asarray(site_types, dtype=np.int64)
        lap = lap or (lambda stage: None)
        parts = [self._predict_batch(crops[i:i + batch_size], covariates[i:i + batch_size], site_types[i:i + batch_size],
                                     lap) for i in range(0, len(crops), batch_size)]
        if not parts:
            s = crops.shape[-1] if crops.ndim == 3 else 0
            return Prediction(np.zeros((0, 3)), np.zeros(0), np.zeros((0, s, s)), np.zeros((0, 0)))
        probs, ts, cams, embs, implant, stats = (np.concatenate(p) for p in zip(*parts))
        if self.calibration is not None:  # the calibration's T-score corrections, per site type
            features = feature_sets(embs, stats, site_types, images, scenes)
            ts = np.stack([self.calibration.correct(ts[:, k], site_types, name, features=features)
                           for k, name in enumerate(["", *self.region_names])], axis=1)
            if self.calibration.probabilities == "predictive":
                predictive = self.calibration.class_probabilities(ts[:, 0], [SITE_TYPE_NAMES[t] for t in site_types])
                ok = np.isfinite(predictive).all(axis=1)
                probs[ok] = predictive[ok]
        regions = {name: ts[:, k + 1] for k, name in enumerate(self.region_names)} or None
        pred = Prediction(probs, ts[:, 0], cams, embs, regions,
                          implant_probability=implant if self.net.implant is not None else None, channel_stats=stats)
        if self.ood:
            dist, limit = np.full(len(ts), np.nan), np.full(len(ts), np.inf)
            for st, (mean, precision, threshold) in self.ood.items():
                m = site_types == st
                if m.any():
                    dist[m], limit[m] = mahalanobis(embs[m].astype(np.float64), mean, precision), threshold
            pred.ood_distance, pred.ood_threshold = dist, limit
        lap("infer")
        return pred

    def autocast(self):
        """The autocast context of this model's precision (nothing for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _predict_batch(self, crops, covariates, site_types, lap):
        x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))[:, None].to(self.device)
        cov = torch.from_numpy(np.asarray(covariates, dtype=np.float32)).to(self.device)
        st = torch.from_numpy(np.asarray(site_types, dtype=np.int64)).to(self.device)
        taps: list[torch.Tensor] = []
        with torch.no_grad(), self.autocast():
            early = self.net.early_features(x, taps)
        early = early.detach().float().requires_grad_(True)
        with self.autocast():  # (mixed precision) the network in half precision; what follows in float32
            fmap = self.net.stage3(early)
            logits, t_norm, implant = self.net.heads(fmap, cov, st)
        logits, t_norm, implant = logits.float(), t_norm.float(), implant.float()
        lap("infer")
        predicted = logits.argmax(dim=1)
        score = logits.gather(1, predicted[:, None]).sum()
        grads, grads8 = torch.autograd.grad(score, [early, fmap])
        fmap, grads, grads8 = fmap.detach().float(), grads.float(), grads8.float()
        with torch.no_grad():
            cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * early).sum(dim=1, keepdim=True))
            # where the 16×16 map is empty (every location's evidence negative), the 8×8 one speaks
            cam8 = torch.relu((grads8.mean(dim=(2, 3), keepdim=True) * fmap).sum(dim=1, keepdim=True))
            empty = cam.flatten(1).amax(dim=1) <= 0
            if empty.any():
                cam[empty] = torch.nn.functional.interpolate(cam8[empty], size=cam.shape[-2:], mode="bilinear",
                                                             align_corners=False)
            cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-8)
            cam = cam / peak[:, None, None]
            lap("gradcam")
            logits, t_norm = logits.detach(), t_norm.detach()
            if self.tta:  # the identity view above gives the CAM and the features; the others only vote
                for view in TTA_VIEWS[1:]:
                    with self.autocast():
                        lg, tn = self.net(tta_batch(x, *view), cov, st)
                    logits, t_norm = logits + lg.float(), t_norm + tn.float()
                logits, t_norm = logits / len(TTA_VIEWS), t_norm / len(TTA_VIEWS)
            probs = torch.softmax(logits / self.temperature, dim=1)
            t = t_norm * self.t_std + self.t_mean
            stats = channel_statistics([m.float() for m in taps] + [early.detach(), fmap])
        return (probs.cpu().numpy(), t.cpu().numpy(), cam.cpu().numpy(),
                fmap.mean(dim=(2, 3)).cpu().numpy(), torch.sigmoid(implant.detach()).cpu().numpy(), stats.cpu().numpy())


class ScannerModels:
    """The model with a calibration per scanner (config `calibrations:`): an image is scored under
    the most specific key that names its scanner (serial, then station, then model), else under the
    model's own calibration, or refused (None) when `require_calibration` is set."""

    def __init__(self, base: LoadedModel, calibrations: dict[str, Calibration] | None = None,
                 require_calibration: bool = False, default: Calibration | None = None):
        """default: a calibration for every image no key names (`predict/score --calibration FILE`)."""
        self.base = base
        self.default = base.with_calibration(default) if default is not None else None
        self.info = base.info
        self.require_calibration = require_calibration
        calibrations = calibrations or {}
        try:
            self.keys = ScannerKeys(calibrations)
        except ScannerKeyError as exc:
            raise CalibrationError(str(exc)) from None
        self.entries = {key: base.with_calibration(cal) for key, cal in calibrations.items()}

    def for_dataset(self, ds) -> LoadedModel | None:
        key = self.keys.match(ds)
        if key is not None:
            return self.entries[key]
        if self.default is not None:
            return self.default
        return None if self.require_calibration else self.base

    def __getattr__(self, name):  # the base model's attributes (interval_level, precision, …)
        return getattr(self.base, name)



def load_scanner_models(model_path: Path | str, *, device: str = "auto", threads: int | None = None,
                        precision: str = "fp32", interval_level: float = 0.9,
                        calibrations: dict[str, Path | str] | None = None, require_calibration: bool = False,
                        calibration_file: Path | str | None = None) -> ScannerModels:
    """The model and the calibration files of config `calibrations:` (scanner key → file), checked
    against the model; `calibration_file` applies to every image. Raises CalibrationError."""
    base = LoadedModel(model_path, device, threads, precision, interval_level)
    loaded = {key: Calibration.load(path) for key, path in (calibrations or {}).items()}
    default = Calibration.load(calibration_file) if calibration_file else None
    return ScannerModels(base, loaded, require_calibration, default)
