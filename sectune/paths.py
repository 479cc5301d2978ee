"""Where sectune looks for things on disk, each overridable by config or environment.

Two layouts: a checkout (``conf/`` beside ``sectune/``, the editable install ``make setup`` makes) and
an installed package (``pip install .`` or a wheel: ``conf/`` ships inside the package as
``sectune/conf``). An installed sectune never writes next to its own files: what it builds goes to
a per-user cache.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

#: True for ``pip install .`` / a wheel (conf/ shipped inside the package); False in a checkout.
INSTALLED = (_PACKAGE / "conf" / "config.yaml").is_file()

#: The built-in config groups (Hydra's primary config dir).
CONF_DIR = _PACKAGE / "conf" if INSTALLED else _PACKAGE.parent / "conf"

#: The folder holding ``conf/``: the checkout's root, or the installed package itself.
PROJECT_ROOT = CONF_DIR.parent
#: the Flower app project for ``flwr run`` (stage=federated on Flower's deployment runtime): in a checkout
#: experiments/hdfs_federated/flower_app, in an installed sectune its copy sectune/flower_app_project
FLOWER_APP_DIR = _PACKAGE / "flower_app_project" if INSTALLED else PROJECT_ROOT / "experiments" / "hdfs_federated" / "flower_app"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else None


def cache_dir() -> Path:
    """Built tiny models, tokenizers and dataset folders. ``SECTUNE_CACHE`` overrides; else the
    checkout's ``.cache/``, or for an installed sectune ``$XDG_CACHE_HOME/sectune`` (``~/.cache/sectune``)."""
    env = _env_path("SECTUNE_CACHE")
    if env:
        return env
    if not INSTALLED:
        return (PROJECT_ROOT / ".cache").resolve()
    xdg = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (xdg / "sectune").resolve()


def shared_data_dir() -> Path:
    """Real public data with provenance. ``SECTUNE_SHARED_DATA`` overrides ``../shared/data`` beside
    the checkout; an installed sectune looks in ``<cache dir>/shared_data``. Absent, the builders
    generate data, as on a fresh clone."""
    env = _env_path("SECTUNE_SHARED_DATA")
    if env:
        return env
    if not INSTALLED:
        return (PROJECT_ROOT.parent / "shared" / "data").resolve()
    return cache_dir() / "shared_data"


def resolved(path) -> str | None:
    """A configured path as one absolute string (``~`` and relative parts resolved), or None when unset: two
    settings naming the same file compare equal."""
    return str(Path(str(path)).expanduser().resolve()) if path else None
