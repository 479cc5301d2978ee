"""Trainer checkpoints: which are complete, which files of one are damaged (named, before anything loads them), the
newest that loads, and what ``train.resume`` (null | auto | a dir) resolves to. Trainer saves and resumes them;
this only decides which one."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from omegaconf import DictConfig

from sectune.errors import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_complete_checkpoint(path: Path) -> bool:
    """Trainer writes trainer_state.json last: without it a checkpoint was cut short."""
    has_weights = any(path.glob("*.safetensors"))
    return (path / "trainer_state.json").is_file() and (path / "optimizer.pt").is_file() and has_weights


def damaged_file(path: Path) -> tuple[str, str] | None:
    """(file name, why) for a complete-looking checkpoint that would not load, or None.

    Cheap checks that read no tensor data: each safetensors header parses and its tensors end where
    the file ends, each torch ``.pt``/``.pth`` zip archive has its directory (written last), and
    trainer_state.json parses. A file cut short (a full disk, a copy interrupted) fails them.
    """
    import zipfile

    damage = damaged_safetensors(path)
    if damage is not None:
        return damage
    for f in sorted([*path.glob("*.pt"), *path.glob("*.pth")]):
        try:
            with zipfile.ZipFile(f):
                pass
        except (OSError, zipfile.BadZipFile) as e:
            return f.name, f"not a complete torch file ({e})"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return "trainer_state.json", f"does not parse ({e})"
    if not isinstance(state, dict):
        return "trainer_state.json", f"not a JSON object ({type(state).__name__})"
    return None


def damaged_safetensors(path: Path) -> tuple[str, str] | None:
    """(file name, why) for the first ``*.safetensors`` in ``path`` whose header does not parse or whose
    tensors do not end where the file ends (a file cut short), or None. Reads no tensor data."""
    for f in sorted(path.glob("*.safetensors")):
        try:
            size = f.stat().st_size
            with f.open("rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if size < 8 + header_len:
                    return f.name, f"truncated: {size} bytes, its header alone needs {8 + header_len}"
                header = json.loads(fh.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if size != 8 + header_len + end:
                return f.name, f"truncated: {size} bytes, its header says {8 + header_len + end}"
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return f.name, f"unreadable safetensors header ({type(e).__name__})"
    return None


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint that loads; a damaged newer one is skipped, saying why."""
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for p in checkpoint_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and is_complete_checkpoint(p):
            found.append((int(m.group(1)), p))
    for _, ckpt in sorted(found, reverse=True):
        damage = damaged_file(ckpt)
        if damage is None:
            return ckpt
        print(f"sectune: warning: train.resume=auto: skipping {ckpt.name}: {damage[0]} is damaged ({damage[1]})", file=sys.stderr)
    return None


def resolve_resume(cfg: DictConfig, checkpoint_dir: Path) -> str | None:
    """``train.resume``: null (fresh), auto (newest complete checkpoint that loads, if any), or a dir."""
    r = cfg.train.resume
    if r in (None, "", "null", "none"):
        return None
    if r == "auto":
        ckpt = latest_checkpoint(checkpoint_dir)
        if ckpt is None:
            print(f"sectune: train.resume=auto: no complete checkpoint in {checkpoint_dir}; starting fresh")
        else:
            print(f"sectune: train.resume=auto: resuming from {ckpt}")
        return str(ckpt) if ckpt else None
    path = Path(r)
    if not path.is_dir() or not is_complete_checkpoint(path):
        raise ConfigError(f"train.resume={r}: not a complete Trainer checkpoint (needs trainer_state.json, optimizer.pt, weights)")
    damage = damaged_file(path)
    if damage:
        raise ConfigError(f"train.resume={r}: {path / damage[0]} is damaged ({damage[1]}); resume from an earlier "
                          "checkpoint, or train.resume=auto to take the newest one that loads")
    return str(path)
