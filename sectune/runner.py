"""The stage runner: seed, open the run dir and logger, call the stage, write ``result.json``.

``STAGES`` is the one registry: stage name → ``module:function``. Modules are imported only when
their stage runs, so ``sectune --help`` and ``stage=plan`` stay fast. A stage function takes a
:class:`RunContext` and returns ``{"metrics": {...}, "artifacts": {...}}``; it never imports
another stage, and it reads an earlier stage only through that stage's ``result.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from sectune import data, sweeps
from sectune.errors import DataError, SectuneError, first_line, say_error, shown
from sectune.run_digest import config_digest, data_fingerprint, relative_to_root, skip_digest
from sectune.training import distributed
from sectune.training.checkpoints import nonfinite_weights
# re-exported: runner is where stages, the pipeline and the tests look these up
from sectune.run_endings import in_scheduler_job, resume_hint, scheduler_gave_up, write_error  # noqa: F401
from sectune.run_records import (  # noqa: F401
    RESULT_FILE, check_policy_run, data_sources, environment, finite_json, init_source, previous_result, refuse_non_analyst, trained_quantization,
)
from sectune.run_guard import (  # noqa: F401
    _LOCKS, ARTIFACT_COPIES, FAILED_CONFIG_DIR, PREVIOUS_RESULT_FILE, RUN_CONFIG_FILES, RUNNING_CONFIG_DIR, SUCCEEDED_CONFIG_DIR,
    WEIGHT_ARTIFACTS, Interrupted, _interrupt_on_signals, _lock_run_dir, _restore_signals, _unlock_run_dir,
    artifacts_untouched, damaged_artifact, foreign_result, keep_artifact_copies, keep_run_config, recorded_warnings,
    relocate_set_aside, restore_artifact_copies, restore_run_config, write_own_files)
from sectune.files import readable_weights, write_json_atomic, write_text_atomic  # noqa: F401

#: what other modules (and the tests) import from runner, some of it defined in run_guard, run_records and run_digest
__all__ = ["_LOCKS", "FAILED_CONFIG_DIR", "RUN_CONFIG_FILES", "RUNNING_CONFIG_DIR", "SUCCEEDED_CONFIG_DIR", "WEIGHT_ARTIFACTS",
           "damaged_artifact", "keep_run_config", "restore_run_config", "run", "config_digest", "skip_digest", "data_fingerprint",
           "write_json_atomic", "write_text_atomic", "previous_result", "init_source", "check_policy_run", "RunContext", "RESULT_FILE",
           "relative_to_root", "artifacts_untouched", "refuse_non_analyst", "trained_quantization"]

STAGES: dict[str, str] = {
    "sft": "sectune.stages.sft:run",
    "reward": "sectune.stages.reward:run",
    "rl": "sectune.stages.rl:run",
    "contrastive": "sectune.stages.contrastive:run",
    "classify": "sectune.stages.classify:run",
    "federated": "sectune.stages.federated:run",
    "dpo": "sectune.stages.dpo:run",
    "infer": "sectune.stages.infer:run",
    "evaluate": "sectune.stages.evaluate:run",
    "pipeline": "sectune.stages.pipeline:run",
    "plan": "sectune.stages.plan:run",
    "doctor": "sectune.stages.doctor:run",
    "report": "sectune.stages.report:run",
    "export": "sectune.stages.export:run",
}

#: a failed rerun in the dir of a succeeded run whose artifacts it left alone: its result (result.json stays the earlier run's)
FAILED_ATTEMPT_FILE = "result.failed.json"
#: every line a command printed in this run dir, appended per command (Hydra's own <job>.log holds only its loggers')
CONSOLE_LOG = "console.log"


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    #: the W&B run (or None): stages log through it or let Trainer's callback do so
    tracker: Any = None
    #: metrics a stage wants recorded even when it fails later (e.g. eval_loss_start)
    partial_metrics: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)


def hydra_files(cfg: DictConfig, run_dir: Path) -> dict[str, str]:
    """This command's ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` as Hydra wrote them into ``run_dir``
    (its output dir), from this process's own state; {} outside Hydra or for another dir."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    if Path(hc.runtime.output_dir).resolve() != run_dir.resolve() or not hc.output_subdir:
        return {}
    sub = str(hc.output_subdir)
    return {f"{sub}/config.yaml": OmegaConf.to_yaml(cfg), f"{sub}/hydra.yaml": OmegaConf.to_yaml({"hydra": hc}),
            f"{sub}/overrides.yaml": OmegaConf.to_yaml(list(hc.overrides.task))}


def _quiet_unless(main: bool):
    """stdout to /dev/null for a process that is not rank 0 (its errors and warnings go to stderr, which stays)."""
    import contextlib

    if main:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))  # closed when the process ends


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def check_data_path(cfg) -> None:
    """``dataset.path`` that names nothing is one line naming the key, for every dataset (each reader said only the path:
    "/data/x: auth_logs folder does not exist", "flow CSV not found": an audit, session 44); plan, doctor and export read no data."""
    path = OmegaConf.select(cfg, "dataset.path", default=None)
    if path and cfg.stage.name not in ("plan", "doctor", "export") and not Path(str(path)).expanduser().exists():
        raise DataError(f"dataset.path={path}: no such file or folder (dataset={cfg.dataset.name}; null reads the built-in data)")


def resolve_stage(name: str) -> Callable[[RunContext], dict]:
    if name not in STAGES:
        raise SectuneError(f"stage={name!r} is not a stage; choose one of: {', '.join(STAGES)}")
    module_name, func = STAGES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise SectuneError(f"stage={name!r} is not implemented in this version of sectune") from e
        raise
    return getattr(module, func)


def _could_not_start(run_dir: Path, e: OSError, lock) -> int:
    """A rerun that could not write its first files (a full disk, a read-only run dir): Hydra had already written this
    command's config over the succeeded run's in ``.hydra/``, which then described a run that never happened beside
    that run's adapter (evaluate read it and refused the run: audit Z, session 39). That config goes back; one line."""
    if (run_dir / SUCCEEDED_CONFIG_DIR).is_dir():
        try:
            restore_run_config(run_dir)
        except OSError:
            pass
    _unlock_run_dir(run_dir, lock)
    print(f"sectune: error: {write_error(e, run_dir)}; nothing in {run_dir} was replaced", file=sys.stderr)
    return 1


def _put_back_earlier(run_dir: Path, earlier: dict, since: float, attempt: dict) -> None:
    """A rerun that failed before replacing any weights: the earlier run, its artifacts and its config stay usable.
    result.json goes back first, by a rename where writing fails, then each other part on its own: on a full disk the
    copy of this attempt's config failed first and left result.json "running", so infer answered with the base model
    and evaluate refused the run (audit Z, session 39)."""
    try:
        write_json_atomic(run_dir / RESULT_FILE, relocate_set_aside(run_dir, earlier, since))
        (run_dir / PREVIOUS_RESULT_FILE).unlink(missing_ok=True)
    except OSError:
        os.replace(run_dir / PREVIOUS_RESULT_FILE, run_dir / RESULT_FILE)  # the earlier record as it was: a rename needs no space
    lost, config_note, back = [], "", []
    try:
        write_json_atomic(run_dir / FAILED_ATTEMPT_FILE, attempt)
    except OSError as e:
        lost.append(f"this attempt's {FAILED_ATTEMPT_FILE} ({e.strerror or first_line(e)})")
    try:
        config_note = " " + restore_run_config(run_dir)
    except OSError as e:
        lost.append(f"the earlier config put back in .hydra/ ({e.strerror or first_line(e)}; its copy is in {SUCCEEDED_CONFIG_DIR}/)")
    try:
        back = restore_artifact_copies(run_dir, earlier, since)
    except OSError as e:
        lost.append(f"the earlier loss history and splits put back ({e.strerror or first_line(e)}; their copies are in {ARTIFACT_COPIES}/)")
    back_note = f"; its {', '.join(back)} put back (this attempt's: *.failed.*)" if back else ""
    print(f"sectune: {run_dir / RESULT_FILE} is the earlier succeeded run's again (this attempt replaced none of its "
          f"weights{back_note}); this attempt's result is {FAILED_ATTEMPT_FILE}{config_note}"
          + (f"; not done: {'; '.join(lost)}" if lost else ""), file=sys.stderr)


def _earlier_succeeded(run_dir: Path, now: float) -> tuple[dict | None, float]:
    """(the succeeded run this command's run may replace, the time since which its artifacts must be untouched for a
    failed run to put it back): result.json's and now; or, where result.json says ``running`` (this command holds the
    dir's lock, so that command was killed: SIGKILL leaves no word), the succeeded run that command was replacing
    (:data:`PREVIOUS_RESULT_FILE`) and that command's start, since it may have replaced some of them already."""
    res = previous_result(run_dir)
    if res is not None and res.get("status") == "running":
        prev = previous_result(run_dir, PREVIOUS_RESULT_FILE)
        try:
            since = datetime.fromisoformat(str(res.get("started"))).timestamp()
        except ValueError:
            since = None
        if prev is not None and prev.get("status") == "succeeded" and since is not None:
            print(f"sectune: {run_dir}: an earlier command here was killed while it replaced the succeeded run in "
                  f"{PREVIOUS_RESULT_FILE}; this run replaces it in turn (a failure before that puts it back)", file=sys.stderr)
            return prev, min(since, now)
    return (res if res is not None and res.get("status") == "succeeded" else None), now


def run(cfg: DictConfig, run_dir: Path | None = None) -> tuple[int, float | None]:
    """Run ``cfg.stage.name``; returns (exit code, the sweep objective or None)."""
    from hydra.core.hydra_config import HydraConfig

    from sectune import tracking

    if run_dir is None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.bind_local_gpu()  # before any stage loads a model (not GPU 0 in every rank)
    stage_name = cfg.stage.name
    digest = config_digest(cfg)
    place_free = config_digest(cfg, portable=True)  # the same job in a checkout moved or cloned again (sweeps.py)

    if cfg.sweep.skip_done:  # this job dir, or an earlier sweep's job via the index (sweeps.py)
        prev = sweeps.reuse(cfg, run_dir, digest, write=distributed.is_main_process(), place_free=place_free)
        if prev is not None:
            unscored = objective_missing(cfg, prev.get("metrics", {}))
            if unscored:
                print(f"sectune: error: {unscored}", file=sys.stderr)
            return (2, None) if unscored else (0, _objective(prev.get("metrics", {}), cfg.sweep.objective))

    main = distributed.is_main_process()
    if main and (foreign := foreign_result(run_dir / RESULT_FILE)):
        print(f"sectune: error: hydra.run.dir={run_dir}: {foreign}; sectune writes result.json, adapter/, checkpoints/ and "
              "plots/ there and would replace them: give a new or a sectune run dir", file=sys.stderr)
        return 2, None
    lock = None
    try:
        own_files = hydra_files(cfg, run_dir) if main else {}
        lock = _lock_run_dir(run_dir, own_files) if main else None
    except OSError as e:
        return _could_not_start(run_dir, e, None), None
    if lock is False:
        return 2, None
    if main:
        distributed.clear_earlier_rank_errors(run_dir)
    result: dict[str, Any] = {
        "stage": stage_name,
        "status": "running",
        "metrics": {},
        "artifacts": {},
        "started": _now(),
        "config_digest": digest,
        sweeps.PLACE_FREE_KEY: place_free,
        # the same without how it runs (train.resume, debug): a resumed run is the same run as the one it continues
        "run_digest": skip_digest(cfg),
        "data": data_sources(cfg),
    }
    started = time.time()
    earlier, untouched_since = _earlier_succeeded(run_dir, started) if main else (None, started)
    same_run = earlier is not None and (earlier.get("config_digest") == digest or earlier.get("run_digest") == result["run_digest"])
    try:
        if earlier is not None:
            # its result stays readable beside the new one (the artifacts it names are replaced as this run writes them), and
            # what a failing rerun rewrites before it replaces any weights (the loss history) is kept to put back
            write_json_atomic(run_dir / PREVIOUS_RESULT_FILE, earlier)
            keep_artifact_copies(run_dir, earlier, untouched_since)
            if not same_run:
                why = " (a sweep rerun in place with other values numbers its jobs afresh)" if sweeps.in_multirun() else ""
                print(f"sectune: warning: {run_dir} held a succeeded run of another config{why}; this run replaces it as it "
                      f"writes its artifacts (its result meanwhile: {PREVIOUS_RESULT_FILE}; a failure before that puts it back)",
                      file=sys.stderr)
        if main:
            # A stale result from an earlier attempt in this dir must not look current.
            write_json_atomic(run_dir / RESULT_FILE, result)
    except OSError as e:
        return _could_not_start(run_dir, e, lock), None
    t0 = time.perf_counter()
    generated_at, skipped_at = data.generated_mark(), data.skipped_mark()
    ctx = RunContext(cfg=cfg, run_dir=run_dir)
    code = 0
    if sweeps.in_multirun():  # the jobs of a sweep share this process: each reports its own peaks, not the sweep's so far
        from sectune.training import engine

        engine.reset_peaks()
    handlers = _interrupt_on_signals()
    unscored = None  # the trial trained but has no sweep.objective to report: failed, its metrics kept
    requeued = None  # submitit's SystemExit after a requeue, raised again once result.json says so
    heard = recorded_warnings(run_dir / CONSOLE_LOG if main else None).__enter__()
    try:
        from sectune.config_checks import check_keys, check_values
        from sectune.config_effects import say_start_notices

        check_keys(cfg)
        check_values(cfg)
        check_data_path(cfg)
        if main:
            say_start_notices(cfg)
        _seed_everything(cfg.train.seed)
        stage_fn = resolve_stage(stage_name)
        # the doctor checks W&B itself (its own run stalled ~90 s where a key has no network: session 36); a pipeline opens
        # its own when its steps (each with its run) are over, so that run ends failed or succeeded with the pipeline
        ctx.tracker = tracking.start(cfg, run_dir) if main and stage_name not in ("doctor", "pipeline") else None
        with _quiet_unless(main):  # under torchrun every rank ran the stage's prints: rank 0 speaks, the others' stderr stays
            out = stage_fn(ctx) or {}
        metrics = {**ctx.partial_metrics, **out.get("metrics", {})}
        result["metrics"] = finite_json(metrics)
        result["artifacts"] = out.get("artifacts", {})
        broken = [k for k in ("train_loss", "eval_loss") if isinstance(metrics.get(k), float) and not math.isfinite(metrics[k])]
        # the saved weights too: dpo, classify and simplified_ppo report no eval_loss, and went NaN as succeeded (session 36)
        broken += [f"{name}/{bad}" for name in ("adapter", "model") if name in result["artifacts"] and (run_dir / name).is_dir()
                   and (bad := nonfinite_weights(run_dir / name, max_bytes=2 << 30))]
        if broken:  # NaN weights were saved and recorded as succeeded (a damaged checkpoint resumed, say): not a result
            from sectune.run_guard import set_aside_broken

            moved = set_aside_broken(run_dir, result["artifacts"]) if main else ""
            raise SectuneError(f"{broken[0]} is {metrics.get(broken[0], 'not finite')}: the trained weights are broken (a damaged checkpoint "
                               "resumed, or a learning rate too high; stage=contrastive's debug.enabled=true stops at the "
                               f"first non-finite loss and says what to try); nothing downstream uses this run{moved}")
        result["status"] = "succeeded"
        unscored = objective_missing(cfg, result["metrics"])
        if unscored:  # the sweeper cannot score it: a failed trial in result.json, the index and the report alike
            code = 2
            result.update(status="failed", error=unscored)
            print(f"sectune: error: {unscored}", file=sys.stderr)
    except SectuneError as e:
        code = e.exit_code
        result.update(status="failed", error=str(e))
        say_error(shown(str(e)))  # a path or value from the input: no raw escapes; rank 0 alone says it
    except KeyboardInterrupt as e:
        code = 128 + e.signum if isinstance(e, Interrupted) else 130
        why = f"interrupted ({e.name})" if isinstance(e, Interrupted) else "interrupted (KeyboardInterrupt)"
        result.update(status="failed", error=why)
        print(f"sectune: {why}{resume_hint(run_dir)}", file=sys.stderr)
    except SystemExit as e:  # submitit's signal handler requeued the job (SLURM preemption, or the time limit with requeues
        # left) and exits inside the training step: result.json stayed "running" with a finish time (an audit, session 41)
        if not in_scheduler_job():
            raise
        code, requeued = 143, e
        result.update(status="failed", error="interrupted (requeued by the scheduler: preempted or near its time limit)")
        print(f"sectune: {result['error']}{resume_hint(run_dir)}", file=sys.stderr)
    except Exception as e:  # a bug or a library failure: keep the traceback for the user
        code = 1
        if scheduler_gave_up(e):  # submitit's handler at the time limit with no requeue left: no bug, no traceback
            result.update(status="failed", error="interrupted (the time limit: the scheduler's job was not requeued; "
                                                 "hydra.launcher.max_num_timeout)")
            print(f"sectune: {result['error']}{resume_hint(run_dir)}", file=sys.stderr)
            code = 143
        refused = None if code == 143 else write_error(e, run_dir)  # a full disk or a read-only place is no bug: one line naming the file
        if code != 143:
            result.update(status="failed", error=refused or f"{type(e).__name__}: {e}")
            if refused is None:
                traceback.print_exc()
            say_error(shown(refused or f'{type(e).__name__}: {e}'))
    finally:
        heard.__exit__(None, None, None)
        if heard.lines:
            result["warnings"] = heard.lines
        _restore_signals(handlers)
        if result["status"] == "failed" and not unscored:
            result["metrics"] = finite_json(ctx.partial_metrics)
        skipped = data.skipped_since(skipped_at)
        if skipped and "skipped_lines" not in (result.get("metrics") or {}):  # dataset.skip_bad_lines, in every stage's record
            result["metrics"] = {**(result.get("metrics") or {}), "skipped_lines": skipped}
        generated = data.generated_since(generated_at)
        if generated:  # numbers on generated stand-ins never pass for real-data results
            result["generated_data"] = generated
        if result["status"] == "failed" and not unscored and distributed.world_size() > 1:
            _name_the_failing_rank(run_dir, result, main)
        result["finished"] = _now()
        result["wall_time_s"] = round(time.perf_counter() - t0, 2)
        # which code, libraries and device produced the numbers
        result["environment"] = environment(str(OmegaConf.select(cfg, "train.device", default="auto")))
        if main:
            readable_weights(run_dir)  # safetensors 0.8 saves owner-only
            with contextlib.suppress(OSError):  # (a full disk: the texts there stay as they are)
                if lock:
                    write_own_files(run_dir, own_files)  # a refused command's ranks may have written theirs meanwhile
            if result["status"] == "failed" and earlier is not None and artifacts_untouched(run_dir, earlier, untouched_since):
                _put_back_earlier(run_dir, earlier, untouched_since, result)
            else:
                write_json_atomic(run_dir / RESULT_FILE, result)
                (run_dir / FAILED_ATTEMPT_FILE).unlink(missing_ok=True)  # an older attempt's: result.json is current
                if result["status"] == "succeeded":
                    keep_run_config(run_dir)  # (its copies of the earlier run's artifacts go with the earlier config)
                    if same_run:  # the same run done again: nothing earlier to keep beside it
                        (run_dir / PREVIOUS_RESULT_FILE).unlink(missing_ok=True)
            tracking.finish(ctx.tracker, result)
            if result["status"] == "succeeded" and sweeps.in_multirun():
                sweeps.record_done(cfg, run_dir, place_free)
    objective = _objective(result["metrics"], cfg.sweep.objective) if code == 0 else None
    global _OBJECTIVE_SEEN
    _OBJECTIVE_SEEN = _OBJECTIVE_SEEN or objective is not None
    _unlock_run_dir(run_dir, lock)
    if requeued is not None:  # submitit goes on with its exit (the requeued job starts again in this dir)
        raise requeued
    if (result["status"] == "failed" and str(result.get("error", "")).startswith("interrupted") and sweeps.in_multirun()
            and not in_scheduler_job()):  # a submitit job's interrupt ends that job; the submitting sweep reads its result.json
        # Ctrl-C or a scheduler's SIGTERM stops the sweep, not only its current job, with the signal's exit code
        raise Interrupted(code - 128) if code > 128 and code != 130 else KeyboardInterrupt()
    if unscored and not _OBJECTIVE_SEEN:  # a typo'd objective (or one this stage never reports): every trial would train for nothing
        print(f"sectune: error: no job of this sweep has reported sweep.objective={cfg.sweep.objective}, so the sweep stops "
              "here instead of training the rest for nothing; set it to one of the metrics named above", file=sys.stderr)
        raise SystemExit(2)
    return code, objective


def _name_the_failing_rank(run_dir: Path, result: dict, main: bool) -> None:
    """Under several processes: a rank other than 0 leaves its error for rank 0, which names the rank that failed first
    in result.json's ``error`` (every rank's in ``rank_errors``): after a failure on rank 1 alone it recorded its own
    knock-on, gloo's "Connection closed by peer" (distributed.root_cause)."""
    own = str(result.get("error", ""))
    if not main:
        distributed.report_rank_error(run_dir, own)
        return
    cause, errors = distributed.root_cause(run_dir, own, time.time())
    if len(errors) > 1:
        result["rank_errors"] = {str(r): e for r, e in errors.items()}
    if cause != own:
        result["error"] = cause
        print(f"sectune: error: the run failed on {shown(cause.split(' (rank 0: ')[0])}", file=sys.stderr)


#: a job of this process's sweep has reported its sweep.objective (then a later trial without it is one failed
#: trial, e.g. a setting with no validation split, and the sweep goes on)
_OBJECTIVE_SEEN = False


def objective_missing(cfg: DictConfig, metrics: dict) -> str | None:
    """Why a sweep trial cannot be scored (``sweep.objective`` names no number in its metrics), or None."""
    if not (cfg.sweep.objective and sweeps.in_multirun()) or _objective(metrics, cfg.sweep.objective) is not None:
        return None
    numbers = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return (f"sweep.objective={cfg.sweep.objective}: this stage's result has no such number, so the sweeper cannot score "
            f"this trial (its metrics: {', '.join(numbers) or 'none'})")


def _objective(metrics: dict, name: str | None = None) -> float | None:
    """What a sweeper (Optuna) optimises: ``sweep.objective``, else eval_loss, val_loss or
    predicted_peak_bytes, whichever the stage reported; None (a failed trial) when absent."""
    if name:
        v = metrics.get(name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    for key in ("eval_loss", "val_loss", "predicted_peak_bytes"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
