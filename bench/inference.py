"""Model inference throughput, and the stages of one study, beside references in the same run.

    python -m bench.inference [--quick] [--workdir DIR] [--no-progress]

1. **Site crops per second** through the shipped checkpoint exactly as the worker calls it
   (`LoadedModel.predict`: the checkpoint's test-time augmentation setting, Grad-CAM, the
   out-of-distribution distance), at batch sizes 1, 8 and 32 on the CPU, with torch on the node's
   `model_threads` default (1 thread) and on 2 threads. The crops are real: a few synthetic studies
   go through the pipeline's own decode → localise → gate → crop (`pipeline.screen._prepare`), and
   their crops are tiled to the batch size. Each timed repeat scores at least 32 crops (32 calls at
   batch 1); warm-up first, median of the repeats. Reference in the same run: the bare network
   forward on the same batch (no TTA, no Grad-CAM, `torch.inference_mode`), so the ratio is what
   production scoring costs over the plain network.
   On a CUDA machine the same is measured on the GPU at batch 1, 8, 32, 128, 512, … until
   throughput stops rising or memory runs out, in both `model_precision` settings: fp32 and mixed
   (the model's predict under `torch.autocast`, bf16 where the GPU supports it, else fp16); target
   ≥ 1,000 site crops/s. Without a GPU a row says so.
2. **Stage breakdown** of one pelvis AP (uncompressed, and the same as JPEG 2000 lossless) and one
   lumbar AP + lateral study, each stage of `screen_study` and of the worker's result objects timed
   on its own: read, decode, preprocess (LUTs + resample to the working grid), localise, quality
   gates, crop, infer (the network: identity view with autograd on + the TTA views + OOD distance),
   Grad-CAM (the backward pass and the map), CAM to display, SR build, SC (heatmap) build, KOS build
   (positive studies: the phantoms are chosen osteoporotic so that a KOS is built), and send
   (`node.sender.send_files` of SR + heatmaps + KOS to a DCMTK `storescp` over loopback). Medians in
   ms. The end-to-end figure is the real calls, nothing taken apart (dcmread → screen_study →
   build_sr / build_heatmap / build_kos, encoded in memory), like benchmarks/bench_pelvis.py, which
   this supersedes. Reference in the same run: DCMTK `dcmj2pnm +Wi 1 +on` (DICOM → 8-bit PNG through
   the VOI window, a new process per run) on the same files; ratio = our end to end / reference.
   DCMTK has no JPEG 2000 decoder: the J2K copy is compared with `opj_decompress` when installed,
   otherwise with dcmj2pnm on the uncompressed file (said in the row's note).

Plots: crops/s against batch size (one line per thread count, GPU lines when present, dashed the
bare-forward reference) and a horizontal stacked bar of the stages.
Not a test: nothing asserts a time.

This module runs both parts and writes the rows; part 1 is bench/inference_crops.py, part 2
bench/inference_stages.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from .common import load_average as _load
from .inference_crops import CPU_BATCHES, GPU_TARGET, cpu_throughput, gpu_throughput, plot_throughput, real_crops
from .inference_stages import STAGE_LABELS, STAGES, plot_stages, stage_breakdown

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- small private helpers ---------------------------------------------------------------------------
def row(measure: str, value, unit: str, *, reference: str | None = None, reference_value=None,
        ratio=None, target: str | None = None, met=None, note: str | None = None) -> dict:
    def num(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
    return {"measure": measure, "value": num(value), "unit": unit, "reference": reference,
            "reference_value": num(reference_value), "ratio": num(ratio), "target": target,
            "met": met, "note": note}


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


class _Bar:
    """tqdm on stderr when progress, else nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def step(self, text: str | None = None, n: int = 1) -> None:
        if self.bar is not None:
            if text:
                self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the module's interface --------------------------------------------------------------------------
def run(quick: bool, workdir: Path, progress: bool = True) -> dict:
    import torch
    from osteoscreen.config import DEFAULT_MODEL, Settings
    from osteoscreen.model.inference import LoadedModel
    from osteoscreen.pipeline import localize

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    node_threads = Settings().model_threads
    thread_counts = sorted({node_threads, 2})
    repeats = 3 if quick else 7
    stage_repeats = 2 if quick else 7
    raw: dict = {"quick": quick, "model": str(DEFAULT_MODEL), "torch": torch.__version__,
                 "cpu_count": os.cpu_count(), "platform": platform.platform(), "load_1min_start": _load(),
                 "node_model_threads": node_threads}
    model = LoadedModel(DEFAULT_MODEL, "cpu", node_threads)  # as the worker (device auto resolves to cpu here)
    raw["tta"] = model.tta
    t0 = time.perf_counter()
    localize.warm_up()
    raw["localiser_warm_up_ms"] = 1000 * (time.perf_counter() - t0)

    n_cases = 2 if quick else 3
    total_steps = len(thread_counts) * len(CPU_BATCHES) + n_cases * stage_repeats
    bar = _Bar(total_steps, "inference", progress)
    tmp = tempfile.TemporaryDirectory(prefix="bench_inference_", dir=workdir)
    try:
        crops, covs, types = real_crops(1 if quick else 3, 1 if quick else 2)
        raw["crops"] = {"source": "real: synthetic studies through pipeline.screen._prepare (decode, localise, "
                                  "gates, square_crop, normalise)", "distinct": int(len(crops)),
                        "shape": list(crops.shape[1:]), "site_types": types.tolist()}
        cpu = cpu_throughput(model, crops, covs, types, thread_counts, repeats, bar, quick)
        torch.set_num_threads(node_threads)
        raw["cpu"] = {str(k): {str(b): v for b, v in per.items()} for k, per in cpu.items()}
        gpu = gpu_throughput(DEFAULT_MODEL, crops, covs, types, repeats, bar)
        raw["gpu"] = gpu
        stages = stage_breakdown(model, Path(tmp.name), stage_repeats, quick, bar)
        raw["stages"] = stages
    finally:
        bar.close()
        tmp.cleanup()
    raw["load_1min_end"] = _load()

    rows = []
    tta_note = f"TTA {'on (5 views)' if model.tta else 'off'} + Grad-CAM + OOD, as the worker"
    for threads, per in cpu.items():
        for b in CPU_BATCHES:
            r = per[b]
            rows.append(row(f"crops/s CPU batch {b} ({threads} thread{'s' if threads > 1 else ''})",
                            r["production"]["median"], "crops/s", reference="bare network forward (no TTA, no CAM)",
                            reference_value=r["bare_forward"]["median"],
                            ratio=_ratio(r["production"]["median"], r["bare_forward"]["median"]),
                            note=f"{tta_note}; real crops; median of {repeats} repeats of ≥ {per[b]['production']['calls_per_repeat'] * b} crops"
                                 + ("; node default threads" if threads == node_threads else "")))
    if gpu is None:
        rows.append(row("crops/s GPU", None, "crops/s", target="≥ 1,000 site crops/s on a GPU", met=None,
                        note="no GPU in this run"))
    else:
        best = 0.0
        for mode, series in gpu["modes"].items():
            for r in series:
                if "median" not in r:
                    rows.append(row(f"crops/s GPU {mode} batch {r['batch']}", None, "crops/s", note=r["error"]))
                    continue
                best = max(best, r["median"])
                label = mode if mode == "fp32" else f"mixed ({gpu.get('autocast_dtype', '?')})"
                rows.append(row(f"crops/s GPU {label} batch {r['batch']}", r["median"], "crops/s",
                                reference="bare network forward", reference_value=r["bare_forward"]["median"],
                                ratio=_ratio(r["median"], r["bare_forward"]["median"]),
                                note=f"{gpu['device']}; peak {r['peak_memory_mib']:.0f} MiB"))
        rows.append(row("crops/s GPU (best)", best, "crops/s", target="≥ 1,000 site crops/s on a GPU",
                        met=best >= GPU_TARGET, note=gpu["device"]))
    for name, st in stages.items():
        for s in STAGES:
            note = None
            if s == "kos_build" and not st["kos_built"]:
                note = "no positive site: no KOS"
            if s == "send":
                note = f"{'+'.join(st['objects'] or [])} to storescp over loopback (send_files)"
            if s == "send":
                sref = st["send_reference"]
                rows.append(row(f"{name}: {STAGE_LABELS[s]}", st["stages_median_ms"][s], "ms", reference=sref.get("name"),
                                reference_value=sref.get("median_ms"),
                                ratio=_ratio(st["stages_median_ms"][s], sref.get("median_ms")),
                                note="; ".join(x for x in (note, sref.get("error")) if x)))
                continue
            rows.append(row(f"{name}: {STAGE_LABELS[s]}", st["stages_median_ms"][s], "ms", note=note))
        ref = st["reference"]
        total = st["end_to_end_ms"]["median"]
        rows.append(row(f"{name}: end to end (no send)", total, "ms",
                        reference=ref.get("name"), reference_value=ref.get("median_ms"),
                        ratio=_ratio(total, ref.get("median_ms")),
                        note="; ".join(x for x in (ref.get("note"), ref.get("error"),
                                                   f"sum of stage medians without send {st['stages_sum_without_send_ms']:.0f} ms",
                                                   f"{len(st['files'])} file(s), {sum(st['file_bytes']) / 1e6:.1f} MB")
                                       if x)))
    plots = []
    p1 = workdir / "inference_crops_per_s.png"
    plot_throughput(cpu, gpu, p1)
    plots.append(str(p1))
    p2 = workdir / "inference_stages.png"
    plot_stages(stages, p2)
    plots.append(str(p2))
    return {"name": "inference", "rows": rows, "plots": plots, "raw": raw}


def format_rows(rows: list[dict]) -> str:
    def f(v):
        if v is None:
            return "–"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    w = max(len(r["measure"]) for r in rows) + 2
    lines = [f"{'measure':<{w}}{'value':>12}  {'unit':<8}{'reference':>12}  {'ratio':>7}  met   note"]
    for r in rows:
        met = "–" if r["met"] is None else ("yes" if r["met"] else "NO")
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"{r['measure']:<{w}}{f(r['value']):>12}  {r['unit']:<8}{f(r['reference_value']):>12}  "
                     f"{ratio:>7}  {met:<4}  {r['reference'] or ''}{' | ' if r['reference'] and r['note'] else ''}"
                     f"{r['note'] or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, module=None) -> int:
    p = argparse.ArgumentParser(description=(module or sys.modules[__name__]).__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workdir", default=str(ROOT / "var" / "bench"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    result = (module or sys.modules[__name__]).run(args.quick, Path(args.workdir), progress=not args.no_progress)
    print(format_rows(result["rows"]))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
