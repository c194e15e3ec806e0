"""Repository-relative default locations (never the current folder)."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root: the folder that holds ``src/``.
REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_DATA_DIR = REPO_ROOT / "split_datasets"
DEFAULT_MODELS_DIR = REPO_ROOT / "trained_models"
DEFAULT_RESULTS_DIR = REPO_ROOT / "result_images"
DEFAULT_EXAMPLE_DIR = REPO_ROOT / "dataset_example"


def default_cache_dir() -> Path:
    """Feature-cache folder: ``$HIERNET_CACHE`` if set, else ``<repo>/.cache/hiernet``."""
    env = os.environ.get("HIERNET_CACHE")
    return Path(env) if env else REPO_ROOT / ".cache" / "hiernet"
