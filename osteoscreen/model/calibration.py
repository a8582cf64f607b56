"""Calibrations: what adapts the model to one scanner (or scanner group), and how sure an estimate is.

A calibration is one JSON record (`osteoscreen calibrate` writes it; `training.calibrate` fits it).
It may hold, each part optional:

- ``batchnorm``: BatchNorm running statistics re-estimated on the scanner's own crops (mixed with
  the source statistics, Schneider et al. 2020): the network's view of that scanner's processing;
- ``ood``: the out-of-distribution gate re-referenced to the adapted features of those crops;
- ``temperature``: the softmax temperature re-fitted on local DXA-labelled cases;
- ``t_correction``: per site type a linear T-score correction ``a + b·T`` (b shrunk toward 1 when
  cases are few), fitted on local DXA-labelled cases;
- ``feature_correction``: per site type, where the local cases support it, a regression (ridge, or a
  Gaussian process's posterior mean) of what the line leaves on image features the network computes
  (``training.feature_correction``): the part of a scanner's error that varies from image to image with its processing. Each fit names its
  feature set (`FEATURE_SETS`; "pooled" where a record made before the choice existed names none)
  and, with ``sub_regions``, corrects the site type's sub-region estimates (femoral neck) too;
- ``residuals``: per interval bin (``hip``, ``lumbar_ap``, ``lumbar_lat``, ``lumbar_fused``) the
  signed out-of-fold residuals (true − corrected estimate) from which split-conformal prediction
  intervals are made (Mondrian: one quantile per bin, by crepes).

A model's own calibration (fitted on its validation data, no scanner) lives in its checkpoint; a
site's calibration replaces it for the images of its scanner. Calibrations name the model they
were fitted for by a hash of its weights, and are refused by any other model.

This module applies calibrations; it fits nothing (``training.calibrate`` does).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..equipment import ScannerKeyError, key_matches, scanner_key  # noqa: F401 - re-exported
from ..equipment import parse_scanner_key as _parse_scanner_key

FORMAT = "osteoscreen-calibration/1"
SITE_TYPE_NAMES = ("hip", "lumbar_ap", "lumbar_lat")  # pipeline.crops.SITE_TYPES, the model's site types
INTERVAL_BINS = (*SITE_TYPE_NAMES, "lumbar_fused")
MIN_BIN_RESIDUALS = 9  # fewer residuals than this give no 90 % interval (crepes would return ±inf)
# image features a feature correction may read (`feature_sets`): the last map's pooled features (the
# gate's, 96), every map's per-channel means and SDs (416), or those beside their mean over the crops
# of the same site type in the same image (832: a hip sees its pelvis's other hip); the last two
# with the whole image's descriptors after them (pipeline.scene, 39: its processing)
FEATURE_SETS = ("pooled", "channel_stats", "channel_stats_image", "channel_stats_scene", "channel_stats_image_scene")
# a set that reads the whole image's descriptors → the same set without them
SCENE_SETS = {"channel_stats_scene": "channel_stats", "channel_stats_image_scene": "channel_stats_image"}


class CalibrationError(ValueError):
    """A calibration file is unreadable, malformed or made for another model."""


# --- scanner keys (osteoscreen.equipment; a malformed key is a CalibrationError here) ---------------

def parse_scanner_key(key: str) -> dict[str, str]:
    try:
        return _parse_scanner_key(key)
    except ScannerKeyError as exc:
        raise CalibrationError(str(exc)) from None


# --- the record --------------------------------------------------------------------------------------

def weights_hash(state_dict) -> str:
    """sha256 over a model's parameters (not its BatchNorm statistics, which a calibration replaces),
    in name order: the identity a calibration is bound to, unchanged by re-saving a checkpoint."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        tensor = state_dict[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()


@dataclass
class Calibration:
    created: str
    model: dict  # name, version, weights_sha256
    scanner: str | None = None  # the key it was fitted for (None: the model's own, any scanner)
    n: dict = field(default_factory=dict)  # studies and crops, labelled and not, per site type
    dates: dict = field(default_factory=dict)  # first and last StudyDate of the cases
    batchnorm: dict | None = None  # {"pseudo_count": N, "buffers": {name: [values]}}
    ood: dict | None = None  # per site type index (str): mean, precision, threshold
    temperature: float | None = None
    # "classifier": the class head's softmax (under `temperature`); "predictive": the class
    # probabilities read off the conformal predictive distribution of the corrected T-score
    probabilities: str = "classifier"
    t_correction: dict = field(default_factory=dict)  # output ("hip", "hip:femoral_neck", …) → {intercept, slope}
    feature_correction: dict = field(default_factory=dict)  # site type → {features, mean, scale, coef, intercept, alpha, n}
    residuals: dict = field(default_factory=dict)  # interval bin → signed residuals
    report: dict = field(default_factory=dict)
    created_by: str = ""
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = self.content_id()

    def content_id(self) -> str:
        """A short id derived from the content: the same fit gives the same id."""
        body = {k: v for k, v in asdict(self).items() if k not in ("id", "report", "created", "created_by")}
        if not body["feature_correction"]:  # (calibrations made before it existed keep their ids)
            del body["feature_correction"]
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=float).encode()).hexdigest()
        return f"cal-{digest[:12]}"

    # ---- identity
    def describe(self) -> str:
        """One line for reports: id, date and case numbers."""
        labelled = self.n.get("labelled_studies", 0)
        unlabelled = self.n.get("unlabelled_studies", 0)
        return f"{self.id} ({self.created[:10]}; {labelled} labelled, {unlabelled} unlabelled studies)"

    def summary(self) -> dict:
        """What the SR, the database and the dashboard keep of it."""
        return {"id": self.id, "created": self.created, "scanner": self.scanner,
                "n_labelled": int(self.n.get("labelled_studies", 0)),
                "n_unlabelled": int(self.n.get("unlabelled_studies", 0))}

    # ---- application
    @property
    def reads_scenes(self) -> bool:
        """Whether a feature correction reads the whole image's descriptors (pipeline.scene): the
        node computes them only then."""
        return any(feature_set(fit) in SCENE_SETS for fit in self.feature_correction.values())

    def correct(self, t: np.ndarray, site_types: np.ndarray, output: str = "",
                features: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Apply the linear T-score corrections (identity where none was fitted), then the feature
        corrections, each reading its feature set from `features` (name → N×F arrays,
        `FEATURE_SETS`). `output` names a sub-region output ("femoral_neck"), corrected by its own
        line or else by its site type's, then by its site type's feature correction where that says
        `sub_regions` (the processing that moves a total-hip estimate moves the neck's in the same
        crop; records made before 2026-12-03 correct the site estimate only)."""
        t = np.asarray(t, dtype=np.float64).copy()
        site_types = np.asarray(site_types)
        fits = {name: fit for name, fit in self.feature_correction.items() if not output or fit.get("sub_regions")}
        if fits and features is None:
            raise ValueError(f"calibration {self.id} corrects with image features: pass them")
        for index, name in enumerate(SITE_TYPE_NAMES):
            fit = self.t_correction.get(f"{name}:{output}" if output else name) or self.t_correction.get(name)
            m = site_types == index
            if fit:
                t[m] = fit["intercept"] + fit["slope"] * t[m]
            feature_fit = fits.get(name)
            if feature_fit and m.any():
                which = feature_set(feature_fit)
                if features.get(which) is None:
                    what = " (the whole image's descriptors, pipeline.scene)" if which in SCENE_SETS else ""
                    raise ValueError(f"calibration {self.id} corrects {name} with the {which} features{what}: pass them")
                t[m] += feature_term(feature_fit, np.asarray(features[which])[m])
        return t

    def class_probabilities(self, t: np.ndarray, bins: list[str]) -> np.ndarray:
        """N×3 probabilities of normal / osteopenia / osteoporosis from the predictive distribution of
        the corrected T-score: P(T >= -1), P(-2.5 < T < -1), P(T <= -2.5); NaN rows where a bin has
        no residuals."""
        low = self.probability_at_most(t, bins, -2.5)
        below_normal = self.probability_at_most(t, bins, -1.0 - 1e-9)
        return np.stack([1 - below_normal, below_normal - low, low], axis=1).clip(0, 1)

    def has_intervals(self, bin_name: str) -> bool:
        return len(self.residuals.get(bin_name, ())) >= MIN_BIN_RESIDUALS

    def _bins(self, bins: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Mondrian set-up for crepes: the calibration residuals with their bin labels, and each
        query's bin (its own, or the one standing in for it; -1 where none can)."""
        names = [b for b in INTERVAL_BINS if self.has_intervals(b)]
        residuals = np.concatenate([np.asarray(self.residuals[b], np.float64) for b in names]) if names else np.zeros(0)
        labels = np.concatenate([np.full(len(self.residuals[b]), i) for i, b in enumerate(names)]) if names \
            else np.zeros(0, int)
        wanted = [b if self.has_intervals(b) else _fallback(self, b) for b in bins]
        query = np.array([names.index(w) if w in names else -1 for w in wanted], dtype=int)
        return residuals, labels, query, query >= 0

    def intervals(self, t: np.ndarray, bins: list[str], level: float) -> np.ndarray:
        """N×2 split-conformal prediction intervals at `level`, Mondrian by bin (crepes); NaN rows
        where a bin has too few residuals for that level. A fused lumbar estimate without fused
        residuals takes the wider of the AP and lateral bins."""
        from crepes import ConformalRegressor
        t = np.asarray(t, dtype=np.float64)
        out = np.full((len(t), 2), np.nan)
        residuals, labels, query, ok = self._bins(list(bins))
        if ok.any():
            with warnings.catch_warnings():  # too few for the level: crepes warns and returns ±inf
                warnings.simplefilter("ignore")
                cr = ConformalRegressor().fit(np.abs(residuals), bins=labels)
                out[ok] = cr.predict_int(t[ok], bins=query[ok], confidence=level)
        out[~np.isfinite(out).all(axis=1)] = np.nan
        return out

    def probability_at_most(self, t: np.ndarray, bins: list[str], threshold: float) -> np.ndarray:
        """P(true T <= threshold) from a conformal predictive system over the bins' signed residuals
        (crepes; NaN where a bin has none): e.g. the chance that a DXA would say osteoporosis."""
        from crepes import ConformalPredictiveSystem
        t = np.asarray(t, dtype=np.float64)
        out = np.full(len(t), np.nan)
        residuals, labels, query, ok = self._bins(list(bins))
        if ok.any():
            cps = ConformalPredictiveSystem().fit(residuals, bins=labels)
            out[ok] = cps.predict(t[ok], bins=query[ok], y=threshold, smoothing=False)
        return out

    # ---- files
    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=float))
        tmp.replace(path)
        return path

    @classmethod
    def from_json(cls, data: dict, source: str = "calibration") -> "Calibration":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"{source} is not an osteoscreen calibration ({FORMAT})")
        known = {f for f in cls.__dataclass_fields__}
        try:
            cal = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise CalibrationError(f"{source}: {exc}") from None
        if not isinstance(cal.model, dict) or "weights_sha256" not in cal.model:
            raise CalibrationError(f"{source} does not say which model it calibrates")
        for name, fit in (cal.feature_correction or {}).items():
            if name not in SITE_TYPE_NAMES or not _well_formed(fit):
                raise CalibrationError(f"{source}: feature correction {name!r} is malformed")
        return cal

    @classmethod
    def load(cls, path: Path | str) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CalibrationError(f"calibration file {path} not found") from None
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"calibration file {path} is not readable JSON: {exc}") from None
        return cls.from_json(data, str(path))


def feature_sets(pooled: np.ndarray, channel_stats: np.ndarray, site_types: np.ndarray,
                 images=None, scenes=None) -> dict[str, np.ndarray]:
    """The feature sets (`FEATURE_SETS`) of N crops from one forward pass's pooled features and
    channel statistics; `images` (N keys, None: each crop its own image) says which crops share an
    image. "channel_stats_image" sets each crop's channel statistics beside their mean over the
    crops of its site type in its image: what is left after the line is half shared between the two
    hips of one pelvis, since both went through the same exposure and processing, and the other hip's
    statistics say more about that than one crop's do (docs/CALIBRATION.md). A crop alone in its image
    (a lumbar view, a pelvis with one hip assessable) has its own statistics twice. `scenes` (N×K,
    each crop's image's pipeline.scene descriptors) add the `SCENE_SETS`, each of the two sets with
    the descriptors after it; where they are missing or not finite for some crop, those sets are absent."""
    channel_stats = np.asarray(channel_stats)
    context = channel_stats.copy()
    if images is not None:
        members: dict = {}
        for i, key in enumerate(zip(images, np.asarray(site_types).tolist())):
            members.setdefault(key, []).append(i)
        for rows in members.values():
            if len(rows) > 1:
                context[rows] = channel_stats[rows].mean(axis=0)
    out = {"pooled": pooled, "channel_stats": channel_stats,
           "channel_stats_image": np.concatenate([channel_stats, context], axis=1)}
    if scenes is not None:
        scenes = np.asarray(scenes, np.float64).reshape(len(channel_stats), -1)
        if np.isfinite(scenes).all():
            out.update({name: np.concatenate([out[without], scenes], axis=1) for name, without in SCENE_SETS.items()})
    return out


def feature_set(fit: dict) -> str:
    """The feature set a feature correction reads."""
    return fit.get("features", "pooled")


def feature_term(fit: dict, features: np.ndarray) -> np.ndarray:
    """A feature correction's term for each row of `features` (added to the line-corrected estimate):
    linear ("ridge"), or a kernel over the fit's support: Matérn 3/2 ("gp", a Gaussian process's
    posterior mean) or Gaussian ("kernel": the kernel ridge calibrate fitted until a Gaussian process
    replaced it; such files still apply)."""
    x = (np.asarray(features, np.float64) - np.asarray(fit["mean"])) / np.asarray(fit["scale"])
    kind = fit.get("kind", "ridge")
    if kind == "ridge":
        return fit["intercept"] + x @ np.asarray(fit["coef"])
    support = np.asarray(fit["support"], np.float64)
    sq = np.maximum((x ** 2).sum(1)[:, None] + (support ** 2).sum(1)[None, :] - 2 * x @ support.T, 0.0)
    if kind == "gp":  # Matérn ν = 3/2: a (1 + √3 d/ℓ) exp(−√3 d/ℓ)
        r = np.sqrt(3.0 * sq) / fit["length_scale"]
        k = fit["amplitude"] * (1.0 + r) * np.exp(-r)
    else:
        k = np.exp(-fit["gamma"] * sq)
    return fit["intercept"] + k @ np.asarray(fit["dual_coef"])


_KERNEL_PARAMETERS = {"kernel": ("gamma",), "gp": ("amplitude", "length_scale")}


def _well_formed(fit) -> bool:
    """A feature correction record has consistent sizes and finite numbers."""
    try:
        kind = fit.get("kind", "ridge")
        if feature_set(fit) not in FEATURE_SETS or kind not in ("ridge", *_KERNEL_PARAMETERS):
            return False
        if kind == "gp" and fit.get("nu") != 1.5:  # the only Matérn feature_term computes
            return False
        if not isinstance(fit.get("sub_regions", False), bool):
            return False
        mean, scale = np.asarray(fit["mean"], np.float64), np.asarray(fit["scale"], np.float64)
        numbers = [mean, scale, np.asarray([fit["intercept"]], np.float64)]
        if kind in _KERNEL_PARAMETERS:
            support, dual = np.asarray(fit["support"], np.float64), np.asarray(fit["dual_coef"], np.float64)
            numbers += [support, dual, np.asarray([fit[p] for p in _KERNEL_PARAMETERS[kind]], np.float64)]
            shapes_ok = support.ndim == 2 and support.shape[1] == len(mean) and dual.shape == (len(support),)
        else:
            coef = np.asarray(fit["coef"], np.float64)
            numbers.append(coef)
            shapes_ok = coef.shape == mean.shape
        return bool(shapes_ok and mean.ndim == 1 and scale.shape == mean.shape
                    and all(np.isfinite(v).all() for v in numbers))
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _fallback(cal: Calibration, bin_name: str) -> str | None:
    """The bin whose residuals stand in for one that has too few: a fused lumbar estimate takes the
    wider of its two views'."""
    if bin_name != "lumbar_fused":
        return None
    views = [b for b in ("lumbar_ap", "lumbar_lat") if cal.has_intervals(b)]
    if not views:
        return None
    return max(views, key=lambda b: np.quantile(np.abs(cal.residuals[b]), 0.9))

