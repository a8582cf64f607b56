"""The model as the settings configure it: one checkpoint, a calibration per scanner (`calibrations:`),
`require_calibration` and `interval_level`. What the worker, `predict` and `score` load."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError, Settings
from .model.calibration import CalibrationError
from .model.inference import ScannerModels, load_scanner_models


def models_from_settings(settings: Settings, calibration_file: Path | str | None = None) -> ScannerModels:
    """calibration_file: one calibration for every image (`--calibration`). A calibration that is
    unreadable or made for another model is a configuration error (exit 2)."""
    try:
        return load_scanner_models(settings.model_path, device=settings.device, threads=settings.model_threads,
                                   precision=settings.model_precision, interval_level=settings.interval_level,
                                   calibrations=settings.calibrations, require_calibration=settings.require_calibration,
                                   calibration_file=calibration_file)
    except CalibrationError as exc:
        raise ConfigError(str(exc)) from None
