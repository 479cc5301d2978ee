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


#: root → the run or sweep dir this process claimed (one per root: Hydra resolves its dir more than once)
_CLAIMED: dict[str, str] = {}


def fresh_run_dir(root: str, now=None) -> str:
    """``<root>/DATE/TIME``, Hydra's default run (``outputs``) or sweep (``multirun``) dir, claimed by creating it: when
    another command already has it (two started in the same second: one was refused as "in use", and two sweeps each
    lost jobs to the other), ``TIME-1``, ``TIME-2``, …. The resolver behind conf/config.yaml's ``hydra.run.dir`` and
    ``hydra.sweep.dir`` (cached, as Hydra's ``now`` is, so a sweep's jobs share it); left empty at exit, it goes."""
    import atexit
    from datetime import datetime

    if root in _CLAIMED:
        return _CLAIMED[root]
    base = Path(root) / (now or datetime.now()).strftime("%Y-%m-%d/%H-%M-%S")
    for k in range(1000):
        candidate = base if k == 0 else base.with_name(f"{base.name}-{k}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:  # cannot create it: Hydra's own attempt names the error
            return str(base)
        _CLAIMED[root] = str(candidate)
        atexit.register(_drop_if_empty, candidate)
        return str(candidate)
    return str(base)


def claimed_dirs() -> list[str]:
    """The dirs :func:`fresh_run_dir` claimed in this process."""
    return list(_CLAIMED.values())


def _drop_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only an empty folder: a command that stopped before writing anything
    except OSError:
        pass
