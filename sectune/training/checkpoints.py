"""Trainer checkpoints: which are complete, which files of one are damaged (named, before anything loads them), the
newest that loads, and what ``train.resume`` (null | auto | a dir) resolves to. Trainer saves and resumes them;
this only decides which one."""

from __future__ import annotations

import hashlib
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
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return "trainer_state.json", f"does not parse ({e})"
    if not isinstance(state, dict):
        return "trainer_state.json", f"not a JSON object ({type(state).__name__})"
    if not isinstance(state.get("global_step"), int) or not isinstance(state.get("log_history", []), list):
        return "trainer_state.json", "no global_step (Trainer's record of the step is missing)"
    return None


def damaged_safetensors(path: Path) -> tuple[str, str] | None:
    """(file name, why) for the first ``*.safetensors`` in ``path`` whose header does not parse or whose
    tensors do not end where the file ends (a file cut short), or that safetensors itself refuses (a tensor whose shape
    does not fit its offsets), or None. Reads no tensor data."""
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
        from safetensors import safe_open

        try:  # the library's own checks of the header (a tensor's shape or dtype against its offsets, overlaps, gaps)
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # SafetensorError, or an OSError from the mmap
            return f.name, f"does not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def require_weights(folder: Path, kind: str, key: str) -> Path:
    """``folder`` if it holds its weights whole (an adapter's adapter_model.safetensors; a model's *.safetensors), else a
    ConfigError naming ``key`` and the file, before any model loads (a missing adapter file read as a hub repo id)."""
    from sectune.errors import ConfigError

    files = [folder / "adapter_model.safetensors"] if kind == "adapter" else sorted(folder.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        what = "adapter_model.safetensors" if kind == "adapter" else "*.safetensors weights"
        raise ConfigError(f"{key}: {folder} has no {what} (its {kind}'s weights); the run's files are incomplete: rerun it "
                          "or copy it again")
    if (damage := damaged_safetensors(folder)) is not None:
        raise ConfigError(f"{key}: {folder / damage[0]} is damaged ({damage[1]}); rerun that run or copy it again")
    return folder


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders under ``checkpoint_dir``, newest (highest N) first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir() and is_complete_checkpoint(p)]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(checkpoint_dir: Path, needs: tuple[str, ...] = ()) -> Path | None:
    """The newest complete checkpoint that loads; a damaged newer one is skipped, saying why, and so is one that
    lacks a file of ``needs`` (a stage's own state, which its callback writes after Trainer's files: a kill in between
    left a checkpoint Trainer calls complete)."""
    for ckpt in complete_checkpoints(checkpoint_dir):
        why = unusable(ckpt, needs)
        if why is None:
            return ckpt
        print(f"sectune: warning: train.resume=auto: skipping {ckpt.name}: {why}", file=sys.stderr)
    return None


def unusable(ckpt: Path, needs: tuple[str, ...] = ()) -> str | None:
    """Why a complete-looking checkpoint cannot be resumed (``X is damaged (why)``, ``X is missing``), or None."""
    damage = damaged_file(ckpt)
    if damage:
        return f"{damage[0]} is damaged ({damage[1]})"
    gone = next((n for n in needs if not (ckpt / n).is_file()), None)
    if gone:
        return f"{gone} is missing (the save was cut short)"
    for name in needs:  # a stage's own record (rl's heldout_best.json): damaged, auto takes the checkpoint before (session 36)
        if name.endswith(".json"):
            try:
                json.loads((ckpt / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                return f"{name} is damaged ({type(e).__name__})"
    return None


def nonfinite_weights(folder: Path, max_bytes: int | None = None) -> str | None:
    """The first ``*.safetensors`` file in ``folder`` holding a NaN or inf weight, or None (also None when the files
    together exceed ``max_bytes``: a full 8B model is not re-read to check it)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if max_bytes is not None and sum(f.stat().st_size for f in files) > max_bytes:
        return None
    for f in files:
        if not all(bool(t.isfinite().all()) for t in load_file(str(f)).values() if t.is_floating_point()):
            return f.name
    return None


def last_finite_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint whose logged numbers (losses, eval metrics) and adapter weights are all finite:
    the one a NaN report calls "last good" (the newest could already hold the NaN it stopped on)."""
    import math

    for ckpt in complete_checkpoints(checkpoint_dir):
        if damaged_file(ckpt) is not None:
            continue
        try:
            logs = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")).get("log_history") or []
        except (OSError, ValueError):
            continue
        if any(isinstance(v, float) and not math.isfinite(v) for row in logs for v in row.values()):
            continue
        # every weights file: a full fine-tune's model.safetensors too (only the adapter's was read, so a lora=none run
        # named a checkpoint of NaN weights its last good one: an audit, session 36)
        if nonfinite_weights(ckpt):
            continue
        return ckpt
    return None


def resolve_resume(cfg: DictConfig, checkpoint_dir: Path, needs: tuple[str, ...] = ()) -> str | None:
    """``train.resume``: null (fresh), auto (newest complete checkpoint that loads, if any), or a dir. A fresh start
    records what its checkpoints are trained with (:data:`RESUME_RECORD`) and sets an earlier attempt's checkpoints
    aside (:data:`EARLIER_DIR`), so that auto never continues them under these settings; a resume from checkpoints
    trained with other settings is an error naming them (it used to continue silently: lr 0.01 weights under an lr
    0.001 config). ``needs``: files of a stage's own state a checkpoint must hold (RL's held-out scores)."""
    r = cfg.train.resume
    if r in (None, "", "null", "none", "no"):
        return _record_fresh(cfg, checkpoint_dir)
    if r == "auto":
        ckpt = latest_checkpoint(checkpoint_dir, needs)
        if ckpt is None:
            print(f"sectune: train.resume=auto: no complete checkpoint in {checkpoint_dir}; starting fresh")
            return _record_fresh(cfg, checkpoint_dir)
        _check_same_training(cfg, ckpt, f"train.resume=auto ({ckpt})")
        print(f"sectune: train.resume=auto: resuming from {ckpt}")
        return str(ckpt)
    path = Path(r)
    if not path.is_dir() or not is_complete_checkpoint(path):
        raise ConfigError(f"train.resume={r}: not a complete Trainer checkpoint (needs trainer_state.json, optimizer.pt, weights)")
    why = unusable(path, needs)
    if why:
        raise ConfigError(f"train.resume={r}: {path}/{why}; resume from an earlier "
                          "checkpoint, or train.resume=auto to take the newest one that loads")
    _check_same_training(cfg, path, f"train.resume={r}")
    return str(path)


#: beside a run's checkpoints: the settings they are trained with (a resume must use the same)
RESUME_RECORD = "trained_with.json"
#: train.* settings a resume may change: how long, how often to save/log/evaluate, where
RESUMABLE = {"resume", "max_steps", "epochs", "save_steps", "save_total_limit", "logging_steps", "eval_steps", "device",
             "num_workers", "empty_cache_steps", "eval_batch_size"}


def training_settings(cfg: DictConfig, root: Path) -> dict:
    """Flat ``{key: value}`` of what the weights depend on: model, quantization, LoRA, loss, data, the stage's own
    group, train.* beyond :data:`RESUMABLE` and the number of processes; paths under ``root`` written relative to it (a moved pipeline)."""
    from omegaconf import OmegaConf

    from sectune.runner import relative_to_root

    from sectune.training import distributed

    # generation: GRPO samples with it (and keeps the adapter its greedy evaluations prefer); debug.enabled: contrastive's
    # few-sample debug run (both were resumed under other values without a word)
    groups = ["model", "quantization", "lora", "loss", "dataset", "train", str(cfg.stage.name), *(["generation"] if cfg.stage.name == "rl" else [])]
    # N processes train on N x train.batch_size: resumed on another count, a run continued on another global batch
    # without the other ranks' RNG state
    flat: dict = {"stage": str(cfg.stage.name), "processes": distributed.world_size(), "debug.enabled": bool(cfg.debug.enabled)}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = value

    for g in groups:
        node = OmegaConf.select(cfg, g, default=None)
        if node is None or not OmegaConf.is_config(node):
            continue
        walk(g, relative_to_root(OmegaConf.to_container(node, resolve=True), str(root)))
    flat.update(input_identities(cfg, groups))
    flat.update(data_identity(cfg))
    flat.update(data_places(cfg, flat))
    if OmegaConf.select(cfg, "dataset.normalizer", default=None) == "quantile":  # the prompts' bins (session 42 changed them)
        from sectune.data.flows import FlowNormalizer

        flat["dataset.quantile_rule"] = FlowNormalizer.QUANTILE_RULE
    return {k: v for k, v in flat.items() if not (k.startswith("train.") and k.split(".", 1)[1] in RESUMABLE)}


#: the keys naming a run whose weights a stage starts from or scores with
INPUT_KEYS = ("model.name_or_path", "dpo.init_from", "rl.init_from", "rl.reward_model", "reward.init_from", "contrastive.init_from")
#: prefixes of the record's keys added in session 42: a record from before holds none of them (nothing to compare)
IDENTITY_PREFIXES = ("input.", "data.")


def input_identities(cfg: DictConfig, groups: list[str]) -> dict:
    """``input.<key>``: when a key of :data:`INPUT_KEYS` names a sectune run (or its ``model/`` folder), that run's
    finishing time and config digest. Its path alone was recorded: an SFT run retrained in the same dir (a pipeline rerun
    with another sft setting does it) had dpo/rl resume checkpoints trained from the old weights against the new
    reference and start metrics, without a word (an audit, session 42)."""
    from omegaconf import OmegaConf

    out = {}
    for key in INPUT_KEYS:
        value = OmegaConf.select(cfg, key, default=None) if key.split(".")[0] in groups else None
        if not value:
            continue
        p = Path(str(value)).expanduser()
        for folder in (p, p.parent):
            try:
                rec = json.loads((folder / "result.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict) and rec.get("finished"):
                out[f"input.{key}"] = f"finished {rec.get('finished')}, config {str(rec.get('config_digest'))[:12]}"
                break
    return out


def data_identity(cfg: DictConfig) -> dict:
    """``data.<key>``: a digest of the files each data key names (``run_digest.data_fingerprint``: names, sizes, times).
    A resume read the split of whatever was there: a file rewritten between the interruption and the resume went on with
    another sample, sessions trained on now in validation (an audit, session 42)."""
    from sectune.run_digest import data_fingerprint

    # not the whole shared data folder (paths.shared_data, every dataset's files): a file added beside the injection texts
    # refused an auth-log SFT's resume (a review of this change, session 42); a user's own files (dataset.path, a
    # dataset.source_dir of their own) and the auth rules' version are what a resume can meet changed
    return {f"data.{k}": _files_digest(v) for k, v in data_fingerprint(cfg).items() if k != "paths.shared_data"}


#: prefix of the record's keys that recognise a data path's files at another place (:func:`data_places`), never compared
PLACE_PREFIX = "place."


def data_places(cfg: DictConfig, flat: dict) -> dict:
    """``place.<key>``: for each data path the record holds (``dataset.source_dir``, ``dataset.path``, …), a digest of
    the files it names (``run_digest.data_fingerprint``; the shared data folder where ``dataset.source_dir`` is it). Used
    only where that path differs on resuming: the same files at another place (a checkout moved or cloned again, its
    ``../shared/data`` with it) are the same data, as for a pipeline's steps (``skip_digest``); at the same place the
    path alone counts as before (a file added beside the injection texts must not stop an auth-log resume)."""
    from sectune.run_digest import DATA_PATH_KEYS, data_fingerprint, listed

    fp = data_fingerprint(cfg, content=True)  # the files' bytes: a copy without its times (cp -r) is the same data
    out = {}
    for key in DATA_PATH_KEYS:
        files = fp.get(key, fp.get("paths.shared_data") if key == "dataset.source_dir" else None)
        if flat.get(key) and files is not None and listed(files):  # an unlistable folder: its place counts
            out[PLACE_PREFIX + key] = _files_digest(files)
    return out


def _same_bytes(before: dict, now: dict, key: str) -> bool:
    """Whether a data path (``dataset.path``) or its files' digest (``data.dataset.path``: names, sizes, times) that
    differ name files of the same bytes (``place.<key>``): a copy without its times (``cp -r``) at the new place was
    refused by its ``data.<key>`` though its path was excused (an audit, session 45)."""
    place = PLACE_PREFIX + (key[len("data."):] if key.startswith("data.") else key)
    return before.get(place) is not None and before.get(place) == now.get(place)


def _files_digest(files) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: under a run's checkpoints/: the checkpoints of the attempt a fresh start replaced (one generation is kept)
EARLIER_DIR = "earlier"


def _record_fresh(cfg: DictConfig, checkpoint_dir: Path) -> None:
    from sectune.runner import write_json_atomic
    from sectune.training import distributed

    if distributed.is_main_process():
        set_aside_earlier(checkpoint_dir)
        write_json_atomic(checkpoint_dir / RESUME_RECORD, training_settings(cfg, checkpoint_dir.parent.parent))
    return None


def set_aside_earlier(checkpoint_dir: Path) -> None:
    """A fresh start in a dir that holds an earlier attempt's ``checkpoint-N`` folders moves them (and the record of
    their settings) to ``checkpoints/earlier/``: left in place, ``train.resume=auto`` took the newest of them, trained
    with other settings, once the record said this attempt's (and Trainer wrote this attempt's checkpoint-N into the
    same folders). The attempt before that, if any was kept there, is deleted, saying so."""
    import os
    import shutil

    if not checkpoint_dir.is_dir():
        return
    found = [p for p in checkpoint_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    if not found:
        return
    earlier = checkpoint_dir / EARLIER_DIR
    dropped = earlier.is_dir() and any(earlier.iterdir())
    shutil.rmtree(earlier, ignore_errors=True)
    earlier.mkdir()
    for p in [*found, checkpoint_dir / RESUME_RECORD]:
        if p.exists():
            os.replace(p, earlier / p.name)
    print(f"sectune: a fresh start (train.resume=null): the earlier attempt's {len(found)} checkpoint(s) moved to {earlier}"
          + (" (replacing the ones an earlier fresh start had put there)" if dropped else "")
          + "; train.resume=auto continues this attempt's only", file=sys.stderr)


def _added_since(before: dict, now: dict) -> dict:
    """The keys a newer sectune added since ``before`` was recorded, at the value that reproduces what the run did then:
    their schema default, or for a key whose default changed what runs do (``dataset.injection_text_groups``: runs
    before it split as containment does) that older value. Every interrupted run's resume was refused over a key its
    stage never reads (an audit, session 38), with advice that could not be followed (the key takes no null)."""
    from omegaconf import OmegaConf

    from sectune.config import SectuneConfig
    from sectune.run_digest import older_values

    defaults = OmegaConf.structured(SectuneConfig)
    older = older_values(now.get("dataset.name"))
    added = {}
    for k in set(now) - set(before):
        try:
            then = older[k] if k in older else OmegaConf.select(defaults, k, default=None, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - a default that does not resolve alone (an interpolation): not taken as the same
            continue
        if then == now[k]:
            added[k] = then
    return added


def _check_same_training(cfg: DictConfig, ckpt: Path, key: str) -> None:
    record = ckpt.parent / RESUME_RECORD
    try:
        before = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # checkpoints from before the record, or a damaged record: nothing to compare
        what = "is missing" if isinstance(e, FileNotFoundError) else f"cannot be read ({type(e).__name__}: {e})"
        print(f"sectune: warning: {key}: {record} {what}, so these settings cannot be checked against the ones the "
              "checkpoints were trained with; resuming as asked")
        return
    if not isinstance(before, dict):
        print(f"sectune: warning: {key}: {record} is not a record of settings; they cannot be checked")
        return
    before.setdefault("processes", 1)  # recorded since session 27: the records before are of 1-process runs
    now = json.loads(json.dumps(training_settings(cfg, ckpt.parent.parent.parent), default=str))
    if "dataset.quantile_rule" in now:  # recorded since session 42, whose bins differ: a record without it is of rule 1's
        before.setdefault("dataset.quantile_rule", 1)
    for k in now:  # recorded since session 35 (42: inputs and data): a record from before says nothing about them
        if (k == "debug.enabled" or k.startswith(("generation.", *IDENTITY_PREFIXES))) and k not in before:
            before[k] = now[k]
    before.update(_added_since(before, now))
    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and not k.startswith(PLACE_PREFIX)
                  and not _same_bytes(before, now, k))
    if diff:
        shown = "; ".join(f"{k}: {before.get(k)!r} there, {now.get(k)!r} now" for k in diff[:4])
        why = "".join(sorted({" (input.<key>: the run that key names was trained again since)" if k.startswith("input.") else
                              " (data.<key>: the files that key names changed since)" for k in diff if k.startswith(IDENTITY_PREFIXES)}))
        raise ConfigError(f"{key}: those checkpoints were trained with other settings ({shown}{' …' if len(diff) > 4 else ''})"
                          f"{why}; resume with the same settings, or train.resume=null to train afresh with these")
