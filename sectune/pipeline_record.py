"""What a pipeline step's dir records (``step.json``, ``.hydra/``) and whether the step already ran:
same digest, or the same config apart from ``train.resume``/``debug``, keys a newer sectune added at
their defaults, and the pipeline dir it was moved from."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from sectune import runner
from sectune.runner import config_digest, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from sectune.stages.pipeline import Step

STEP_FILE = "step.json"


def already_done(step: Step, earlier: list[Step] = ()) -> dict | None:
    """The step's result when it succeeded with this config (same digest, ``train.resume``/``debug`` aside) after
    every ``earlier`` step of the pipeline finished (one retrained since handed it other inputs)."""
    res = runner.previous_result(step.dir)
    if res is not None and any(_after(runner.previous_result(e.dir), res) for e in earlier):
        return None
    if res is None and (step.dir / runner.RESULT_FILE).is_file():
        print(f"sectune: warning: pipeline: {step.dir / runner.RESULT_FILE} is not a readable result (damaged?); "
              f"running the {step.name} step again", file=sys.stderr)
    try:
        meta = json.loads((step.dir / STEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (res and res.get("status") == "succeeded" and res.get("config_digest") == meta.get("config_digest")):
        return None
    if "data" in meta and meta["data"] != _json(runner.data_fingerprint(step.cfg)) and meta.get("skip_digest") != step.skip_digest:
        # the same config on other data (real logs downloaded since, a user's file edited); where the skip digest
        # matches, the files hold the same bytes (a copy without its times: cp -r, a download again)
        return None
    if meta.get("skip_digest") == step.skip_digest or same_but_newer_defaults(step):
        damage = runner.damaged_artifact(step.dir, res)
        if damage is not None:
            print(f"sectune: warning: pipeline: the {step.name} step's {damage}; running it again", file=sys.stderr)
        return res if damage is None else None
    return None


def _after(upstream: dict | None, res: dict) -> bool:
    """Whether ``upstream`` (an earlier step's result) finished after ``res`` started; unreadable times count as after."""
    from datetime import datetime

    if not upstream or not upstream.get("finished"):
        return False
    try:
        return datetime.fromisoformat(str(upstream["finished"])) > datetime.fromisoformat(str(res.get("started")))
    except (TypeError, ValueError):
        return True


def _json(obj):
    return json.loads(json.dumps(obj, default=str))


def same_but_newer_defaults(step: Step) -> bool:
    """The step's saved config (``.hydra/config.yaml``) equals this one apart from ``train.resume``/``debug``
    and from keys a newer sectune added at their schema defaults: upgrading sectune between a failed run
    and its rerun must not retrain the steps that succeeded. Any other difference: not the same."""
    from sectune.config import SectuneConfig

    try:
        saved = OmegaConf.to_container(OmegaConf.load(step.dir / ".hydra" / "config.yaml"), resolve=True)
    except Exception:  # noqa: BLE001 - unreadable or absent: the step runs again
        return False
    current = OmegaConf.to_container(step.cfg, resolve=True)
    defaults = OmegaConf.to_container(OmegaConf.structured(SectuneConfig), resolve=False)
    from sectune.run_digest import older_values

    # what a run from before such a key did, not the key's default now
    for key, older in older_values(current.get("dataset", {}).get("name")).items():
        *parents, leaf = key.split(".")
        node = defaults
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[leaf] = older
    for cfg in (saved, current):
        debug = cfg.pop("debug", None)
        if isinstance(debug, dict) and debug.get("enabled") and cfg.get("stage", {}).get("name") == "contrastive":
            cfg["debug"] = {k: debug.get(k) for k in ("enabled", "max_steps", "max_samples")}  # a quick check run trained
        cfg.get("train", {}).pop("resume", None)
        cfg.get("paths", {}).pop("cache_dir", None)  # a step recorded before skip_digest left it out, in a moved checkout
    # a pipeline dir moved or copied since (skip_digest's <root>): the paths the steps handed each other
    root = str(Path(step.dir).resolve().parent)
    old_root = _saved_root(saved, current, root)
    if old_root is not None:
        saved, current = runner.relative_to_root(saved, old_root), runner.relative_to_root(current, root)
    return _covers(saved, current, defaults)


def _saved_root(saved, current, root: str) -> str | None:
    """The pipeline dir a step's saved config was written in, when it was elsewhere: every saved path whose
    current value lies under ``root`` must end the same way under one and the same old dir; else None."""
    found: set[str] = set()
    mismatch = False

    def walk(a, b):
        nonlocal mismatch
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a.keys() & b.keys():
                walk(a[k], b[k])
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for x, y in zip(a, b):
                walk(x, y)
        elif isinstance(a, str) and isinstance(b, str) and a != b and b.startswith(root + "/"):
            tail = b[len(root):]
            if a.endswith(tail) and len(a) > len(tail):
                found.add(a[: -len(tail)])
            else:
                mismatch = True

    walk(saved, current)
    return found.pop() if len(found) == 1 and not mismatch else None


def _covers(saved, current, defaults) -> bool:
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return saved == current
    if set(saved) - set(current):
        return False  # a key this sectune no longer has
    for key, value in current.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if key in saved:
            if not _covers(saved[key], value, default):
                return False
        elif value != default:
            return False
    return True


def record_step(step: Step) -> None:
    """``step.json`` (what the skip check reads) and ``.hydra/`` as a plain run would have it.

    ``step.json`` first: its new digest no longer matches the old result.json's, so from then on the step
    counts as not done. Written the other way round, a run killed between the two files would leave the
    new config beside the old step.json and result, and ``same_but_newer_defaults`` would then pass a changed
    step as finished. Every file is written to a temporary name and renamed."""
    step.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(step.dir / STEP_FILE, {
        "step": step.name,
        "skip_digest": step.skip_digest,
        "config_digest": config_digest(step.cfg),
        "composed_with": step.composed_with,
        "merged": step.merged,
        "data": runner.data_fingerprint(step.cfg),
    })
    hydra_dir = step.dir / ".hydra"
    flat = [f"{k}={v}" for k, v in _flatten(step.merged)]
    write_text_atomic(hydra_dir / "config.yaml", OmegaConf.to_yaml(step.cfg))
    write_text_atomic(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create([*step.composed_with, *flat])))


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", json.dumps(v) if isinstance(v, (list, dict)) else v))
    return out
