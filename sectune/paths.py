"""Where sectune looks for things on disk, each overridable by config or environment."""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout (or installed tree) root: the folder holding ``sectune/`` and ``conf/``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Real public data with provenance. ``SECTUNE_SHARED_DATA`` overrides ``../shared/data``."""
    env = os.environ.get("SECTUNE_SHARED_DATA")
    return Path(env).expanduser().resolve() if env else (PROJECT_ROOT.parent / "shared" / "data").resolve()


def cache_dir() -> Path:
    """Built tiny models, tokenizers and dataset folders. ``SECTUNE_CACHE`` overrides."""
    env = os.environ.get("SECTUNE_CACHE")
    return Path(env).expanduser().resolve() if env else (PROJECT_ROOT / ".cache").resolve()
