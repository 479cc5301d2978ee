"""Sweep bookkeeping: ``sweep.skip_done`` and the index of finished config digests.

Hydra puts every ``sectune -m …`` in a NEW ``multirun/DATE/TIME`` dir, so "this job already ran"
cannot be read from the job's own dir alone. Every succeeded sweep job (rank 0) therefore drops
``<sweep.index_dir>/<config digest>.json`` (default ``multirun/.index/``) naming its run dir.
With ``sweep.skip_done=true`` a job first looks in its own dir (a rerun with
``hydra.sweep.dir=<the old dir>``), then in the index; when it finds a succeeded result.json
with the same digest it does not train again: its job dir gets a result.json copied from the
earlier one, with ``"reused_from"`` (the earlier run dir) and artifact paths pointing there, so
``sectune-report`` over the new sweep still has every row. A failed or deleted earlier run is
never reused: the index entry is checked against the result.json it points to.

The digest (``runner.config_digest``) covers the whole resolved config except the ``sweep`` node
itself, so turning ``sweep.skip_done`` on does not make an earlier run look different. A job is also found by its
place-free digest (``config_digest(cfg, portable=True)``, ``result.json``'s ``place_free_digest``: without
``paths.cache_dir`` and the data paths' places, the data counting by its files), which the index is keyed by, and an
index entry names its run dir relative to the index too: the same sweep in a checkout moved or cloned again (whose
``multirun/`` came along) reuses its finished jobs.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

#: metric names measured on the test split: never a sweep objective nor a report's default sort key, since ranking jobs by
#: them chooses on test (the top row is then the best of k noisy test scores). stage=evaluate's and the baselines' test_*
#: (also mid-name: baseline_test_f1), the pipeline's held-out table (heldout_*, but its chosen policy's validation score
#: heldout_val_*, and each row's <row>_verdict_macro_f1 …), attack success on the held-out injected windows (the
#: analyst's, and the classic baseline's beside it: baseline_attack_success_rate …), and the
#: preference stages' held-out pairs (DPO's preference_accuracy / logp_margin / reward_margin, reward's reward_accuracy),
#: the grounded rows and invented-names rates of the table, the representation metrics of the held-out triplets
#: (causal_stability, …: their train.eval_steps curves are best_eval_*), an injection evaluation's injected_schema_valid_rate
#: and a vote's members_*_mean, and classify's external_* (a file of the user's, scored once)
TEST_METRIC = re.compile(r"^(heldout_(?!val_)|(baseline_|members_)?(attack_success|targeted_attack|demanded_attack|clean_verdict)"
                         r"|(base|sft|rl|dpo|rules|majority|baseline)(_constrained)?(_grounded)?_(verdict_|field_f1|json_valid|schema_valid"
                         r"|analyses_per_s|vs_|invented_names)"
                         r"|injected_schema_valid|external_|(causal_stability|spurious_separation|causal_discrimination)(_start)?$"
                         r"|preference_accuracy|logp_margin|reward_margin|reward_accuracy|heuristic_reward)|(^|_)test(_|$)")

RESULT_FILE = "result.json"
#: result.json's key for ``config_digest(cfg, portable=True)``: the same job in a moved or re-cloned checkout
PLACE_FREE_KEY = "place_free_digest"


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _succeeded_with(run_dir: Path, digest: str, place_free: str | None = None) -> dict | None:
    res = read_json_object(run_dir / RESULT_FILE)
    if res and res.get("status") == "succeeded" and (res.get("config_digest") == digest
                                                      or (place_free is not None and res.get(PLACE_FREE_KEY) == place_free)):
        return res
    return None


def index_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.sweep.index_dir)).expanduser().resolve()


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not under Hydra (a direct runner.run call)
        return False


def find_done(cfg: DictConfig, run_dir: Path, digest: str, place_free: str | None = None) -> tuple[dict, Path] | None:
    """(earlier result, its run dir) for a succeeded run with ``digest`` (or the place-free ``place_free``), or None."""
    own = _succeeded_with(run_dir, digest, place_free)
    if own is not None:
        return own, run_dir
    index = index_dir(cfg)
    for key in dict.fromkeys(k for k in (place_free, digest) if k):  # entries before the place-free key: by config_digest
        entry = read_json_object(index / f"{key}.json") or {}
        # where the index and the runs moved together (a moved checkout's multirun/), its place relative to the index
        places = [index / str(entry["from_index"])] if entry.get("from_index") else []
        for earlier in [*places, *([Path(str(entry["run_dir"]))] if entry.get("run_dir") else [])]:
            res = _succeeded_with(earlier, digest, place_free)
            if res is not None:
                return res, earlier
    return None


def reuse(cfg: DictConfig, run_dir: Path, digest: str, write: bool, place_free: str | None = None) -> dict | None:
    """``sweep.skip_done``: the earlier result this job stands for (written into run_dir), or None."""
    found = find_done(cfg, run_dir, digest, place_free)
    if found is None:
        return None
    res, earlier = found
    from sectune.run_guard import damaged_artifact

    if (why := damaged_artifact(earlier, res)) is not None:
        print(f"sectune: config {digest} succeeded in {earlier}, but {why}; trained again (sweep.skip_done=true)")
        return None
    if earlier.resolve() == run_dir.resolve():
        print(f"sectune: {run_dir} already succeeded with this config; skipped (sweep.skip_done=true)")
        return res
    if earlier.resolve().parent == run_dir.resolve().parent:
        # another job dir of this same sweep dir: this sweep numbers its jobs afresh and may overwrite that one, which
        # would leave this job's result pointing at another config's artifacts
        print(f"sectune: config {digest} succeeded in {earlier}, another job dir of this sweep that a job of this sweep may "
              "replace; trained again rather than linked to it (sweep.skip_done=true)")
        return None
    out: dict[str, Any] = dict(res)
    out["artifacts"] = {k: os.path.relpath(earlier / v, run_dir) for k, v in (res.get("artifacts") or {}).items()}
    out["reused_from"] = str(earlier.resolve())
    out["skipped"] = True
    if write:
        from sectune.files import write_json_atomic

        write_json_atomic(run_dir / RESULT_FILE, out)
    print(f"sectune: config {digest} already succeeded in {earlier}; reused its result (sweep.skip_done=true)")
    return out


def record_done(cfg: DictConfig, run_dir: Path, digest: str) -> None:
    """Index a succeeded sweep job so a later sweep with ``skip_done`` finds it (``digest``: its place-free digest)."""
    from sectune.files import write_json_atomic

    index = index_dir(cfg)
    try:
        write_json_atomic(index / f"{digest}.json", {"run_dir": str(run_dir.resolve()), "stage": cfg.stage.name,
                                                     "from_index": os.path.relpath(run_dir.resolve(), index)})
    except OSError as e:  # the index is a convenience; never fail a finished run over it
        print(f"sectune: warning: could not record {digest} in {index_dir(cfg)} ({e}): sweep.skip_done will not find this "
              "job from another sweep dir", file=sys.stderr)


def check_sweep(cfg) -> None:
    """``sweep.direction`` and ``sweep.objective`` (not a test number), which the Optuna preset hands to its study (sectune.cli.SweepCheck checks it before a sweep starts)."""
    from sectune.errors import ConfigError

    if cfg.sweep.direction not in ("minimize", "maximize"):
        raise ConfigError(f"sweep.direction={cfg.sweep.direction}: choose minimize or maximize")
    if cfg.sweep.objective and TEST_METRIC.search(str(cfg.sweep.objective)):
        raise ConfigError(f"sweep.objective={cfg.sweep.objective}: a number measured on the test split; a sweeper that "
                          "optimises it chooses on test (its best trial's score is then optimistic). Optimise a validation "
                          "metric (eval_loss, val_macro_f1, heldout_val_verdict_macro_f1, …) and read the chosen trial's test number")
    from omegaconf import OmegaConf

    # the Optuna preset sets hydra.sweeper.direction: ${sweep.direction}; set on its own (as Optuna's documentation
    # shows), the study maximised what every job, the runner and the report minimise (an audit, session 36)
    study = OmegaConf.select(cfg, "hydra.sweeper.direction", default=None)
    if "optuna" in str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or "").lower() and study is not None:
        study = [str(d) for d in study] if OmegaConf.is_list(study) else [str(study)]
        if study != [str(cfg.sweep.direction)]:
            raise ConfigError(f"hydra.sweeper.direction={study[0] if len(study) == 1 else study} but sweep.direction="
                              f"{cfg.sweep.direction}: the study would choose one way while the jobs and sectune-report rank "
                              "the other. Set sweep.direction only (the preset hands it to the study)")
