"""What keeps a run dir's saved results whole around ``runner.run``: the lock one command holds on its dir, SIGTERM
handled as Ctrl-C, the succeeded run's config kept and put back after a failed rerun, the checks a reused or
replaced run's artifacts must pass (the atomic writes every record goes through are in ``sectune.files``). ``runner``
re-exports these names; ``sweeps`` imports them from here (it imported them from ``runner``, which imports ``sweeps``: the circle
DESIGN.md names)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def replace_dir(tmp: Path, out: Path) -> None:
    """``tmp`` (complete) renamed to ``out``. What was at ``out`` is first renamed aside and deleted only after the new
    folder is in place: deleting it first lost both to a kill (or a failed delete) in between, the old weights half
    gone and the new ones stranded under a temporary name. A symbolic link is replaced itself (never what it points
    to), a file too. Temporary folders of earlier killed saves of ``out`` are deleted first."""
    import shutil
    import tempfile

    clear_stale(out, keep=tmp)
    if out.is_symlink() or out.is_file():
        out.unlink()
    old = None
    try:
        if out.exists():  # os.replace cannot replace a non-empty dir
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:  # SIGTERM between the two renames left the earlier weights in .X.old-*, which the next save
        if old is not None and not out.exists() and (old / out.name).exists():  # deleted (an audit, session 36): put back
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clear_stale(out: Path, keep: Path | None = None) -> None:
    """Delete what killed saves of ``out`` left beside it (``.<name>.tmp*``, ``.<name>.old-*``), except ``keep`` (the
    save under way) and this process's own: one command holds a run dir, so no other save of ``out`` is under way."""
    import shutil

    mine = {f".{out.name}.tmp{os.getpid()}", keep.name if keep is not None else ""}
    for p in out.parent.glob(f".{out.name}.*"):
        if p.name not in mine and (p.name.startswith(f".{out.name}.tmp") or p.name.startswith(f".{out.name}.old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


#: the artifacts a reused run stands for: its weights
WEIGHT_ARTIFACTS = ("model", "adapter", "reward_model", "base_model")


def damaged_artifact(run_dir: Path, result: dict) -> str | None:
    """Why a succeeded run's artifacts cannot stand for it any more (one deleted, a safetensors file cut short), or None:
    a sweep's skip_done and a pipeline's skip check reused runs whose adapters were gone."""
    from sectune.training.checkpoints import damaged_safetensors

    for key, rel in (result.get("artifacts") or {}).items():
        if not isinstance(rel, str) or key not in WEIGHT_ARTIFACTS:  # checkpoints or plots deleted to save space: fine
            continue
        path = Path(run_dir) / rel
        if not path.exists():
            return f"artifacts.{key} ({path}) is missing"
        damage = damaged_safetensors(path) if path.is_dir() else None
        if damage:
            return f"artifacts.{key} ({path / damage[0]}) is damaged: {damage[1]}"
        stale = _stale_heuristic(path / "heuristic_reward.json") if path.is_dir() else None
        if stale:  # a pipeline skipped its reward step as done, and its rl step refused the spec: "rerun" looped
            return f"artifacts.{key} ({path / 'heuristic_reward.json'}) cannot be used by this sectune: {stale}"
    return None


def _stale_heuristic(spec_file: Path) -> str | None:
    """Why the heuristic reward model's spec (written by stage=reward's fallback) is not this sectune's, or None."""
    if not spec_file.is_file():
        return None
    from sectune.data.auth_rewards import heuristic_from_spec

    try:
        heuristic_from_spec(json.loads(spec_file.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        return str(e)
    return None


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's preemption or time limit, ``timeout``, ``kill``), handled as Ctrl-C is: the run
    is recorded as failed and a rerun that changed nothing restores the earlier result (it stayed "running")."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum, self.name = signum, signal.Signals(signum).name


def _interrupt_on_signals() -> dict:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, raise_interrupted)
        except (ValueError, OSError):
            pass
    return old


def _restore_signals(old: dict) -> None:
    import signal

    for sig, handler in old.items():
        signal.signal(sig, handler)


#: open lock files of the run dirs this process is running in (released when it exits)
_LOCKS: dict[str, Any] = {}


def _lock_run_dir(run_dir: Path, own_files: dict[str, str] | None = None):
    """An exclusive lock on ``run_dir/.sectune.lock`` for this process: a second command into the same dir stops with an
    error naming the process that holds it (two runs in one dir both said done, one's result silently replacing the other's).
    ``own_files``: this command's ``.hydra/`` texts by relative path, written once the lock is held (a command refused
    a moment earlier may have written its own over them: two sweeps started in the same second shared a sweep dir, and
    a job's result sat beside the other sweep's overrides). Returns the open file, or False (the error is printed)."""
    import shutil

    from sectune.files import take_lock

    key = str(run_dir.resolve())
    if key in _LOCKS:  # this process already runs here (a stage that runs another in its own dir)
        return None
    running = run_dir / RUNNING_CONFIG_DIR
    fh = take_lock(run_dir / ".sectune.lock")
    if isinstance(fh, str):
        # Hydra wrote this command's .hydra/ over the running one's before sectune started: put the running one's back
        for rel in RUN_CONFIG_FILES:
            if (running / Path(rel).name).is_file():
                shutil.copy2(running / Path(rel).name, run_dir / rel)
        print(f"sectune: error: {run_dir} is in use by another sectune run ({fh}); wait for it, or give this run "
              "another hydra.run.dir", file=sys.stderr)
        return False
    write_own_files(run_dir, own_files)
    shutil.rmtree(running, ignore_errors=True)
    for rel in RUN_CONFIG_FILES:
        if (run_dir / rel).is_file():
            running.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / rel, running / Path(rel).name)
    _LOCKS[key] = fh
    return fh


def write_own_files(run_dir: Path, own_files: dict[str, str] | None) -> None:
    """This run's ``.hydra/`` texts back where another command's differ: a command refused by the lock writes its own
    config first, and under torchrun its other ranks' Hydra may write it after rank 0 was refused and had put ours back
    (a 40-step run then kept a refused 3-step command's config as its record). Written when the lock is taken and again
    at the run's end, before the succeeded run's copy is kept."""
    for rel, text in (own_files or {}).items():
        path = run_dir / rel
        if path.parent.is_dir() and (not path.is_file() or path.read_text(encoding="utf-8") != text):
            path.write_text(text, encoding="utf-8")


def _unlock_run_dir(run_dir: Path, lock) -> None:
    import shutil

    if not lock:
        return
    shutil.rmtree(run_dir / RUNNING_CONFIG_DIR, ignore_errors=True)
    _LOCKS.pop(str(run_dir.resolve()), None)
    lock.close()  # closing the file releases the lock


#: a succeeded run's result.json, kept when a run of another config starts in its dir
PREVIOUS_RESULT_FILE = "result.previous.json"


#: what a run dir's config is made of: Hydra's record of the run (written before the stage starts, so a failed rerun
#: in the dir replaces it) and a pipeline step's step.json (its skip check); a copy of the succeeded run's is kept
RUN_CONFIG_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "step.json")
SUCCEEDED_CONFIG_DIR, FAILED_CONFIG_DIR, RUNNING_CONFIG_DIR = ".hydra/succeeded", ".hydra/failed", ".hydra/running"


def keep_run_config(run_dir: Path) -> None:
    """A copy of a succeeded run's config files, which :func:`restore_run_config` puts back after a failed rerun."""
    import shutil

    keep = run_dir / SUCCEEDED_CONFIG_DIR
    shutil.rmtree(keep, ignore_errors=True)
    for rel in RUN_CONFIG_FILES:
        if (run_dir / rel).is_file():
            (keep / Path(rel).name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / rel, keep / Path(rel).name)


def restore_run_config(run_dir: Path) -> str:
    """After a rerun that failed before replacing any artifact: its config files move to ``.hydra/failed/`` and the
    succeeded run's come back, so what reads a run's config (stage=evaluate, infer's chain, a pipeline's skip check)
    reads the config its artifacts were made with. Returns where this attempt's config is, for the message."""
    import shutil

    keep = run_dir / SUCCEEDED_CONFIG_DIR
    if not keep.is_dir():  # a run from an older sectune kept no copy
        return "(its config is in .hydra/, which now holds this attempt's settings)"
    failed = run_dir / FAILED_CONFIG_DIR
    shutil.rmtree(failed, ignore_errors=True)
    try:
        failed.mkdir(parents=True)
    except OSError:  # no room even for a folder: the succeeded run's config matters more than this attempt's
        failed = None
    for rel in RUN_CONFIG_FILES:
        here, saved = run_dir / rel, keep / Path(rel).name
        if here.is_file() and failed is not None:  # this attempt's: moved aside where the succeeded run's comes back
            (os.replace if saved.is_file() else shutil.copy2)(here, failed / here.name)  # (a rename needs no space)
        if saved.is_file():
            tmp = here.with_name(here.name + ".restoring")
            try:
                shutil.copy2(saved, tmp)
                os.replace(tmp, here)
            except OSError:  # a full disk: the kept copy itself goes back (the next succeeded run keeps one again)
                Path(tmp).unlink(missing_ok=True)
                os.replace(saved, here)
    return (f"(its config is in {FAILED_CONFIG_DIR}/; " if failed is not None else "(its config was not kept: no room; ") \
        + ".hydra/ holds the succeeded run's again)"


#: a training stage writes the loss history so far even when it fails, before it has replaced any weights: a rerun keeps
#: a copy of the succeeded run's (:func:`keep_artifact_copies`), put back when the rerun fails
REWRITTEN_ON_FAILURE = ("train_history", "splits", "labels", "normalizer")  # the last three: classify writes them before
# it trains, so a refused or interrupted rerun left the earlier run's adapter beside another run's labels (session 36)
#: training state, not a result: a fresh rerun sets the earlier attempt's checkpoints aside and saves its own
TRAINING_STATE = ("checkpoints", "best_checkpoint")  # best_checkpoint lives under checkpoints/: a fresh rerun sets it aside
ARTIFACT_COPIES = f"{SUCCEEDED_CONFIG_DIR}/artifacts"


def _rewritten(run_dir: Path, result: dict):
    for key in REWRITTEN_ON_FAILURE:
        rel = (result.get("artifacts") or {}).get(key)
        if isinstance(rel, str) and rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
            yield key, run_dir / rel, run_dir / ARTIFACT_COPIES / rel


def keep_artifact_copies(run_dir: Path, result: dict, since: float) -> None:
    """Copies of the succeeded run's artifacts a failing rerun rewrites (:data:`REWRITTEN_ON_FAILURE`), where they are
    still that run's (unchanged since ``since``: a killed rerun's copies stay as it made them)."""
    import shutil

    for _, path, copy in _rewritten(run_dir, result):
        if path.exists() and _newest(path) <= since:
            copy.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(path, copy)
            else:
                shutil.copy2(path, copy)


def _newest(path: Path) -> float:
    """The latest modification time of a file, or of a folder and everything in it."""
    if not path.is_dir():
        return path.stat().st_mtime
    return max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])


def restore_artifact_copies(run_dir: Path, result: dict, since: float) -> list[str]:
    """After a failed rerun: each of those artifacts it rewrote moves to ``<name>.failed<suffix>`` (that attempt's) and
    the succeeded run's copy comes back. Returns the names put back."""
    import shutil

    back = []
    for _, path, copy in _rewritten(run_dir, result):
        if copy.exists() and (not path.exists() or _newest(path) > since):
            tmp = path.with_name(f".{path.name}.restoring")
            _remove(tmp)
            try:
                (shutil.copytree if copy.is_dir() else shutil.copy2)(copy, tmp)
                source = tmp
            except OSError:  # a full disk: the kept copy itself goes back, by a rename (the attempt's had moved aside first
                _remove(tmp)  # and the copy failed: the run was left without its splits; audit Z, session 39)
                source = copy
            if path.exists():
                failed = path.with_name(f"{path.stem}.failed{path.suffix}")
                _remove(failed)
                os.replace(path, failed)
            os.replace(source, path)
            back.append(path.name)
    return back


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


#: the folders a stage writes in its run dir, each after result.json
FOLDERS_AFTER_RESULT = ("adapter", "model", "reward_model", "checkpoints")


def foreign_result(path: Path) -> str | None:
    """Why ``path`` (a run dir's result.json) is another tool's, or None (absent, sectune's, or unreadable: a damaged
    one of sectune's is rerun saying why): a run pointed at a folder of other files overwrote their result.json and
    replaced their adapter/ (an audit of hostile inputs, session 26); a folder holding adapter/ (or model/, ...) and no
    result.json is another tool's too."""
    if not path.exists():  # sectune writes result.json before any of these: without it they are another tool's
        theirs = [f"{name}/" for name in FOLDERS_AFTER_RESULT if (path.parent / name).exists()]
        return f"it holds {', '.join(theirs)} but no result.json (sectune writes one first)" if theirs else None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(data, dict) and isinstance(data.get("status"), str):  # every result sectune writes has its status
        return None
    return "its result.json was not written by sectune (no status)"


def relocate_set_aside(run_dir: Path, result: dict, since: float) -> dict:
    """``result`` (the earlier succeeded run's, put back after a failed rerun) with its training state named where this
    rerun's fresh start set it aside (``checkpoints/earlier/``, made after ``since``): left as it was, a contrastive run's
    ``best_checkpoint`` named a folder that had moved, or the failed attempt's own ``checkpoint-N``."""
    from sectune.training.checkpoints import EARLIER_DIR

    artifacts = result.get("artifacts")
    if not isinstance(artifacts, dict):
        return result
    moved = {}
    for key in TRAINING_STATE:
        rel = artifacts.get(key)
        if not isinstance(rel, str) or len(Path(rel).parts) < 2 or Path(rel).is_absolute() or ".." in Path(rel).parts \
                or EARLIER_DIR in Path(rel).parts:
            continue
        earlier = run_dir / Path(rel).parent / EARLIER_DIR
        if (earlier / Path(rel).name).exists() and earlier.stat().st_mtime > since:
            moved[key] = (Path(rel).parent / EARLIER_DIR / Path(rel).name).as_posix()
    return {**result, "artifacts": {**artifacts, **moved}} if moved else result


def artifacts_untouched(run_dir: Path, result: dict, since: float) -> bool:
    """Every artifact ``result`` names still exists and nothing in it was written after ``since`` (a wall-clock time),
    but for training state and the artifacts a failed rerun rewrites while a copy of the succeeded run's is kept."""
    artifacts = result.get("artifacts")
    if not isinstance(artifacts, dict):
        return False
    kept = {key for key, _, copy in _rewritten(run_dir, result) if copy.exists()}
    for key, rel in artifacts.items():
        if key in TRAINING_STATE or key in kept:
            continue
        if not isinstance(rel, str) or not rel:
            return False
        path = run_dir / rel
        if not path.exists():
            return False
        # a folder of this run is walked; one outside it (another run's weights it sits on) is not this run's to have
        # changed, and a result.json naming "../../.." had the walk cover the whole filesystem
        inside = path.resolve().is_relative_to(run_dir.resolve())
        paths = [path, *path.rglob("*")] if path.is_dir() and inside and not path.is_symlink() else [path]
        if any(p.stat().st_mtime > since for p in paths):
            return False
    return True


#: terminal control sequences (tqdm's cursor moves between nested bars): not for a log file


# what a run prints, kept (result.json's warnings, console.log): its own module, re-exported here as before
from sectune import console  # noqa: E402

recorded_warnings = console.recorded_warnings

#: the suffix a failed run's broken weights folder takes (``adapter/`` → ``adapter.nonfinite/``)
BROKEN_SUFFIX = ".nonfinite"


def set_aside_broken(run_dir: Path, artifacts: dict) -> str:
    """A run whose loss or weights went non-finite: its saved ``adapter/`` or ``model/`` renamed ``<name>.nonfinite/`` and
    its artifacts entry with it, so the folder is not taken for a trained adapter (it sat under the usual name, the
    console's "done · adapter at …" line before the error naming it: session 44). Returns the clause the error adds."""
    said = []
    for name in ("adapter", "model"):
        if artifacts.get(name) == name and (run_dir / name).is_dir():
            replace_dir(run_dir / name, run_dir / f"{name}{BROKEN_SUFFIX}")
            artifacts[f"{name}{BROKEN_SUFFIX}"] = f"{name}{BROKEN_SUFFIX}"
            del artifacts[name]
            said.append(f"its {name}/ is now {name}{BROKEN_SUFFIX}/")
    return f" ({', '.join(said)})" if said else ""
