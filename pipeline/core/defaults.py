"""Defaults that settings and callers read without importing any model library: input caps and folders."""

from __future__ import annotations

import os
from pathlib import Path

# ~7300x5500: above phone cameras, well under Pillow's 89M bomb guard (which also caps any larger setting).
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "item"
DEFAULT_MODEL_DIR = CACHE_ROOT / "models"
DEFAULT_FEATURE_DIR = CACHE_ROOT / "features"  # see pipeline.lab.features: cached artifacts of datasets

# Precisions a stage may run at (see devices.py); here so that settings can check them without importing torch.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
