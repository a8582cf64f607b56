"""`osteoscreen train`: fit OsteoNet on site crops; resumable, seed-reproducible, CUDA when available.

Writes into OUT: samples.npz (the extracted crops, reused on resume), last.pt (resume state),
model.pt (the deployable checkpoint), val_predictions.csv, metrics.json, plots/ and model_card.md.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..findings import CLASSES
from ..model.inference import pick_device
from ..model.network import OsteoNet
from ..pipeline.crops import SITE_TYPES
from .dataset import Samples, extract_samples
from .evaluate import evaluate_arrays, write_plots
from .modelcard import write_model_card


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.2
    t_loss_weight: float = 1.0
    version: str = "0.1.0"
    name: str = "osteoscreen-osteonet"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_by_group(groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep every image of a study on one side of the split."""
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    val_groups = set(rng.choice(unique, size=max(1, int(round(len(unique) * val_fraction))), replace=False))
    is_val = np.array([g in val_groups for g in groups])
    return np.where(~is_val)[0], np.where(is_val)[0]


def augment(raw: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Exposure (gamma), S0's 2σ windowing jitter, small affine pose changes and noise."""
    b = raw.shape[0]
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
    return x + 0.03 * torch.randn(x.shape, generator=gen)


def normalise_batch(raw: torch.Tensor) -> torch.Tensor:
    mu = raw.mean(dim=(2, 3), keepdim=True)
    sd = raw.std(dim=(2, 3), keepdim=True) + 1e-6
    return ((raw - mu) / (2.0 * sd)).clamp(-1, 1)


def _tensors(s: Samples, device):
    return (torch.from_numpy(s.crops)[:, None], torch.from_numpy(s.covariates),
            torch.from_numpy(s.site_types), torch.from_numpy(s.labels), torch.from_numpy(s.t_scores))


@torch.no_grad()
def predict_logits(net: OsteoNet, s: Samples, device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    net.eval()
    x, cov, st, _, _ = _tensors(s, device)
    logits, ts = [], []
    for i in range(0, len(s), batch):
        lg, t = net(normalise_batch(x[i:i + batch]).to(device), cov[i:i + batch].to(device), st[i:i + batch].to(device))
        logits.append(lg.cpu()), ts.append(t.cpu())
    return torch.cat(logits), torch.cat(ts)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017) on the validation set."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def train(manifests: list[Path], out: Path, cfg: TrainConfig, resume: bool = False, progress: bool = True,
          holdout: list[Path] | None = None) -> Path:
    """Train on `manifests`; report on the validation split and, if given, an independent hold-out."""
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    cache = out / "samples.npz"
    problems: list[str] = []
    if resume and cache.is_file():
        samples = Samples.load(cache)
    else:
        samples, problems = extract_samples(manifests, progress=progress)
        samples.save(cache)
    train_idx, val_idx = split_by_group(samples.groups, cfg.val_fraction, cfg.seed)
    tr, va = samples.subset(train_idx), samples.subset(val_idx)
    device = pick_device(cfg.device)
    t_mean, t_std = float(tr.t_scores.mean()), float(tr.t_scores.std() + 1e-6)
    net = OsteoNet().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, history = 0, []
    last = out / "last.pt"
    if resume and last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=False)
        net.load_state_dict(state["state_dict"]), opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if state.get("epochs") == cfg.epochs:
            sched.load_state_dict(state["scheduler"])
        else:  # training extended: one new learning-rate cycle over the added epochs
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=cfg.lr, total_steps=max(1, cfg.epochs - start_epoch) * steps_per_epoch)
    x, cov, st, y, t = _tensors(tr, device)
    t_norm = (t - t_mean) / t_std
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        order = torch.randperm(len(tr), generator=gen)
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb = augment(x[idx], gen).to(device)
            logits, t_pred = net(xb, cov[idx].to(device), st[idx].to(device))
            loss = F.cross_entropy(logits, y[idx].to(device)) + cfg.t_loss_weight * F.smooth_l1_loss(
                t_pred, t_norm[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        vl, vt = predict_logits(net, va, device)
        val_acc = float((vl.argmax(1).numpy() == va.labels).mean())
        val_mae = float(np.abs(vt.numpy() * t_std + t_mean - va.t_scores).mean())
        history.append({"epoch": epoch + 1, "train_loss": total / len(tr), "val_accuracy": val_acc, "val_t_mae": val_mae})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {total / len(tr):.4f}  val accuracy {val_acc:.3f}  val T MAE {val_mae:.3f}")
        torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "epoch": epoch, "epochs": cfg.epochs, "history": history}, last)
    vl, _ = predict_logits(net, va, device)
    temperature = fit_temperature(vl, torch.from_numpy(va.labels))
    metrics = {"validation": _report(net, va, device, temperature, t_mean, t_std, out, "validation")}
    if holdout:
        held, _ = extract_samples(holdout, progress=progress)
        metrics["holdout"] = _report(net, held, device, temperature, t_mean, t_std, out, "holdout")
    ckpt = {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "arch": net.arch, "name": cfg.name,
            "version": cfg.version, "temperature": temperature, "t_score_mean": t_mean, "t_score_std": t_std,
            "metrics": metrics, "history": history, "train_config": asdict(cfg),
            "trained_on": {"manifests": [str(m) for m in manifests], "holdout": [str(h) for h in holdout or []],
                           "n_train": len(tr), "n_val": len(va),
                           "extraction_problems": len(problems)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    model_path = out / "model.pt"
    torch.save(ckpt, model_path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(out / "model_card.md", ckpt)
    return model_path


def _report(net, s: Samples, device, temperature, t_mean, t_std, out: Path, name: str) -> dict:
    """Metrics, predictions CSV and plots for one evaluation set."""
    logits, t_norm = predict_logits(net, s, device)
    probs = torch.softmax(logits / temperature, 1).numpy()
    pred_t = (t_norm.numpy() * t_std + t_mean).astype(float)
    pred_class = [CLASSES[i] for i in probs.argmax(1)]
    true_class = [CLASSES[i] for i in s.labels]
    _write_predictions(out / f"{name}_predictions.csv", s, probs, pred_class, pred_t)
    write_plots({"true_class": true_class, "probs": probs, "true_t": s.t_scores.astype(float),
                 "predicted_t": pred_t}, out / "plots" / name)
    report = evaluate_arrays(true_class, pred_class, probs, s.t_scores.astype(float), pred_t)
    report["by_site_type"] = {}
    for i, st in enumerate(SITE_TYPES):
        m = s.site_types == i
        if m.sum() >= 10 and len(set(s.labels[m])) > 1:
            sub = evaluate_arrays([true_class[k] for k in np.where(m)[0]], [pred_class[k] for k in np.where(m)[0]],
                                  probs[m], s.t_scores[m].astype(float), pred_t[m])
            report["by_site_type"][st] = {"n": sub["n"], "accuracy": sub["accuracy"],
                                          "osteoporosis_auc": sub["classes"]["osteoporosis"].get("auc"),
                                          "t_mae": sub.get("t_score", {}).get("mae")}
    return report


def _write_predictions(path: Path, s: Samples, probs, pred_class, pred_t) -> None:
    import csv
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["group", "site", "true_class", "predicted_class", "p_normal", "p_osteopenia",
                    "p_osteoporosis", "true_t_score", "predicted_t_score"])
        for i in range(len(s)):
            w.writerow([s.groups[i], s.sites[i], CLASSES[s.labels[i]], pred_class[i],
                        *(f"{p:.5f}" for p in probs[i]), f"{s.t_scores[i]:.3f}", f"{pred_t[i]:.3f}"])
