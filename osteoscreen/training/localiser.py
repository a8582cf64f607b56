"""Train the learned site localiser (`pipeline.localize_net`) on phantoms; evaluate it against the atlas.

Data. `n_studies` pelvis studies and `n_studies` lumbar studies (AP + lateral) and `n_studies // 4`
chest studies (negatives: every map empty) are drawn in memory with
`make_study(kind, np.random.default_rng(seed + i))`, i running over all studies in that order (so
the shipped seed 0 with 400 studies uses seeds 0-899, far from the 40 000+ the tests and evaluation
use); scanner profiles are drawn by `synth` from its training profiles (synthD stays held out). When
`synth` offers metal (`implant_rate=`, `foreign_body_rate=`), 20 % of studies carry each. Every
image goes through the pipeline's own decoding (`load_radiograph`: LUTs, MONOCHROME1, 0.5 mm) and
then to the 4 mm coarse grid; the coarse images (before normalisation, values in [0, 1]) and the
truth boxes in coarse pixels are cached as an .npz (in `cache_dir`, by default
$XDG_CACHE_HOME/osteoscreen or ~/.cache/osteoscreen, never in models/), so a re-run skips this.
The last 10 % of studies of each kind are held out for validation.

Augmentation (each sample, every time): mirror left-right (femur channels swap: they are named by
the way the greater trochanter points), single-hip films cut from pelvises at a random column
between the femurs (15 %), collimation (a random margin cut off each side, never into a site, 30 %),
scale 0.88-1.12 with a small aspect change, gamma 0.7-1.4, Gaussian noise, a random place on the
canvas, and 4 % pure negatives (noise, smooth fields, blank).

Loss: binary cross-entropy on every map (soft coverage targets) + soft Dice on the maps that hold a
site. AdamW with a one-cycle learning rate; batch 16; seed-reproducible (numpy and torch seeded,
single process).

Entry points: `train_localiser(out, n_studies, seed, epochs)` writes the checkpoint (shipped as
models/localiser-v1.pt) with its recipe and validation metrics; `evaluate_localiser` compares learned
and atlas on unseen phantoms through the full-resolution path.

The shipped weights: `train_localiser(Path("models/localiser-v1.pt"), n_studies=400, seed=0,
epochs=14)` (the defaults): phantoms 4.9 min with 2 worker processes, training 8.2 min on one CPU
thread (1022 steps), on a shared 2-core machine. The same seed gives bit-identical weights (tested
with 1 and 2 data workers).
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from ..pipeline import localize_net as ln
from .localiser_data import DATA_VERSION, KIND_CODES, _split, _synth_fingerprint, default_cache_dir, generate, size_range

P_SINGLE_HIP, P_COLLIMATE, P_NEGATIVE = 0.15, 0.3, 0.04
BATCH = 16


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------
def _negative(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = (int(v) for v in rng.integers(40, ln.CANVAS, 2))
    kind = rng.integers(3)
    if kind == 0:
        img = rng.random((h, w))
    elif kind == 1:
        img = ndimage.gaussian_filter(rng.standard_normal((h, w)), rng.uniform(1, 8))
    else:
        img = np.full((h, w), rng.random())
    return img.astype(np.float32), np.full((len(ln.CHANNELS), 4), np.nan, np.float32)


def _collimate(img: np.ndarray, boxes: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Cut a random margin off each side, never into a site."""
    h, w = img.shape
    ok = ~np.isnan(boxes).any(axis=1)
    inner = (np.floor(boxes[ok, 0].min()), np.floor(boxes[ok, 1].min()),
             np.ceil(boxes[ok, 2].max()), np.ceil(boxes[ok, 3].max())) if ok.any() else (h / 2, w / 2, h / 2, w / 2)
    top = int(rng.uniform(0, min(0.15 * h, max(0, inner[0]))))
    left = int(rng.uniform(0, min(0.15 * w, max(0, inner[1]))))
    bottom = h - int(rng.uniform(0, min(0.15 * h, max(0, h - inner[2]))))
    right = w - int(rng.uniform(0, min(0.15 * w, max(0, w - inner[3]))))
    boxes = boxes - np.array([top, left, top, left], np.float32)
    return img[top:bottom, left:right], boxes


def augment(img: np.ndarray, boxes: np.ndarray, kind: int, pixel_mm, rng: np.random.Generator,
            train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One sample: coarse [0, 1] image and channel boxes → (input 2 x C x C, target channels x C x C)."""
    img, boxes = img.astype(np.float32), boxes.astype(np.float32).copy()
    if train:
        if rng.random() < P_NEGATIVE:
            img, boxes = _negative(rng)
        if rng.random() < 0.5:  # mirror: the trochanters now point the other way
            w = img.shape[1]
            img = img[:, ::-1]
            boxes[:, [1, 3]] = w - boxes[:, [3, 1]]
            boxes[[0, 1]] = boxes[[1, 0]]
        if kind == KIND_CODES["hip"] and not np.isnan(boxes[:2]).any() and rng.random() < P_SINGLE_HIP:
            lo, hi = math.ceil(boxes[0, 3]) + 1, math.floor(boxes[1, 1]) - 1
            if hi > lo:
                cut = int(rng.integers(lo, hi + 1))
                if rng.random() < 0.5:
                    img, boxes[1] = img[:, :cut], np.nan
                else:
                    img, boxes[0] = img[:, cut:], np.nan
                    boxes[:, [1, 3]] -= cut
        if rng.random() < P_COLLIMATE:
            img, boxes = _collimate(img, boxes, rng)
        s = rng.uniform(0.88, 1.12) * np.exp(rng.uniform(-0.04, 0.04, 2))
        size = np.clip(np.round(np.array(img.shape) * s), 20, ln.CANVAS).astype(int)
        f = size / np.array(img.shape)
        img = ndimage.zoom(img, f, order=1, grid_mode=True, mode="nearest")
        boxes *= np.array([f[0], f[1], f[0], f[1]], np.float32)
        img = np.clip(img, 0, 1) ** math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
        img = img + rng.uniform(0, 0.02) * rng.standard_normal(img.shape).astype(np.float32)
    pixel = float(np.mean(pixel_mm))
    norm = ln.normalise(img.astype(np.float32), pixel)
    h, w = norm.shape
    if train:
        offset = (int(rng.integers(0, ln.CANVAS - h + 1)), int(rng.integers(0, ln.CANVAS - w + 1)))
    else:
        offset = ((ln.CANVAS - h) // 2, (ln.CANVAS - w) // 2)
    boxes = boxes + np.array([offset[0], offset[1], offset[0], offset[1]], np.float32)
    return ln.place(norm, offset), ln.box_target(boxes)


def _batch(data: dict, idx: np.ndarray, rng, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in idx:
        h, w = data["sizes"][i]
        x, y = augment(data["images"][i, :h, :w], data["boxes"][i], int(data["kinds"][i]), data["pixel_mm"][i], rng, train)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    present = target.flatten(2).sum(-1) > 0
    inter = (p * target).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (p.flatten(2).sum(-1) + target.flatten(2).sum(-1) + 1)
    return bce + (dice[present].mean() if present.any() else 0.0 * dice.sum())


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _iou(a, b) -> float:
    r0, c0, r1, c1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, r1 - r0) * max(0.0, c1 - c0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / area) if area > 0 else 0.0


def validate(net: ln.LocaliserNet, data: dict, idx: np.ndarray, sizes: np.ndarray) -> dict:
    """IoU (coarse pixels) and confidence per channel on the held-out images; negatives' confidences."""
    net.eval()
    model = ln.Loaded(net, sizes, {})
    rng = np.random.default_rng(0)
    per = {c: {"iou": [], "conf": []} for c in ln.CHANNELS}
    negative = {c: [] for c in ln.CHANNELS}
    for start in range(0, len(idx), 32):
        chunk = idx[start:start + 32]
        x, y = _batch(data, chunk, rng, train=False)
        with torch.inference_mode():
            prob = torch.sigmoid(net(x)).numpy()
        for k, i in enumerate(chunk):
            h, w = data["sizes"][i]
            offset = np.array([(ln.CANVAS - h) // 2, (ln.CANVAS - w) // 2] * 2)
            for c, name in enumerate(ln.CHANNELS):
                det = ln.detect(prob[k, c], data["pixel_mm"][i], model.size_range_mm[c])
                truth = data["boxes"][i, c]
                if np.isnan(truth).any():
                    negative[name].append(det.confidence)
                else:
                    per[name]["iou"].append(_iou(det.box, truth + offset))
                    per[name]["conf"].append(det.confidence)
    out = {}
    for name in ln.CHANNELS:
        iou, conf = np.array(per[name]["iou"]), np.array(per[name]["conf"])
        neg = np.array(negative[name])
        out[name] = {"n": int(len(iou)), "mean_iou": float(iou.mean()) if len(iou) else None,
                     "min_iou": float(iou.min()) if len(iou) else None,
                     "mean_conf": float(conf.mean()) if len(conf) else None,
                     "conf_below_0.5": float((conf < 0.5).mean()) if len(conf) else None,
                     "negatives_n": int(len(neg)), "negatives_max_conf": float(neg.max()) if len(neg) else None,
                     "negatives_above_0.5": float((neg >= 0.5).mean()) if len(neg) else None}
    return out


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_localiser(out: Path, n_studies: int = 400, seed: int = 0, epochs: int = 14, progress: bool = True,
                    lr: float = 3e-3, workers: int = 2, threads: int | None = 1,
                    cache_dir: Path | None = None) -> Path:
    """Train the localiser and write its checkpoint to `out` (a .pt file, or a folder that receives
    localiser-v1.pt); the phantom cache goes to `cache_dir` (see the module docstring). Returns the
    checkpoint's path.

    `workers` processes draw the phantoms; `threads` torch threads train (1 by default, set for the
    whole process: bit-for-bit the same weights for the same seed on the same machine and torch, and
    on a shared 2-core machine no slower than 2)."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    if out.suffix != ".pt":
        out = out / "localiser-v1.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cache = (Path(cache_dir) if cache_dir else default_cache_dir()) / \
        f"localiser-data-v{DATA_VERSION}-{_synth_fingerprint()}-n{n_studies}-s{seed}.npz"
    data = generate(n_studies, seed, cache, progress=progress, workers=workers)
    generation_s = time.perf_counter() - started
    train_idx, val_idx = _split(data)
    sizes = size_range(data, train_idx)

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ln.LocaliserNet()
    steps_per_epoch = max(1, len(train_idx) // BATCH)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    bar = tqdm(total=total, desc="training localiser", unit="step", disable=not progress)
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(train_idx)
        losses = []
        for step in range(steps_per_epoch):
            x, y = _batch(data, order[step * BATCH:(step + 1) * BATCH], rng, train=True)
            loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.4f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
    bar.close()
    train_s = time.perf_counter() - t0
    metrics = validate(net, data, val_idx, sizes)
    net.eval()
    ckpt = {
        "version": "localiser-v1",
        "arch": net.arch,
        "state_dict": {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()},
        "size_range_mm": sizes.tolist(),
        "channels": list(ln.CHANNELS),
        "pixel_mm": ln.PIXEL_MM,
        "canvas": ln.CANVAS,
        "recipe": {"n_studies": n_studies, "seed": seed, "epochs": epochs, "batch": BATCH, "lr": lr,
                   "optimizer": "AdamW(weight_decay=1e-4), OneCycle(pct_start=0.15)",
                   "loss": "BCE + soft Dice on present maps",
                   "data": f"make_study(kind, default_rng(seed + i)), i over {n_studies} hip, {n_studies} lumbar, "
                           f"{max(1, n_studies // 4)} chest studies; synth kwargs {data['synth_kwargs'].item()}",
                   "augmentation": "mirror (femur channels swap), single-hip cut 15%, collimation 30%, "
                                   "scale 0.88-1.12 (+-4% aspect), gamma 0.7-1.4, noise sd <= 0.02, random "
                                   "canvas place, 4% pure negatives",
                   "train_images": int(len(train_idx)), "validation_images": int(len(val_idx)),
                   "threads": torch.get_num_threads(),
                   "torch": torch.__version__},
        "metrics": {"validation": metrics, "history": history, "train_seconds": round(train_s, 1),
                    "data_seconds": round(generation_s, 1)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    torch.save(ckpt, out)
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation on unseen phantoms, full-resolution path
# ----------------------------------------------------------------------------------------------
def evaluate_localiser(n_studies: int = 20, seeds: tuple[int, int, int] = (40_000, 50_000, 70_000),
                       progress: bool = True) -> dict:
    """Learned vs atlas on unseen phantoms (hip, lumbar and chest seeds), from full-resolution pixels
    as the tests use them: IoU per view/site, confidences, rate below 0.5, ms per image."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from ..pipeline.localize import locate_sites_atlas
    from ..synth import make_study

    def bone_bright(ds):
        values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds).astype(np.float32), ds).astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            values = values.max() - values
        return values, tuple(float(v) for v in ds.PixelSpacing)

    methods = {"unet": lambda *a, **k: ln.locate_sites_learned(*a, **k), "atlas": locate_sites_atlas}
    rows, times = [], {m: [] for m in methods}
    jobs = [("hip", seeds[0] + i) for i in range(n_studies)] + [("lumbar", seeds[1] + i) for i in range(n_studies)] \
        + [("chest", seeds[2] + i) for i in range(max(1, n_studies // 4))]
    for kind, s in tqdm(jobs, desc="evaluating localisers", disable=not progress):
        for image in make_study(kind, np.random.default_rng(s)):
            pixels, spacing = bone_bright(image.dataset)
            asks = [("hip", "ap"), ("lumbar", "ap"), ("lumbar", "lat")] if kind == "chest" else \
                [(kind, image.view)] + ([("lumbar", "ap")] if kind == "hip" else [("hip", "ap")])
            for region, view in asks:
                for name, fn in methods.items():
                    t = time.perf_counter()
                    found = fn(pixels, spacing, region, view)
                    times[name].append(time.perf_counter() - t)
                    for f in found:
                        truth = image.sites.get(f.site) if region == kind else None
                        rows.append({"method": name, "group": f"{kind} {image.view} as {region} {view}", "site": f.site,
                                     "iou": _iou(f.box, truth.box) if truth else None, "conf": f.confidence})
    report = {}
    for name in methods:
        for group in sorted({r["group"] for r in rows}):
            sel = [r for r in rows if r["method"] == name and r["group"] == group]
            conf = np.array([r["conf"] for r in sel])
            ious = np.array([r["iou"] for r in sel if r["iou"] is not None])
            report[f"{name}: {group}"] = {
                "n": len(sel), "mean_iou": round(float(ious.mean()), 3) if len(ious) else None,
                "min_iou": round(float(ious.min()), 3) if len(ious) else None,
                "conf_mean": round(float(conf.mean()), 3), "conf_min": round(float(conf.min()), 3),
                "conf_max": round(float(conf.max()), 3), "below_0.5": round(float((conf < 0.5).mean()), 3)}
        report[f"{name}: ms/image"] = round(1000 * float(np.mean(times[name])), 1)
    return report
