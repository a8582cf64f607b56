"""Part 1 of `bench.inference`: site crops per second through the model, on the CPU and (when one is
present) the GPU, beside the bare network forward; and its plot. See bench/inference.py's docstring
for what is measured; `bench.inference.run` calls these.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .common import load_average as _load

if TYPE_CHECKING:
    from .inference import _Bar

CPU_BATCHES = (1, 8, 32)
GPU_BATCHES = (1, 8, 32, 128, 512, 2048, 8192)
GPU_TARGET = 1000.0


# -- real crops ------------------------------------------------------------------------------------
def real_crops(n_hip: int, n_lumbar: int):
    """Crops, covariates and site types from synthetic studies through the pipeline's own extraction."""
    from osteoscreen.config import DEFAULT_MODEL
    from osteoscreen.model.inference import LoadedModel
    from osteoscreen.pipeline import screen
    from osteoscreen.pipeline.crops import normalise
    from osteoscreen.pipeline.screen import StudyImage
    from osteoscreen.synth import make_study
    model = LoadedModel(DEFAULT_MODEL, "cpu")  # _prepare asks it which calibration an image's scanner has
    crops, covs, types = [], [], []
    for kind, count in (("hip", n_hip), ("lumbar", n_lumbar)):
        for seed in range(count):
            images = make_study(kind, np.random.default_rng(1000 + seed), patient_index=seed)
            _, pending = screen._prepare([StudyImage(im.dataset, kind, im.view) for im in images], model, heatmaps=False)
            for p in pending:
                crops.append(normalise(p.crop.pixels))
                covs.append(p.covariates)
                types.append(p.site_type)
    return np.stack(crops).astype(np.float32), np.array(covs, dtype=np.float32), np.array(types, dtype=np.int64)


def _tile(arr: np.ndarray, n: int) -> np.ndarray:
    return arr[np.arange(n) % len(arr)]


# -- crops per second --------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def _bare_forward(model, crops, covs, types):
    """The reference: the network alone, identity view, no Grad-CAM, no TTA, no OOD (in the model's
    precision)."""
    import torch
    with torch.inference_mode(), model.autocast():
        x = torch.from_numpy(np.ascontiguousarray(crops))[:, None].to(model.device)
        cov = torch.from_numpy(covs).to(model.device)
        st = torch.from_numpy(types).to(model.device)
        logits, t = model.net(x, cov, st)
        return logits.float().cpu().numpy(), t.float().cpu().numpy()


def crops_per_second(fn, model, crops, covs, types, batch: int, repeats: int, min_crops: int = 32,
                     warmup: int = 2) -> dict:
    """Median crops/s of `fn(model, crops, covs, types)` called on `batch` crops at a time."""
    c, v, t = _tile(crops, batch), _tile(covs, batch), _tile(types, batch)
    calls = max(1, math.ceil(min_crops / batch))
    for _ in range(warmup):
        fn(model, c, v, t)
    _sync(model.device)
    rates = []
    for _ in range(repeats):
        _sync(model.device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(model, c, v, t)
        _sync(model.device)
        rates.append(calls * batch / (time.perf_counter() - t0))
    return {"batch": batch, "calls_per_repeat": calls, "median": statistics.median(rates),
            "min": min(rates), "max": max(rates), "repeats": repeats}


def _production(model, crops, covs, types):
    return model.predict(crops, covs, types, batch_size=len(crops))


def cpu_throughput(model, crops, covs, types, thread_counts, repeats: int, bar: _Bar, quick: bool = False) -> dict:
    import torch
    out = {}
    before = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            per = {}
            for batch in CPU_BATCHES:
                kw = {"min_crops": 8, "warmup": 1} if quick else {}
                ours = crops_per_second(_production, model, crops, covs, types, batch, repeats, **kw)
                ref = crops_per_second(_bare_forward, model, crops, covs, types, batch, repeats, **kw)
                per[batch] = {"production": ours, "bare_forward": ref, "load_1min": _load()}
                bar.step(f"CPU {threads} thr batch {batch}: {ours['median']:.0f}/s")
            out[threads] = per
    finally:
        torch.set_num_threads(before)
    return out


def gpu_throughput(model_path: Path, crops, covs, types, repeats: int, bar: _Bar) -> dict | None:
    """The worker's predict on CUDA in both `model_precision` settings (fp32; mixed: autocast), batch
    sizes rising until throughput saturates or memory runs out."""
    import torch
    if not torch.cuda.is_available():
        return None
    from osteoscreen.model.inference import LoadedModel
    out = {"device": torch.cuda.get_device_name(0), "modes": {}}
    for mode in ("fp32", "mixed"):
        model = LoadedModel(model_path, "cuda", precision=mode)
        if model.autocast_dtype is not None:
            out["autocast_dtype"] = str(model.autocast_dtype).replace("torch.", "")
        series, best = [], 0.0
        flat = 0
        for batch in GPU_BATCHES:
            try:
                torch.cuda.reset_peak_memory_stats()
                r = crops_per_second(_production, model, crops, covs, types, batch, repeats,
                                     min_crops=max(256, batch))
                r["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
                ref = crops_per_second(_bare_forward, model, crops, covs, types, batch, repeats,
                                       min_crops=max(256, batch))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                series.append({"batch": batch, "error": "out of memory"})
                break
            r["bare_forward"] = ref
            series.append(r)
            bar.step(f"GPU {mode} batch {batch}: {r['median']:.0f}/s")
            if r["median"] < best * 1.05:  # saturated: under 5 % better than the best so far, twice
                flat += 1
                if flat >= 2:
                    break
            else:
                flat = 0
            best = max(best, r["median"])
        out["modes"][mode] = series
        del model
        torch.cuda.empty_cache()
    return out


# -- plot ------------------------------------------------------------------------------------------
def plot_throughput(cpu: dict, gpu: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if gpu else 1, figsize=(11 if gpu else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    for threads, per in cpu.items():
        b = sorted(per)
        line, = ax.plot(b, [per[x]["production"]["median"] for x in b], "o-", label=f"production, {threads} thread(s)")
        ax.plot(b, [per[x]["bare_forward"]["median"] for x in b], "--", color=line.get_color(), alpha=0.6,
                label=f"bare forward (reference), {threads} thread(s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (crops)")
    ax.set_ylabel("site crops / s")
    ax.set_title("CPU: LoadedModel.predict (TTA + Grad-CAM)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if gpu:
        ax = axes[0][1]
        for mode, series in gpu["modes"].items():
            ok = [r for r in series if "median" in r]
            line, = ax.plot([r["batch"] for r in ok], [r["median"] for r in ok], "o-", label=f"production {mode}")
            ax.plot([r["batch"] for r in ok], [r["bare_forward"]["median"] for r in ok], "--", color=line.get_color(),
                    alpha=0.6, label=f"bare forward {mode}")
        ax.axhline(GPU_TARGET, color="red", lw=0.8, ls=":", label="target 1,000/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (crops)")
        ax.set_title(f"GPU: {gpu['device']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
