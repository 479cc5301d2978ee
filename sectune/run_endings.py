"""How a run that did not finish says so: a write the machine refused (:func:`write_error`), what an interrupted run can
continue from (:func:`resume_hint`), and the scheduler's own interruptions of a submitit job (preempted and requeued, or out
of time with no requeue left). :mod:`sectune.runner` uses them."""

from __future__ import annotations

import os
from pathlib import Path

from sectune import sweeps
from sectune.errors import first_line


def resume_hint(run_dir: Path) -> str:
    """What an interrupted run can continue from: its newest complete checkpoint, if it saved one. A sweep's job: the
    sweep rerun in its own dir (the same command made a new multirun/DATE/TIME and trained that job from step 0: an audit,
    session 41)."""
    from sectune.training.checkpoints import complete_checkpoints

    found = complete_checkpoints(run_dir / "checkpoints")
    if found and sweeps.in_multirun():
        return (f"; the same sweep with hydra.sweep.dir={run_dir.parent} sweep.skip_done=true train.resume=auto continues "
                f"this job from {found[0].name}")
    if found:
        return f"; the same command with train.resume=auto continues from {found[0].name}"
    return "; no checkpoint was saved (train.save_steps), so a rerun starts afresh" if (run_dir / "checkpoints").is_dir() else ""


def in_scheduler_job() -> bool:
    """A job submitit started (Hydra's submitit launcher, local or SLURM): its signals are submitit's to act on."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def scheduler_gave_up(e: BaseException) -> bool:
    """submitit's "Job not requeued because: timed-out too many times", raised from its time-limit signal handler."""
    return (in_scheduler_job() and type(e).__name__ == "UncompletedJobError" and type(e).__module__.startswith("submitit")
            and "not requeued" in str(e))


def write_error(e: BaseException, run_dir: Path) -> str | None:
    """One line for a write the machine refused (a full disk or quota, a file-size limit, a read-only place), naming the
    file where the error does; None for another error. tokenizers and safetensors raise their own exceptions whose text
    holds only the OS error ("No space left on device (os error 28)")."""
    import errno

    codes = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG:
             "a file-size limit (ulimit -f) was reached", errno.EROFS: "the file system is read-only", errno.EACCES:
             "permission denied", errno.EPERM: "permission denied",
             errno.ENOTDIR: "a part of the path is a file, not a folder"}  # SECTUNE_CACHE naming a file (an audit, session 41)
    import re

    code = e.errno if isinstance(e, OSError) else next((int(m) for m in re.findall(r"os error (\d+)", str(e)) if int(m) in codes), None)
    if code not in codes:
        return None
    where = getattr(e, "filename", None) or f"a file under {run_dir} or paths.cache_dir"
    fix = ("free space (or raise the limit)" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
           else "make that part a folder" if code == errno.ENOTDIR else "make it writable")
    return (f"{where}: {codes[code]} ({type(e).__name__}: {first_line(e)}); {fix} or give another hydra.run.dir "
            "(or paths.cache_dir, whose default SECTUNE_CACHE or XDG_CACHE_HOME set), then rerun the same command")
