"""`osteoscreen train`: fit OsteoNet on site crops; resumable, seed-reproducible, CUDA when available.

Writes into OUT: samples.npz (the extracted crops, reused on resume), last.pt (resume state),
model.pt (the deployable checkpoint), <set>_predictions.csv, metrics.json, plots/ and model_card.md.

Beyond the fit itself the checkpoint carries what the node needs to know when not to answer: the
temperature (fitted on validation logits, through the same test-time augmentation the node runs)
and, per site type, the mean and Ledoit-Wolf precision of the pooled features of the training crops
with a Mahalanobis-distance threshold from the validation crops (the out-of-distribution gate).
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
from ..model.inference import mahalanobis, pick_device
from ..model.network import OsteoNet
from ..pipeline.crops import SITE_TYPES
from .augment import augment
from .batches import _tensors, predict_logits
from .dataset import REGION_OUTPUTS, Samples, extract_samples
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
    covariate_dropout: float = 0.15  # per covariate, set to "missing" so the model copes with absent headers
    cam_guidance: float = 0.0  # weight of the Grad-CAM-off-bone penalty on crops with a bone mask (0: off)
    # the weight ramps up linearly over this share of the epochs: an untrained network's Grad-CAM
    # means nothing, and penalising it from the start fights the class signal
    cam_guidance_warmup: float = 0.25
    tta: bool = True
    ood_quantile: float = 0.995  # of validation distances, times ood_margin, is the gate's threshold
    ood_margin: float = 1.15
    version: str = "0.1.0"
    name: str = "osteoscreen-osteonet"
    # fine-tuning: start from this checkpoint's weights (and its T-score scaling), with FREEZE_GROUPS[freeze] fixed
    init: str | None = None
    freeze: str = "none"


# What `--freeze` keeps fixed when fine-tuning from `--init` (frozen layers keep their BatchNorm statistics too):
# none; stem (the first convolution); early (everything before the Grad-CAM map: stem, stages 1-2 and the
# non-local block); backbone (every convolutional layer: only the pooled head learns).
FREEZE_GROUPS = {"none": (), "stem": ("stem",), "early": ("stem", "stage1", "stage2", "context"),
                 "backbone": ("stem", "stage1", "stage2", "context", "stage3")}


def freeze(net: OsteoNet, which: str) -> list[torch.nn.Module]:
    """Fix the parameters of FREEZE_GROUPS[which]; returns those modules (kept in eval mode in training)."""
    if which not in FREEZE_GROUPS:
        raise ValueError(f"freeze must be one of {', '.join(FREEZE_GROUPS)}, got {which!r}")
    modules = [getattr(net, name) for name in FREEZE_GROUPS[which]]
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
    return modules


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


def cam_off_bone(net: OsteoNet, early: torch.Tensor, fmap: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
    """The share of each crop's Grad-CAM mass that lies off bone, differentiably (N).

    The same Grad-CAM the node draws (model.inference: the 16×16 map after the non-local block,
    channel weights = spatial mean of the class score's gradient), for the true class, against the
    bone mask averaged onto that grid. Penalising it ("right for the right reasons", Ross et al.
    2017; attention guidance as in GAIN, Li et al. 2018) moves the evidence itself onto bone: the
    map is faithful to the network, so the network has to change for the map to."""
    score = logits.gather(1, labels[:, None]).sum()
    grads = torch.autograd.grad(score, early, create_graph=True)[0]
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * early).sum(dim=1))
    bone = F.adaptive_avg_pool2d(masks, early.shape[-2:])[:, 0]
    return (cam * (1 - bone)).flatten(1).sum(1) / cam.flatten(1).sum(1).clamp_min(1e-6)


def drop_covariates(cov: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Mark age, sex and BMI missing at random (layout of pipeline.covariates.Covariates.vector)."""
    if p <= 0:
        return cov
    cov = cov.clone()
    drop = torch.rand(cov.shape[0], 3, generator=gen) < p
    cov[drop[:, 0], 0:2] = torch.tensor([0.0, 1.0])
    cov[drop[:, 1], 2:5] = torch.tensor([0.0, 0.0, 1.0])
    cov[drop[:, 2], 5:7] = torch.tensor([0.0, 1.0])
    return cov


def fit_ood(train_emb: np.ndarray, train_types: np.ndarray, val_emb: np.ndarray, val_types: np.ndarray,
            quantile: float, margin: float) -> dict:
    """Per site type: mean and Ledoit-Wolf precision of training features; threshold from validation."""
    from sklearn.covariance import LedoitWolf
    stats = {}
    for st in np.unique(train_types):
        tr, va = train_emb[train_types == st].astype(np.float64), val_emb[val_types == st].astype(np.float64)
        if len(tr) < 20:
            continue
        lw = LedoitWolf().fit(tr)
        ref = va if len(va) >= 20 else tr
        dist = mahalanobis(ref, lw.location_, lw.precision_)
        stats[str(int(st))] = {"mean": lw.location_.tolist(), "precision": lw.precision_.tolist(),
                               "threshold": float(np.quantile(dist, quantile) * margin),
                               "validation_median": float(np.median(dist))}
    return stats


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
          holdout: dict[str, list[Path]] | list[Path] | None = None) -> Path:
    """Train on `manifests`; report on the validation split and on each named hold-out set (a plain
    list is one set called "holdout")."""
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
    va_clean = va.subset(np.where(va.implants == 0)[0])  # crops with metal train and test only the implant head
    device = pick_device(cfg.device)
    clean = tr.implants == 0
    t_mean, t_std = float(tr.t_scores[clean].mean()), float(tr.t_scores[clean].std() + 1e-6)
    start = torch.load(cfg.init, map_location="cpu", weights_only=False) if cfg.init else None
    if start is not None:  # fine-tuning: the starting model's architecture, weights and T-score scaling
        net = OsteoNet(**start["arch"])
        net.load_state_dict(start["state_dict"])
        net.to(device)
        t_mean, t_std = float(start["t_score_mean"]), float(start["t_score_std"])
    else:
        net = OsteoNet(n_t_outputs=1 + len(REGION_OUTPUTS), implant_head=bool(samples.implants.any())).to(device)
    frozen = freeze(net, cfg.freeze)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fine-tuning on data without metal must not teach the implant head that metal never occurs
    train_implant = net.implant is not None and (start is None or bool(tr.implants.any()))
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
    implant = torch.from_numpy(tr.implants)
    guide = cfg.cam_guidance > 0 and bool(tr.has_mask.any())
    bone = torch.from_numpy(tr.masks)[:, None] if guide else None
    has_mask = torch.from_numpy(tr.has_mask)
    t_norm = (t - t_mean) / t_std
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        for module in frozen:  # frozen layers keep their BatchNorm statistics
            module.eval()
        order = torch.randperm(len(tr), generator=gen)
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb, mb = augment(x[idx], gen, bone[idx].float() / 255 if guide else None)
            xb = xb.to(device)
            cb = drop_covariates(cov[idx], cfg.covariate_dropout, gen).to(device)
            early = net.early_features(xb)
            fmap = net.stage3(early)
            logits, t_pred, implant_logit = net.heads(fmap, cb, st[idx].to(device))
            metal = implant[idx].to(device)
            target = t_norm[idx].to(device)
            yb = y[idx].to(device)
            known = ~torch.isnan(target) & (metal[:, None] == 0)  # sub-regions are optional; metal hides bone
            loss = F.cross_entropy(logits[metal == 0], yb[metal == 0]) + cfg.t_loss_weight * F.smooth_l1_loss(
                t_pred[known], target[known])
            guided = (has_mask[idx].to(device) & (metal == 0)) if guide else None
            if guided is not None and guided.any():
                off_bone = cam_off_bone(net, early, fmap, logits, yb, mb.to(device))
                ramp = min(1.0, (epoch + step / steps_per_epoch) / max(1e-9, cfg.cam_guidance_warmup * cfg.epochs))
                loss = loss + cfg.cam_guidance * ramp * off_bone[guided].mean()
            if train_implant:
                loss = loss + F.binary_cross_entropy_with_logits(implant_logit, metal.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        vl, vt, _, _ = predict_logits(net, va_clean, device)
        val_acc = float((vl.argmax(1).numpy() == va_clean.labels).mean())
        val_mae = float(np.abs(vt[:, 0].numpy() * t_std + t_mean - va_clean.t_scores).mean())
        history.append({"epoch": epoch + 1, "train_loss": total / len(tr), "val_accuracy": val_acc, "val_t_mae": val_mae})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {total / len(tr):.4f}  val accuracy {val_acc:.3f}  val T MAE {val_mae:.3f}")
        torch.save({"state_dict": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "epoch": epoch, "epochs": cfg.epochs, "history": history}, last)
    vl, _, v_emb, _ = predict_logits(net, va_clean, device, tta=cfg.tta)
    temperature = fit_temperature(vl, torch.from_numpy(va_clean.labels))
    tr_clean = tr.subset(np.where(tr.implants == 0)[0])
    _, _, t_emb, _ = predict_logits(net, tr_clean, device)
    ood = fit_ood(t_emb.numpy(), tr_clean.site_types, v_emb.numpy(), va_clean.site_types, cfg.ood_quantile,
                  cfg.ood_margin)
    scoring = {"temperature": temperature, "t_mean": t_mean, "t_std": t_std, "tta": cfg.tta, "ood": ood}
    metrics = {"validation": _report(net, va, device, scoring, out, "validation")}
    if isinstance(holdout, (list, tuple)):
        holdout = {"holdout": list(holdout)} if holdout else {}
    for name, held_manifests in (holdout or {}).items():
        held, _ = extract_samples(held_manifests, progress=progress)
        metrics[name] = _report(net, held, device, scoring, out, name)
    ckpt = {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "arch": net.arch, "name": cfg.name,
            "version": cfg.version, "temperature": temperature, "t_score_mean": t_mean, "t_score_std": t_std,
            "t_outputs": list(REGION_OUTPUTS), "tta": cfg.tta, "ood": ood,
            "site_type_shares": (np.bincount(tr.site_types, minlength=len(SITE_TYPES)) / len(tr)).tolist(),
            "metrics": metrics, "history": history, "train_config": asdict(cfg),
            "trained_on": {"manifests": [str(m) for m in manifests],
                           "holdout": {k: [str(h) for h in v] for k, v in (holdout or {}).items()},
                           "n_train": len(tr), "n_val": len(va), "n_masked": int(tr.has_mask.sum()),
                           "init": None if start is None else {"checkpoint": str(cfg.init), "name": start.get("name"),
                                                               "version": start.get("version"), "freeze": cfg.freeze},
                           "site_type_counts": np.bincount(tr.site_types, minlength=len(SITE_TYPES)).tolist(),
                           "extraction_problems": len(problems)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    model_path = out / "model.pt"
    torch.save(ckpt, model_path)
    own = _own_calibration(model_path, va_clean, cfg)
    if own is not None:  # T-score corrections and interval residuals from the validation split, cross-fitted
        ckpt["calibration"] = own.to_json()
        torch.save(ckpt, model_path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(out / "model_card.md", ckpt)
    return model_path


def _own_calibration(model_path: Path, validation: Samples, cfg: TrainConfig):
    """The model's own calibration from its validation crops (None when they are too few)."""
    from .calibrate import NotEnoughData, calibrate
    try:
        return calibrate([], model_path, samples=validation, adapt_gate=False, progress=False, seed=cfg.seed,
                         device="cuda" if pick_device(cfg.device).type == "cuda" else "cpu")
    except NotEnoughData:
        return None


def _report(net, s: Samples, device, scoring: dict, out: Path, name: str) -> dict:
    """Metrics, predictions CSV and plots for one evaluation set, scored as the node scores. Crops
    with metal test the implant head; the rest everything else."""
    logits, t_norm, emb, implant_logit = predict_logits(net, s, device, tta=scoring["tta"])  # once, all crops
    implant_report = None
    if s.implants.any() and net.implant is not None:
        flagged = (torch.sigmoid(implant_logit).numpy() > 0.5).astype(int)
        tp, fn = int(((flagged == 1) & (s.implants == 1)).sum()), int(((flagged == 0) & (s.implants == 1)).sum())
        fp, tn = int(((flagged == 1) & (s.implants == 0)).sum()), int(((flagged == 0) & (s.implants == 0)).sum())
        implant_report = {"n_with_metal": tp + fn, "n_without": fp + tn, "sensitivity": tp / max(1, tp + fn),
                          "specificity": tn / max(1, tn + fp)}
    clean = np.where(s.implants == 0)[0]
    s, logits, t_norm, emb = s.subset(clean), logits[clean], t_norm[clean], emb[clean]
    probs = torch.softmax(logits / scoring["temperature"], 1).numpy()
    t_all = (t_norm.numpy() * scoring["t_std"] + scoring["t_mean"]).astype(float)
    pred_t = t_all[:, 0]
    ood = np.zeros(len(s), dtype=bool)
    for st, stats in scoring["ood"].items():
        m = s.site_types == int(st)
        ood[m] = mahalanobis(emb.numpy()[m].astype(np.float64), np.asarray(stats["mean"]),
                             np.asarray(stats["precision"])) > stats["threshold"]
    pred_class = [CLASSES[i] for i in probs.argmax(1)]
    true_class = [CLASSES[i] for i in s.labels]
    _write_predictions(out / f"{name}_predictions.csv", s, probs, pred_class, t_all, ood)
    write_plots({"true_class": true_class, "probs": probs, "true_t": s.t_scores.astype(float),
                 "predicted_t": pred_t}, out / "plots" / name)
    report = evaluate_arrays(true_class, pred_class, probs, s.t_scores.astype(float), pred_t)
    report["out_of_distribution_rate"] = float(ood.mean())
    if implant_report:
        report["implant_detection"] = implant_report
    report["by_site_type"] = {}
    for i, st in enumerate(SITE_TYPES):
        m = s.site_types == i
        if m.sum() >= 10 and len(set(s.labels[m])) > 1:
            report["by_site_type"][st] = _summary(np.where(m)[0], true_class, pred_class, probs, s.t_scores, pred_t)
    for k, region in enumerate(REGION_OUTPUTS):
        known = ~np.isnan(s.region_t_scores[:, k])
        if known.sum() >= 10:
            err = t_all[known, k + 1] - s.region_t_scores[known, k]
            report.setdefault("regions", {})[region] = {
                "n": int(known.sum()), "mae": float(np.abs(err).mean()),
                "pearson_r": float(np.corrcoef(t_all[known, k + 1], s.region_t_scores[known, k])[0, 1])}
    fused = fuse_lumbar_views(s, logits.numpy(), pred_t, scoring["temperature"])
    if fused:
        report["lumbar_fused"] = fused
    return report


def _summary(idx, true_class, pred_class, probs, true_t, pred_t) -> dict:
    sub = evaluate_arrays([true_class[k] for k in idx], [pred_class[k] for k in idx], probs[idx],
                          np.asarray(true_t)[idx].astype(float), np.asarray(pred_t)[idx])
    return {"n": sub["n"], "accuracy": sub["accuracy"], "osteoporosis_auc": sub["classes"]["osteoporosis"].get("auc"),
            "t_mae": sub.get("t_score", {}).get("mae")}


def fuse_lumbar_views(s: Samples, logits: np.ndarray, pred_t: np.ndarray, temperature: float) -> dict | None:
    """Studies with both a lumbar AP and a lateral crop, scored per view and fused as the node fuses
    them (pipeline.screen.fuse_views: mean logits and mean T)."""
    ap = {s.groups[i]: i for i in np.where(s.site_types == 1)[0]}
    lat = {s.groups[i]: i for i in np.where(s.site_types == 2)[0]}
    pairs = [(ap[g], lat[g]) for g in ap if g in lat]
    if len(pairs) < 10:
        return None
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    z = (logits[a] + logits[b]) / 2 / temperature
    probs = _softmax(z)
    true_class = [CLASSES[i] for i in s.labels[a]]
    fused_t = (pred_t[a] + pred_t[b]) / 2
    single_probs = _softmax(logits / temperature)
    single_true = [CLASSES[i] for i in s.labels]
    single_pred = [CLASSES[i] for i in single_probs.argmax(1)]
    return {"n_studies": len(pairs),
            "fused": _summary(np.arange(len(pairs)), true_class, [CLASSES[i] for i in probs.argmax(1)], probs,
                              s.t_scores[a], fused_t),
            "ap_only": _summary(a, single_true, single_pred, single_probs, s.t_scores, pred_t),
            "lat_only": _summary(b, single_true, single_pred, single_probs, s.t_scores, pred_t)}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _write_predictions(path: Path, s: Samples, probs, pred_class, t_all, ood) -> None:
    import csv
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["group", "site", "site_type", "true_class", "predicted_class", "p_normal", "p_osteopenia",
                    "p_osteoporosis", "true_t_score", "predicted_t_score", "out_of_distribution",
                    *(f"{kind}_{r}_t_score" for r in REGION_OUTPUTS for kind in ("true", "predicted"))])
        for i in range(len(s)):
            regions = [f"{v:.3f}" if not np.isnan(v) else "" for k in range(len(REGION_OUTPUTS))
                       for v in (s.region_t_scores[i, k], t_all[i, k + 1])]
            w.writerow([s.groups[i], s.sites[i], SITE_TYPES[s.site_types[i]], CLASSES[s.labels[i]], pred_class[i],
                        *(f"{p:.5f}" for p in probs[i]), f"{s.t_scores[i]:.3f}", f"{t_all[i, 0]:.3f}",
                        int(ood[i]), *regions])
