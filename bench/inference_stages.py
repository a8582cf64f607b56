"""Part 2 of `bench.inference`: the stages of one study (pelvis, pelvis as JPEG 2000, lumbar AP +
lateral), each timed on its own, beside DCMTK references (dcmj2pnm or opj_decompress for the whole
study, storescu for the send); and its plot. See bench/inference.py's docstring for what is measured;
`bench.inference.run` calls `stage_breakdown` and `plot_stages`.
"""
from __future__ import annotations

import io
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .common import Proc, free_port as _free_port, load_average as _load
from .inference_crops import _sync

if TYPE_CHECKING:
    from .inference import _Bar

STAGES = ("read", "decode", "preprocess", "localise", "quality_gates", "crop", "infer", "gradcam",
          "cam_to_display", "sr_build", "heatmap_build", "kos_build", "send")
STAGE_LABELS = {"read": "read (dcmread)", "decode": "decode (pixel_array)",
                "preprocess": "preprocess (LUTs + resample)", "localise": "localise", "quality_gates": "quality gates",
                "crop": "crop (+ normalise, covariates)", "infer": "infer (network, TTA, OOD)",
                "gradcam": "Grad-CAM", "cam_to_display": "CAM to display grid", "sr_build": "SR build (+ encode)",
                "heatmap_build": "SC heatmap build (+ encode)", "kos_build": "KOS build (+ encode)",
                "send": "send (C-STORE to storescp)"}


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# -- studies -----------------------------------------------------------------------------------------
def _study_where(kind: str, wanted, first_seed: int, tries: int = 80):
    """The first clean phantom from first_seed on whose truth satisfies `wanted` (else first_seed's)."""
    from osteoscreen.synth import make_study
    for seed in range(first_seed, first_seed + tries):
        images = make_study(kind, np.random.default_rng(seed), patient_index=seed, implants=(),
                            foreign_body_rate=0.0)
        if wanted([t for im in images for t in im.sites.values()]):
            return images, seed
    return make_study(kind, np.random.default_rng(first_seed), patient_index=first_seed, implants=()), first_seed


def positive_study(kind: str, first_seed: int):
    """A phantom very likely estimated osteoporotic, so that the KOS is built too."""
    return _study_where(kind, lambda sites: sites and min(s.t_score for s in sites) <= -3.2
                        and all(s.category == "osteoporosis" for s in sites), first_seed)


# -- stage breakdown ---------------------------------------------------------------------------------
class _Clock:
    def __init__(self, device=None):
        self.times: dict[str, float] = {}
        self.device = device
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device is not None:
            _sync(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + (now - self._t)
        self._t = now


def staged(files: list[Path], kind: str, views: list[str], model, objects_dir: Path, destination) -> dict:
    """One pass through screen_study's steps and the worker's result objects, each timed (seconds)."""
    from pydicom import dcmread
    from osteoscreen.config import Output
    from osteoscreen.findings import CLASSES, ImageResult, SiteFinding
    from osteoscreen.node.sender import send_files
    from osteoscreen.pipeline.covariates import read_covariates
    from osteoscreen.pipeline.crops import normalise, paste_map, site_type, square_crop
    from osteoscreen.pipeline.dicom_io import WORKING_SPACING_MM, display_values, pixel_spacing, resample
    from osteoscreen.pipeline.localize import locate_sites
    from osteoscreen.pipeline.quality import MetalDetector
    from osteoscreen.pipeline.screen import (DISPLAY_MAX_SIDE, EXPECTED_SITES, HEATMAP_FEATHER, SITE_REGIONS,
                                             header_laterality, patient_left_on_image_right)
    from osteoscreen.reports.heatmap import build_heatmap
    from osteoscreen.reports.kos import build_kos
    from osteoscreen.reports.sr import build_sr

    out = Output()
    clock = _Clock()
    dss, per_image = [], []
    crops_all, covs_all, types_all, owners = [], [], [], []
    for path, view in zip(files, views):
        ds = dcmread(path)
        clock.lap("read")
        ds.pixel_array  # decoded once; pydicom keeps the array for display_values below
        clock.lap("decode")
        values = display_values(ds)  # the pipeline's own: Modality LUT, VOI LUT, [0, 1], MONOCHROME1
        (row_mm, col_mm), _ = pixel_spacing(ds)
        spacing = (row_mm + col_mm) / 2.0
        scale = min(1.0, spacing / WORKING_SPACING_MM)
        pixels = resample(values, scale) if scale < 1.0 else values
        eff = spacing / scale
        clock.lap("preprocess")
        located = locate_sites(pixels, (eff, eff), kind, view, patient_left_on_image_right=patient_left_on_image_right(ds),
                               image_laterality=header_laterality(ds))
        clock.lap("localise")
        metal = MetalDetector(pixels, eff)
        for loc in located:
            metal.in_site(loc.box)
        clock.lap("quality_gates")
        cov = read_covariates(ds).vector()
        result = ImageResult(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), assessable=True)
        crops = []
        for loc in located:
            if loc.site in EXPECTED_SITES[kind]:
                crop = square_crop(pixels, loc.box, mirrored=(loc.site == "left_hip"))
                crops.append((loc, crop))
                crops_all.append(normalise(crop.pixels))
                covs_all.append(cov)
                types_all.append(site_type(loc.site, view))
                owners.append(len(per_image))
        clock.lap("crop")
        dss.append(ds)
        per_image.append((ds, result, pixels, scale, crops))
    # the model's own predict, told to report the end of each stage (network + TTA + OOD; Grad-CAM)
    pred = model.predict(np.stack(crops_all), np.array(covs_all, np.float32), np.array(types_all), lap=clock.lap)
    probs, cams = pred.probabilities, pred.cams
    k = 0
    for ds, result, pixels, scale, crops in per_image:
        heat = np.zeros(pixels.shape, dtype=np.float32)
        for loc, crop in crops:
            heat = np.maximum(heat, paste_map(cams[k], crop, pixels.shape, HEATMAP_FEATHER))
            p = probs[k]
            result.sites.append(SiteFinding(
                site=loc.site, source_sop_instance_uid=result.sop_instance_uid, source_sop_class_uid=result.sop_class_uid,
                assessable=True, box=tuple(int(round(v / scale)) for v in loc.box), confidence=float(loc.confidence),
                category=CLASSES[int(np.argmax(p))], probabilities={c: round(float(v), 4) for c, v in zip(CLASSES, p)},
                t_score=float(pred.t_scores[k])))
            names = SITE_REGIONS.get(loc.site)
            if names and model.region_names:
                f = result.sites[-1]
                f.regions = {names[0]: f.t_score}
                f.regions.update({r: float(pred.region_t_scores[r][k]) for r in model.region_names if r in names})
            k += 1
        factor = min(1.0, DISPLAY_MAX_SIDE / max(pixels.shape))
        display = resample(pixels, factor) if factor < 1 else pixels
        hm = resample(heat, display.shape[0] / heat.shape[0]) if heat.shape != display.shape else heat
        hm = np.pad(hm, [(0, max(0, a - b)) for a, b in zip(display.shape, hm.shape)])[:display.shape[0], :display.shape[1]]
        result.display, result.heatmap, result.display_scale = display, hm, scale * factor
    clock.lap("cam_to_display")
    findings = [f for _, r, *_ in per_image for f in r.sites]
    sr = build_sr(dss, findings, model.info, series_number=out.series_number_sr,
                  series_description=out.series_description_sr)
    blobs = [("sr", _encode(sr))]
    clock.lap("sr_build")
    for ds, result, *_ in per_image:
        blobs.append(("heatmap", _encode(build_heatmap(ds, result.display, result.heatmap, result.sites, model.info,
                                                       display_scale=result.display_scale,
                                                       series_number=out.series_number_heatmap,
                                                       series_description=out.series_description_heatmap,
                                                       report_uid=str(sr.SOPInstanceUID)))))
    clock.lap("heatmap_build")
    kos = build_kos(dss, findings, model.info, positive_categories=out.positive_categories,
                    series_number=out.series_number_kos, series_description=out.series_description_kos, sr=sr)
    if kos is not None:
        blobs.append(("kos", _encode(kos)))
    clock.lap("kos_build")
    paths = []
    for i, (name, blob) in enumerate(blobs):  # the outbox files (untimed: the worker writes them, fsynced)
        p = objects_dir / f"{name}{i}.dcm"
        p.write_bytes(blob)
        paths.append(p)
    clock._t = time.perf_counter()
    sent = send_files(destination, paths)
    clock.lap("send")
    times = clock.times  # the object files stay (overwritten next pass) for the storescu reference
    times["_kos_built"] = kos is not None
    times["_sent_ok"] = all(r.ok for r in sent)
    times["_objects"] = [n for n, _ in blobs]
    return times


def end_to_end(files: list[Path], kind: str, views: list[str], model):
    """The real calls, nothing taken apart: dcmread → screen_study(heatmaps=True) → SR, heatmaps, KOS."""
    from pydicom import dcmread
    from osteoscreen.config import Output
    from osteoscreen.pipeline.screen import StudyImage, screen_study
    from osteoscreen.reports.heatmap import build_heatmap
    from osteoscreen.reports.kos import build_kos
    from osteoscreen.reports.sr import build_sr
    out = Output()
    t0 = time.perf_counter()
    dss = [dcmread(p) for p in files]
    results = screen_study([StudyImage(ds, kind, v) for ds, v in zip(dss, views)], model, heatmaps=True)
    findings = [f for r in results for f in r.sites]
    sr = build_sr(dss, findings, model.info, series_number=out.series_number_sr,
                  series_description=out.series_description_sr)
    _encode(sr)
    for ds, r in zip(dss, results):
        if r.display is not None and any(f.assessable for f in r.sites):
            _encode(build_heatmap(ds, r.display, r.heatmap, r.sites, model.info, display_scale=r.display_scale,
                                  report_uid=str(sr.SOPInstanceUID)))
    kos = build_kos(dss, findings, model.info, positive_categories=out.positive_categories, sr=sr)
    if kos is not None:
        _encode(kos)
    return time.perf_counter() - t0, findings


def _run_tool(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exit {proc.returncode}: "
                           + " | ".join(proc.stderr.decode(errors="replace").strip().splitlines())[:300])
    return elapsed


def reference_time(files: list[Path], work: Path, repeats: int, j2k: bool, fallback_files: list[Path]) -> dict:
    """DCMTK dcmj2pnm → PNG on every file of the study (summed per run), one process per file as a user
    runs it; one unmeasured run first. J2K: opj_decompress on the codestreams where installed, else
    dcmj2pnm on the uncompressed files."""
    from pydicom import dcmread
    from pydicom.encaps import generate_fragmented_frames
    dcmj2pnm, opj = shutil.which("dcmj2pnm"), shutil.which("opj_decompress")
    if j2k and opj:
        cmds = []
        for i, f in enumerate(files):
            frame = b"".join(next(generate_fragmented_frames(dcmread(f).PixelData)))
            (work / f"frame{i}.j2k").write_bytes(frame)
            cmds.append([opj, "-quiet", "-i", str(work / f"frame{i}.j2k"), "-o", str(work / f"ref{i}.pgm")])
        name, note = "opj_decompress → PGM", None
    elif dcmj2pnm:
        src = fallback_files if j2k else files
        cmds = [[dcmj2pnm, "+Wi", "1", "+on", str(f), str(work / f"ref{i}.png")] for i, f in enumerate(src)]
        name = "DCMTK dcmj2pnm → PNG"
        note = ("DCMTK cannot decode JPEG 2000 and opj_decompress is not installed: reference is dcmj2pnm "
                "on the uncompressed copy") if j2k else None
    else:
        return {"error": "dcmj2pnm not found (apt-get install dcmtk)"}
    try:
        for c in cmds:
            _run_tool(c)
        runs = [sum(_run_tool(c) for c in cmds) for _ in range(repeats)]
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"name": name, "note": note, "median_ms": 1000 * statistics.median(runs), "min_ms": 1000 * min(runs),
            "max_ms": 1000 * max(runs), "commands": [" ".join(Path(x).name if i == 0 else x for i, x in enumerate(c))
                                                      for c in cmds]}


def storescu_reference(paths: list[Path], port: int, repeats: int) -> dict:
    """DCMTK storescu sending the same result objects to the same storescp (one association, -R: the
    objects' own SOP classes), a new process per run; one unmeasured run first."""
    tool = shutil.which("storescu")
    if not tool or not paths:
        return {"error": "storescu not found" if not tool else "no objects"}
    cmd = [tool, "-R", "-aet", "OSTEOSCREEN", "-aec", "PACS", "127.0.0.1", str(port), *map(str, paths)]
    try:
        _run_tool(cmd)
        runs = [_run_tool(cmd) for _ in range(repeats)]
    except RuntimeError as exc:
        return {"error": str(exc)}
    return {"name": "DCMTK storescu, same objects, same storescp", "median_ms": 1000 * statistics.median(runs),
            "min_ms": 1000 * min(runs), "max_ms": 1000 * max(runs)}


class _StoreSCP:
    """A DCMTK storescp on a free loopback port: the peer of the 'send' stage."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self._proc = Proc(["storescp", "-aet", "PACS", "-od", str(folder), "+xa", str(self.port)],
                          folder.parent / "storescp.log", port=self.port, start_timeout=15)

    def stop(self) -> None:
        self._proc.stop(10)


def stage_breakdown(model, work: Path, repeats: int, quick: bool, bar: _Bar) -> dict:
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
    from osteoscreen.config import Destination
    from osteoscreen.synth.dicom_writer import write_dataset

    pelvis, pelvis_seed = positive_study("hip", 105)
    lumbar, lumbar_seed = positive_study("lumbar", 200)
    cases = {}
    p_plain = work / "pelvis.dcm"
    write_dataset(pelvis[0].dataset, p_plain, ExplicitVRLittleEndian)
    cases["pelvis"] = {"files": [p_plain], "kind": "hip", "views": ["ap"], "seed": pelvis_seed, "j2k": False}
    if not quick:
        p_j2k = work / "pelvis_j2k.dcm"
        write_dataset(pelvis[0].dataset, p_j2k, JPEG2000Lossless)
        cases["pelvis_j2k"] = {"files": [p_j2k], "kind": "hip", "views": ["ap"], "seed": pelvis_seed, "j2k": True,
                               "uncompressed": [p_plain]}
    lfiles = []
    for im in lumbar:
        f = work / f"lumbar_{im.view}.dcm"
        write_dataset(im.dataset, f, ExplicitVRLittleEndian)
        lfiles.append(f)
    cases["lumbar_ap_lat"] = {"files": lfiles, "kind": "lumbar", "views": [im.view for im in lumbar],
                              "seed": lumbar_seed, "j2k": False}
    out = {}
    peer = _StoreSCP(work / "storescp")
    try:
        dest = Destination.parse(f"PACS@127.0.0.1:{peer.port}")
        objects = work / "objects"
        objects.mkdir(exist_ok=True)
        for name, case in cases.items():
            files, kind, views = case["files"], case["kind"], case["views"]
            end_to_end(files, kind, views, model)  # warm
            staged(files, kind, views, model, objects, dest)
            e2e, stages, extra = [], {s: [] for s in STAGES}, {}
            for i in range(repeats):
                t, findings = end_to_end(files, kind, views, model)
                e2e.append(t)
                times = staged(files, kind, views, model, objects, dest)
                for s in STAGES:
                    stages[s].append(times.get(s, 0.0))
                extra = {k: v for k, v in times.items() if k.startswith("_")}
                bar.step(f"{name} {i + 1}/{repeats}")
            med = {s: 1000 * statistics.median(v) for s, v in stages.items()}
            send_ref = storescu_reference(sorted(objects.glob("*.dcm")), peer.port, repeats)
            ref = reference_time(files, work, repeats, case["j2k"], case.get("uncompressed", files))
            total = 1000 * statistics.median(e2e)
            out[name] = {"files": [f.name for f in files], "file_bytes": [f.stat().st_size for f in files],
                         "seed": case["seed"], "stages_median_ms": med,
                         "stages_sum_ms": sum(med.values()), "stages_sum_without_send_ms": sum(med.values()) - med["send"],
                         "end_to_end_ms": {"median": total, "min": 1000 * min(e2e), "max": 1000 * max(e2e), "n": len(e2e)},
                         "kos_built": extra.get("_kos_built"), "sent_ok": extra.get("_sent_ok"),
                         "objects": extra.get("_objects"),
                         "sites": [{"site": f.site, "assessable": f.assessable, "category": f.category,
                                    "reason": f.reason} for f in findings],
                         "reference": ref, "send_reference": send_ref, "load_1min": _load()}
    finally:
        peer.stop()
    return out


# -- plot ------------------------------------------------------------------------------------------
def plot_stages(stages: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(stages)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 1.1 * (len(names) + 1)))
    cmap = plt.get_cmap("tab20")
    labels_y = []
    y = 0
    for name in names:
        left = 0.0
        for i, s in enumerate(STAGES):
            v = stages[name]["stages_median_ms"][s]
            ax.barh(y, v, left=left, color=cmap(i % 20), label=STAGE_LABELS[s] if y == 0 else None)
            left += v
        e2e = stages[name]["end_to_end_ms"]["median"]
        ax.plot([e2e, e2e], [y - 0.4, y + 0.4], "k-", lw=2, label="end to end, real calls (no send)" if y == 0 else None)
        labels_y.append(name)
        y += 1
        ref = stages[name]["reference"]
        if "median_ms" in ref:
            ax.barh(y, ref["median_ms"], color="0.6", hatch="//", label="reference" if y == 1 else None)
            labels_y.append(f"{name}: {ref['name']}")
            y += 1
    ax.set_yticks(range(len(labels_y)), labels_y, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median ms (CPU)")
    ax.set_title("One study, stage by stage (medians)")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
